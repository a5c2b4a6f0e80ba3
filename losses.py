"""Pure HALOs loss functions of log-probabilities.

Every function takes tensors and plain hyperparameters only: no config objects, no devices, no
torch.distributed. Quantities that need a cross-rank reduction (KTO's KL estimate) are reduced by
the caller and passed in as a scalar, so every loss can be pinned by hand-computed CPU tests.

Notation: B examples, T token positions, V vocabulary size. Sequence log-probs (`*_logps` of
shape (B,)) are *sums* of response-token log-probabilities, as in the original framework, so
rewards scale with response length. The implicit reward of a response is
r(x, y) = logπ_θ(y|x) − logπ_ref(y|x).
"""

from typing import Callable, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor

from errors import HalosError


class LossInputError(HalosError):
    """A loss function got tensors of the wrong shape or an out-of-range hyperparameter."""


class LossOutput(NamedTuple):
    """Per-example losses and detached rewards of a preference loss.

    Attributes:
        losses: per-example losses, shape (B,) for paired losses and (n_chosen + n_rejected,)
            for unpaired ones (chosen rows first).
        chosen_rewards: detached rewards of the chosen/desirable examples, shape (n_chosen,).
        rejected_rewards: detached rewards of the rejected/undesirable examples, shape (n_rejected,).
    """

    losses: Tensor
    chosen_rewards: Tensor
    rejected_rewards: Tensor


class KTOLossOutput(NamedTuple):
    """`LossOutput` fields plus the reference point the KTO loss actually used.

    Attributes:
        losses: shape (n_chosen + n_rejected,), chosen rows first.
        chosen_rewards: β·r for desirable examples, detached, shape (n_chosen,).
        rejected_rewards: β·r for undesirable examples, detached, shape (n_rejected,).
        kl_estimate: the detached, clamped reference point z, shape ().
    """

    losses: Tensor
    chosen_rewards: Tensor
    rejected_rewards: Tensor
    kl_estimate: Tensor


class GAEOutput(NamedTuple):
    """Generalised advantage estimates, both shape (B, T) and zero at masked positions.

    Attributes:
        advantages: A_t, not whitened.
        returns: A_t + V_t, the standard critic target.
    """

    advantages: Tensor
    returns: Tensor


class PolicyLossOutput(NamedTuple):
    """Clipped PPO surrogate.

    Attributes:
        loss: masked mean of the pessimistic surrogate, shape (), carries gradient.
        clipfrac: fraction of unmasked tokens where the clipped term won, shape (), detached.
    """

    loss: Tensor
    clipfrac: Tensor


class PPOLossOutput(NamedTuple):
    """Total PPO loss and the pieces behind the original's PPO metrics (all shape ()).

    Attributes:
        loss: policy + critic_coef·critic + kl_coef·kl_penalty, carries gradient (`loss/total`).
        policy_loss: clipped surrogate, detached (`loss/policy`).
        critic_loss: value regression loss, detached (`loss/critic`).
        kl_penalty: ⟨logπ_ref − logπ_θ⟩ over unmasked tokens, detached (`loss/policykl`).
        clipfrac: fraction of clipped tokens, detached (`clipfrac/policy`).
        seq_ratio: mean over rows of Π_t ρ_t on unmasked tokens, detached (`loss/seqratio`).
    """

    loss: Tensor
    policy_loss: Tensor
    critic_loss: Tensor
    kl_penalty: Tensor
    clipfrac: Tensor
    seq_ratio: Tensor


def _require(condition: bool, message: str) -> None:
    if not condition:
        raise LossInputError(message)


_SHAPE_NAMES = {1: "(B,)", 2: "(B, T)"}


def _check_shapes(function: str, dims: int, **tensors: Tensor) -> None:
    """Checks that every tensor has `dims` dimensions and that all share one shape."""
    (first_name, first), *others = tensors.items()
    for name, tensor in tensors.items():
        _require(
            tensor.dim() == dims,
            f"{function}: {name} must have shape {_SHAPE_NAMES[dims]}, got {tuple(tensor.shape)}",
        )
    for name, tensor in others:
        _require(
            tensor.shape == first.shape,
            f"{function}: {name} has shape {tuple(tensor.shape)} but {first_name} has "
            f"{tuple(first.shape)}; they must match",
        )


