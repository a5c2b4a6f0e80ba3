"""Pure HALOs loss functions of log-probabilities.

Every function takes tensors and plain hyperparameters only: no config objects, no devices, no torch.distributed.
Quantities that need a cross-rank reduction or a memory across steps (KTO's KL estimate, BCO's running reward mean)
are computed by the caller and passed in as scalars, so every loss can be pinned by hand-computed CPU tests.

Notation: B examples, T token positions, V vocabulary size. Sequence log-probs (`*_logps` of shape (B,)) are *sums*
of response-token log-probabilities, as in the original framework, so rewards scale with response length; losses
that need per-token averages take the response token counts (`*_lengths`, shape (B,)) as well. The implicit reward
of a response is r(x, y) = logπ_θ(y|x) − logπ_ref(y|x).

Modules: `paired` (DPO and its relatives, IPO, SimPO, ORPO, SLiC, ...), `unpaired` (KTO, BCO), `policy_gradient`
(offline PPO), `scored` (Bradley-Terry reward models, offline GRPO), `humanline` (clamped token log-ratios),
`likelihood` (NLL, per-token averages, log-odds), `checks` (input checks and the hyperparameter rules trainers
declare). Everything is importable from `losses` itself.
"""
from losses.checks import (CLOSED_HALF, HALF_OPEN_HALF, NONNEGATIVE, NONPOSITIVE, OPEN_UNIT, POSITIVE,  # noqa: F401
                           POSITIVE_INT, UNIT_INTERVAL, LossInputError, Rule, rule_problem)
from losses.humanline import humanline_log_ratios  # noqa: F401
from losses.likelihood import log_odds, mean_logps, sft_loss  # noqa: F401
from losses.outputs import KTOLossOutput, LossOutput  # noqa: F401
from losses.paired import (apo_down_loss, apo_zero_loss, bco_pair_loss, cdpo_loss, dpo_loss,  # noqa: F401
                           dpo_norm_loss, hinge_loss, ipo_loss, nca_loss, orpo_loss, paired_reward_accuracies,
                           rdpo_loss, simpo_loss, slic_loss, sppo_hard_loss)
from losses.policy_gradient import (GAEOutput, PolicyLossOutput, PPOLossOutput, entropy_from_logits,  # noqa: F401
                                    gae_advantages, masked_mean, masked_var, ppo_critic_loss, ppo_loss,
                                    ppo_policy_loss, whiten)
from losses.scored import GRPOLossOutput, bradley_terry_loss, grpo_advantages, grpo_loss  # noqa: F401
from losses.unpaired import bco_loss, kto_kl_estimate, kto_loss, kto_zero_loss, simple_kto_loss  # noqa: F401