def _check_vectors(function: str, **tensors: Tensor) -> None:
    _check_shapes(function, 1, **tensors)


def _check_token_level(function: str, **tensors: Tensor) -> None:
    _check_shapes(function, 2, **tensors)


def _check_positive_beta(function: str, beta: float) -> None:
    _require(beta > 0, f"{function}: beta must be > 0, got {beta}")


def _check_nonnegative(function: str, **values: float) -> None:
    for name, value in values.items():
        _require(value >= 0, f"{function}: {name} must be >= 0, got {value}")


def _check_unit_interval(function: str, **values: float) -> None:
    for name, value in values.items():
        _require(0 <= value <= 1, f"{function}: {name} must be in [0, 1], got {value}")


def sft_loss(policy_logps: Tensor) -> Tensor:
    """Negative log-likelihood per example, ℓ = −logπ_θ(y|x) (used by sft and csft).

    Args:
        policy_logps: summed response log-probs, shape (B,).

    Returns:
        Per-example losses, shape (B,).
    """
    _check_vectors("sft_loss", policy_logps=policy_logps)
    return -policy_logps


def _paired_log_ratios(
    function: str,
    policy_chosen_logps: Tensor,
    policy_rejected_logps: Tensor,
    reference_chosen_logps: Tensor,
    reference_rejected_logps: Tensor,
) -> tuple[Tensor, Tensor]:
    """Validates paired inputs and returns (r(x, y_w), r(x, y_l)), each shape (B,)."""
    _check_vectors(
        function,
        policy_chosen_logps=policy_chosen_logps,
        policy_rejected_logps=policy_rejected_logps,
        reference_chosen_logps=reference_chosen_logps,
        reference_rejected_logps=reference_rejected_logps,
    )
    return policy_chosen_logps - reference_chosen_logps, policy_rejected_logps - reference_rejected_logps


def dpo_loss(
    policy_chosen_logps: Tensor,
    policy_rejected_logps: Tensor,
    reference_chosen_logps: Tensor,
    reference_rejected_logps: Tensor,
    *,
    beta: float,
) -> LossOutput:
    """Direct Preference Optimization: ℓ = −log σ(β·(r(x, y_w) − r(x, y_l))).

    Args:
        policy_chosen_logps: logπ_θ(y_w|x), shape (B,).
        policy_rejected_logps: logπ_θ(y_l|x), shape (B,).
        reference_chosen_logps: logπ_ref(y_w|x), shape (B,).
        reference_rejected_logps: logπ_ref(y_l|x), shape (B,).
        beta: inverse temperature β > 0.

    Returns:
        losses (B,); rewards β·r(x, y_w) and β·r(x, y_l), each (B,), detached.
    """
    _check_positive_beta("dpo_loss", beta)
    chosen_ratios, rejected_ratios = _paired_log_ratios(
        "dpo_loss", policy_chosen_logps, policy_rejected_logps, reference_chosen_logps, reference_rejected_logps
    )
    # Rafailov et al. (2023), DPO, Eq. 7; logsigmoid avoids log(0) for large negative margins.
    losses = -F.logsigmoid(beta * (chosen_ratios - rejected_ratios))
    return LossOutput(losses, beta * chosen_ratios.detach(), beta * rejected_ratios.detach())


def cdpo_loss(
    policy_chosen_logps: Tensor,
    policy_rejected_logps: Tensor,
    reference_chosen_logps: Tensor,
    reference_rejected_logps: Tensor,
    *,
    beta: float,
    epsilon: float,
) -> LossOutput:
    """Conservative DPO: DPO with labels assumed flipped with probability ε.

    With Δ = r(x, y_w) − r(x, y_l): ℓ = (1 − ε)·(−log σ(βΔ)) + ε·(−log σ(−βΔ)).

    Args:
        policy_chosen_logps, policy_rejected_logps, reference_chosen_logps,
            reference_rejected_logps: as in `dpo_loss`, each shape (B,).
        beta: inverse temperature β > 0.
        epsilon: label-noise rate ε in [0, 0.5]; ε = 0 is DPO.

    Returns:
        losses (B,); rewards as in `dpo_loss`.
    """
    _check_positive_beta("cdpo_loss", beta)
    _require(0 <= epsilon <= 0.5, f"cdpo_loss: epsilon must be in [0, 0.5], got {epsilon}")
    chosen_ratios, rejected_ratios = _paired_log_ratios(
        "cdpo_loss", policy_chosen_logps, policy_rejected_logps, reference_chosen_logps, reference_rejected_logps
    )
    logits = beta * (chosen_ratios - rejected_ratios)
    # Mitchell (2023), "A note on DPO with noisy preferences": expected DPO loss under label noise ε.
    losses = -(1 - epsilon) * F.logsigmoid(logits) - epsilon * F.logsigmoid(-logits)
    return LossOutput(losses, beta * chosen_ratios.detach(), beta * rejected_ratios.detach())


def slic_loss(
    policy_chosen_logps: Tensor, policy_rejected_logps: Tensor, *, beta: float, lambda_coef: float
) -> LossOutput:
    """SLiC: hinge on the log-likelihood margin plus an NLL regulariser on the chosen response.

    ℓ = max(0, β − logπ_θ(y_w|x) + logπ_θ(y_l|x)) + λ·(−logπ_θ(y_w|x)). No reference model.

    Args:
        policy_chosen_logps: logπ_θ(y_w|x), shape (B,).
        policy_rejected_logps: logπ_θ(y_l|x), shape (B,).
        beta: margin β >= 0 in nats.
        lambda_coef: weight λ >= 0 of the regulariser.

    Returns:
        losses (B,); rewards are the detached policy log-probs, each (B,).
    """
    _check_vectors("slic_loss", policy_chosen_logps=policy_chosen_logps, policy_rejected_logps=policy_rejected_logps)
    _check_nonnegative("slic_loss", beta=beta, lambda_coef=lambda_coef)
    # Zhao et al. (2023), SLiC-HF: rank-calibration hinge + cross-entropy regulariser (here on y_w).
    hinge = torch.relu(beta - policy_chosen_logps + policy_rejected_logps)
    losses = hinge - lambda_coef * policy_chosen_logps
    return LossOutput(losses, policy_chosen_logps.detach(), policy_rejected_logps.detach())


def _unpaired_log_ratios(
    function: str,
    policy_chosen_logps: Tensor,
    policy_rejected_logps: Tensor,
    reference_chosen_logps: Tensor,
    reference_rejected_logps: Tensor,
) -> tuple[Tensor, Tensor]:
    """Validates unpaired inputs and returns (r_chosen (n_chosen,), r_rejected (n_rejected,))."""
    _check_vectors(function, policy_chosen_logps=policy_chosen_logps, reference_chosen_logps=reference_chosen_logps)
    _check_vectors(
        function, policy_rejected_logps=policy_rejected_logps, reference_rejected_logps=reference_rejected_logps
    )
    return policy_chosen_logps - reference_chosen_logps, policy_rejected_logps - reference_rejected_logps


def _prospect_losses(
    chosen_ratios: Tensor,
    rejected_ratios: Tensor,
    *,
    beta: float,
    chosen_reference_point: Tensor | float,
    rejected_reference_point: Tensor | float,
) -> tuple[Tensor, Tensor]:
    """Unweighted KTO-family losses 1 − σ(β(r − z)) (chosen) and 1 − σ(β(z − r)) (rejected)."""
    chosen_losses = 1 - torch.sigmoid(beta * (chosen_ratios - chosen_reference_point))
    rejected_losses = 1 - torch.sigmoid(beta * (rejected_reference_point - rejected_ratios))
    return chosen_losses, rejected_losses


def kto_kl_estimate(policy_kl_logps: Tensor, reference_kl_logps: Tensor) -> Tensor:
    """Local, detached estimate of KL(π_θ ‖ π_ref) from mismatched (x_k, y_{k+1}) pairs.

    z_local = mean_k(logπ_θ(y'_k|x_k) − logπ_ref(y'_k|x_k)). Not clamped: the caller averages it
    across ranks first, and `kto_loss` clamps the average, as in the original.

    Args:
        policy_kl_logps: policy log-probs of the mismatched pairs, shape (B,), B >= 1.
        reference_kl_logps: reference log-probs of the same pairs, shape (B,).

    Returns:
        Scalar tensor, shape (), detached.
    """
    _check_vectors("kto_kl_estimate", policy_kl_logps=policy_kl_logps, reference_kl_logps=reference_kl_logps)
    _require(policy_kl_logps.numel() > 0, "kto_kl_estimate: needs at least one KL pair, got shape (0,)")
    return (policy_kl_logps - reference_kl_logps).mean().detach()


def kto_loss(
    policy_chosen_logps: Tensor,
    policy_rejected_logps: Tensor,
    reference_chosen_logps: Tensor,
    reference_rejected_logps: Tensor,
    kl_estimate: Tensor,
    *,
    beta: float,
    desirable_weight: float,
    undesirable_weight: float,
) -> KTOLossOutput:
    """Kahneman-Tversky Optimization with a KL reference point z.

    z = max(0, kl_estimate), detached;
    desirable:   ℓ = λ_D·(1 − σ(β·(r(x, y) − z)));
    undesirable: ℓ = λ_U·(1 − σ(β·(z − r(x, y)))).

    Args:
        policy_chosen_logps: logπ_θ of desirable examples, shape (n_chosen,); may be empty.
        policy_rejected_logps: logπ_θ of undesirable examples, shape (n_rejected,); may be empty.
        reference_chosen_logps: logπ_ref of desirable examples, shape (n_chosen,).
        reference_rejected_logps: logπ_ref of undesirable examples, shape (n_rejected,).
        kl_estimate: KL estimate already averaged across ranks, shape (); detached and
            clamped here, so any tensor is safe to pass.
        beta: inverse temperature β > 0.
        desirable_weight: λ_D >= 0.
        undesirable_weight: λ_U >= 0.

    Returns:
        losses (n_chosen + n_rejected,), chosen first; detached rewards β·r per class; and z.
    """
    _check_positive_beta("kto_loss", beta)
    _check_nonnegative("kto_loss", desirable_weight=desirable_weight, undesirable_weight=undesirable_weight)
    _require(
        kl_estimate.dim() == 0, f"kto_loss: kl_estimate must be a scalar tensor, got shape {tuple(kl_estimate.shape)}"
    )
    chosen_ratios, rejected_ratios = _unpaired_log_ratios(
        "kto_loss", policy_chosen_logps, policy_rejected_logps, reference_chosen_logps, reference_rejected_logps
    )
    # The reference point is a baseline, not a target: no gradient flows through it, and a
    # negative estimate of a KL divergence is sampling noise.
    reference_point = kl_estimate.detach().clamp(min=0)
    # Ethayarajh et al. (2024), KTO: λ_y·(1 − v(x, y)) with the Kahneman-Tversky value v.
    chosen_losses, rejected_losses = _prospect_losses(
        chosen_ratios,
        rejected_ratios,
        beta=beta,
        chosen_reference_point=reference_point,
        rejected_reference_point=reference_point,
    )
    losses = torch.cat((desirable_weight * chosen_losses, undesirable_weight * rejected_losses))
    return KTOLossOutput(losses, beta * chosen_ratios.detach(), beta * rejected_ratios.detach(), reference_point)


def _class_reference_point(ratios: Tensor) -> Tensor:
    """max(0, mean(ratios)), detached, shape (); 0 for an empty class instead of NaN."""
    if ratios.numel() == 0:
        return ratios.new_zeros(())
    return ratios.detach().mean().clamp(min=0)


def simple_kto_loss(
    policy_chosen_logps: Tensor,
    policy_rejected_logps: Tensor,
    reference_chosen_logps: Tensor,
    reference_rejected_logps: Tensor,
    *,
    beta: float,
) -> LossOutput:
    """KTO whose reference points are the opposite class's mean reward in this microbatch.

    z_c = max(0, mean(r_chosen)), z_r = max(0, mean(r_rejected)), both detached and 0 when the
    class is empty; desirable ℓ = 1 − σ(β·(r − z_r)); undesirable ℓ = 1 − σ(β·(z_c − r)).

    Args:
        policy_chosen_logps, reference_chosen_logps: shape (n_chosen,); may be empty.
        policy_rejected_logps, reference_rejected_logps: shape (n_rejected,); may be empty.
        beta: inverse temperature β > 0.

    Returns:
        losses (n_chosen + n_rejected,), chosen first; detached rewards β·r per class.
    """
    return _batch_reference_kto(
        "simple_kto_loss", policy_chosen_logps, policy_rejected_logps, reference_chosen_logps,
        reference_rejected_logps, beta=beta,
        reference_points=lambda chosen, rejected: (_class_reference_point(rejected), _class_reference_point(chosen)),
    )


def kto_zero_loss(
    policy_chosen_logps: Tensor,
    policy_rejected_logps: Tensor,
    reference_chosen_logps: Tensor,
    reference_rejected_logps: Tensor,
    *,
    beta: float,
) -> LossOutput:
    """KTO with reference point 0: desirable ℓ = 1 − σ(β·r), undesirable ℓ = 1 − σ(−β·r).

    Args:
        policy_chosen_logps, reference_chosen_logps: shape (n_chosen,); may be empty.
        policy_rejected_logps, reference_rejected_logps: shape (n_rejected,); may be empty.
        beta: inverse temperature β > 0.

    Returns:
        losses (n_chosen + n_rejected,), chosen first; detached rewards β·r per class.
    """
    return _batch_reference_kto(
        "kto_zero_loss", policy_chosen_logps, policy_rejected_logps, reference_chosen_logps,
        reference_rejected_logps, beta=beta, reference_points=lambda chosen, rejected: (0.0, 0.0),
    )


def _batch_reference_kto(
    function: str,
    policy_chosen_logps: Tensor,
    policy_rejected_logps: Tensor,
    reference_chosen_logps: Tensor,
    reference_rejected_logps: Tensor,
    *,
    beta: float,
    reference_points: Callable[[Tensor, Tensor], tuple[Tensor | float, Tensor | float]],
) -> LossOutput:
    """Shared body of the KTO variants whose reference points come from the batch itself (or are 0).

    `reference_points(chosen_ratios, rejected_ratios)` returns the (desirable, undesirable) reference points.
    """
    _check_positive_beta(function, beta)
    chosen_ratios, rejected_ratios = _unpaired_log_ratios(
        function, policy_chosen_logps, policy_rejected_logps, reference_chosen_logps, reference_rejected_logps
    )
    chosen_point, rejected_point = reference_points(chosen_ratios, rejected_ratios)
    chosen_losses, rejected_losses = _prospect_losses(
        chosen_ratios, rejected_ratios, beta=beta, chosen_reference_point=chosen_point,
        rejected_reference_point=rejected_point,
    )
    losses = torch.cat((chosen_losses, rejected_losses))
    return LossOutput(losses, beta * chosen_ratios.detach(), beta * rejected_ratios.detach())


def paired_reward_accuracies(chosen_rewards: Tensor, rejected_rewards: Tensor) -> Tensor:
    """1 where a chosen reward beats the rejected reward of its own pair, else 0.

    Args:
        chosen_rewards: shape (B,).
        rejected_rewards: shape (B,), row k is the partner of chosen row k.

    Returns:
        Accuracies as floats in {0, 1}, shape (B,).
    """
    _check_vectors("paired_reward_accuracies", chosen_rewards=chosen_rewards, rejected_rewards=rejected_rewards)
    return (chosen_rewards > rejected_rewards).to(chosen_rewards.dtype)


def _zero_masked(values: Tensor, mask: Tensor) -> Tensor:
    # torch.where rather than values * mask, so inf/NaN at padded positions cannot leak in.
    return torch.where(mask.bool(), values, torch.zeros_like(values))


def masked_mean(values: Tensor, mask: Tensor) -> Tensor:
    """Mean of `values` over positions where `mask` is nonzero.

    Args:
        values: any shape.
        mask: same shape as `values`, bool or 0/1; must select at least one entry (else NaN).

    Returns:
        Scalar tensor, shape ().
    """
    _require(
        values.shape == mask.shape,
        f"masked_mean: mask has shape {tuple(mask.shape)} but values has {tuple(values.shape)}; they must match",
    )
    return _zero_masked(values, mask).sum() / mask.to(values.dtype).sum()


def masked_var(values: Tensor, mask: Tensor) -> Tensor:
    """Population variance of `values` over positions where `mask` is nonzero, shape ()."""
    mean = masked_mean(values, mask)
    return masked_mean((values - mean) ** 2, mask)


def whiten(values: Tensor, mask: Tensor, eps: float = 1e-8) -> Tensor:
    """Normalises unmasked entries to zero mean and unit variance: (x − μ)/sqrt(σ² + eps).

    Args:
        values: shape (B, T).
        mask: shape (B, T), bool or 0/1.
        eps: added to the variance before the square root.

    Returns:
        Whitened values, shape (B, T), zero at masked positions.
    """
    _check_token_level("whiten", values=values, mask=mask)
    mean, variance = masked_mean(values, mask), masked_var(values, mask)
    return _zero_masked((values - mean) * torch.rsqrt(variance + eps), mask)


def _shift_left(values: Tensor) -> Tensor:
    """x_{t+1} along the token axis, with 0 after the last position; shape (B, T)."""
    return F.pad(values[:, 1:], (0, 1))


def _reverse_discounted_cumsum(values: Tensor, discount: float) -> Tensor:
    """y_t = x_t + discount·y_{t+1} along the token axis (y_T = 0); shape (B, T)."""
    running = torch.zeros_like(values[:, 0])
    reversed_sums = []
    for step in reversed(range(values.shape[1])):
        running = values[:, step] + discount * running
        reversed_sums.append(running)
    return torch.stack(reversed_sums[::-1], dim=1)


def gae_advantages(values: Tensor, rewards: Tensor, mask: Tensor, *, gamma: float, lam: float) -> GAEOutput:
    """Generalised advantage estimation over the token axis.

    With V and R zeroed at masked positions: δ_t = R_t + γ·V_{t+1} − V_t (V_T = 0),
    A_t = δ_t + γλ·A_{t+1}, returns_t = A_t + V_t. Callers normally run this under no_grad.

    Args:
        values: critic values V, shape (B, T).
        rewards: per-token rewards R, shape (B, T).
        mask: shape (B, T), bool or 0/1; 1 on response tokens.
        gamma: discount γ in [0, 1].
        lam: GAE λ in [0, 1].

    Returns:
        advantages and returns, each (B, T), zero at masked positions.
    """
    _check_token_level("gae_advantages", values=values, rewards=rewards, mask=mask)
    _check_unit_interval("gae_advantages", gamma=gamma, lam=lam)
    values, rewards = _zero_masked(values, mask), _zero_masked(rewards, mask)
    deltas = rewards + gamma * _shift_left(values) - values
    # Schulman et al. (2016), GAE, Eq. 16: A_t = Σ_l (γλ)^l δ_{t+l}.
    advantages = _zero_masked(_reverse_discounted_cumsum(deltas, gamma * lam), mask)
    return GAEOutput(advantages, advantages + values)


def ppo_policy_loss(
    logps: Tensor, old_logps: Tensor, advantages: Tensor, mask: Tensor, *, cliprange: float
) -> PolicyLossOutput:
    """Clipped PPO surrogate ⟨max(−A·ρ, −A·clamp(ρ, c, 1/c))⟩ with ρ = exp(logp − logp_old).

    The clamp range [c, 1/c] is the original's convention (c = 0.5 gives [0.5, 2]), not the
    paper's [1 − c, 1 + c].

    Args:
        logps: token log-probs of the current policy, shape (B, T).
        old_logps: token log-probs ρ is measured against, shape (B, T); treated as constant.
        advantages: usually whitened, shape (B, T); treated as constant.
        mask: shape (B, T), bool or 0/1.
        cliprange: c in (0, 1].

    Returns:
        loss () with gradient, detached clipfrac ().
    """
    _check_token_level("ppo_policy_loss", logps=logps, old_logps=old_logps, advantages=advantages, mask=mask)
    _require(0 < cliprange <= 1, f"ppo_policy_loss: cliprange must be in (0, 1], got {cliprange}")
    advantages = advantages.detach()
    ratios = torch.exp(logps - old_logps.detach())
    unclipped = -advantages * ratios
    clipped = -advantages * ratios.clamp(cliprange, 1 / cliprange)
    # Schulman et al. (2017), PPO, Eq. 7, negated: the pessimistic (larger) loss of the two.
    loss = masked_mean(torch.max(unclipped, clipped), mask)
    clipfrac = masked_mean((clipped > unclipped).to(logps.dtype), mask).detach()
    return PolicyLossOutput(loss, clipfrac)


def ppo_critic_loss(values: Tensor, targets: Tensor, mask: Tensor) -> Tensor:
    """Value regression loss 0.5·⟨(V − target)²⟩ (no value clipping, as the original).

    Args:
        values: critic predictions, shape (B, T).
        targets: regression targets, shape (B, T); treated as constant.
        mask: shape (B, T), bool or 0/1.

    Returns:
        Scalar loss, shape ().
    """
    _check_token_level("ppo_critic_loss", values=values, targets=targets, mask=mask)
    return 0.5 * masked_mean((values - targets.detach()) ** 2, mask)


def _mean_sequence_ratio(logps: Tensor, old_logps: Tensor, mask: Tensor) -> Tensor:
    """mean_b Π_t ρ_bt over unmasked tokens, computed as exp of summed log-ratios; shape ()."""
    return torch.exp(_zero_masked(logps - old_logps, mask).sum(dim=1)).mean()


def ppo_loss(
    logps: Tensor,
    values: Tensor,
    old_logps: Tensor,
    reference_logps: Tensor,
    advantages: Tensor,
    critic_targets: Tensor,
    mask: Tensor,
    *,
    cliprange: float,
    critic_coef: float,
    kl_coef: float,
) -> PPOLossOutput:
    """PPO loss = policy + critic_coef·critic + kl_coef·⟨logπ_ref − logπ_θ⟩.

    Offline HALOs PPO passes the reference model's log-probs as both `old_logps` and
    `reference_logps`, and `gae_advantages(...).returns` as the critic target.

    Args:
        logps: token log-probs of the current policy, shape (B, T).
        values: current critic values, shape (B, T).
        old_logps: token log-probs for the ratio ρ, shape (B, T).
        reference_logps: token log-probs for the KL penalty, shape (B, T).
        advantages: shape (B, T), usually whitened.
        critic_targets: shape (B, T).
        mask: shape (B, T), bool or 0/1.
        cliprange: c in (0, 1]; ρ is clamped to [c, 1/c].
        critic_coef: weight >= 0 of the critic loss.
        kl_coef: weight >= 0 of the KL penalty.

    Returns:
        The total loss (with gradient) and detached pieces for logging, all shape ().
    """
    _check_token_level(
        "ppo_loss",
        logps=logps,
        values=values,
        old_logps=old_logps,
        reference_logps=reference_logps,
        advantages=advantages,
        critic_targets=critic_targets,
        mask=mask,
    )
    _check_nonnegative("ppo_loss", critic_coef=critic_coef, kl_coef=kl_coef)
    policy = ppo_policy_loss(logps, old_logps, advantages, mask, cliprange=cliprange)
    critic = ppo_critic_loss(values, critic_targets, mask)
    kl_penalty = masked_mean(reference_logps.detach() - logps, mask)
    loss = policy.loss + critic_coef * critic + kl_coef * kl_penalty
    return PPOLossOutput(
        loss=loss,
        policy_loss=policy.loss.detach(),
        critic_loss=critic.detach(),
        kl_penalty=kl_penalty.detach(),
        clipfrac=policy.clipfrac,
        seq_ratio=_mean_sequence_ratio(logps.detach(), old_logps.detach(), mask),
    )


def entropy_from_logits(logits: Tensor, mask: Tensor) -> Tensor:
    """Masked mean of the per-token entropy H = logsumexp(z) − Σ_v softmax(z)_v·z_v.

    Args:
        logits: shape (B, T, V).
        mask: shape (B, T), bool or 0/1.

    Returns:
        Mean entropy in nats over unmasked tokens, shape ().
    """
    _require(logits.dim() == 3, f"entropy_from_logits: logits must have shape (B, T, V), got {tuple(logits.shape)}")
    _require(
        logits.shape[:2] == mask.shape,
        f"entropy_from_logits: mask has shape {tuple(mask.shape)} but logits have (B, T) = {tuple(logits.shape[:2])}",
    )
    entropies = torch.logsumexp(logits, dim=-1) - (torch.softmax(logits, dim=-1) * logits).sum(dim=-1)
    return masked_mean(entropies, mask)
