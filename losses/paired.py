"""Losses over (chosen, rejected) pairs: B pairs, every input (B,).

With reference: r_w = logπ_θ(y_w|x) − logπ_ref(y_w|x), r_l likewise, Δ = r_w − r_l. Length-normalised losses divide
each sequence's log-probs by its number of response tokens |y| (`chosen_lengths`, `rejected_lengths`, each >= 1).
"""
import torch
import torch.nn.functional as F
from torch import Tensor

from losses.checks import (CLOSED_HALF, HALF_OPEN_HALF, NONNEGATIVE, POSITIVE, check_hyperparameters, check_scalar,
                           check_vectors)
from losses.likelihood import log_odds, mean_logps
from losses.outputs import LossOutput


def paired_log_ratios(function: str, policy_chosen_logps: Tensor, policy_rejected_logps: Tensor,
                      reference_chosen_logps: Tensor, reference_rejected_logps: Tensor) -> tuple[Tensor, Tensor]:
    """Validates paired inputs and returns (r_w, r_l), each shape (B,)."""
    check_vectors(function, policy_chosen_logps=policy_chosen_logps, policy_rejected_logps=policy_rejected_logps,
                  reference_chosen_logps=reference_chosen_logps, reference_rejected_logps=reference_rejected_logps)
    return policy_chosen_logps - reference_chosen_logps, policy_rejected_logps - reference_rejected_logps


def _scaled_rewards(beta: float, chosen: Tensor, rejected: Tensor) -> tuple[Tensor, Tensor]:
    return beta * chosen.detach(), beta * rejected.detach()


def _beta_pair_loss(function: str, losses_of, policy_chosen_logps: Tensor, policy_rejected_logps: Tensor,
                    reference_chosen_logps: Tensor, reference_rejected_logps: Tensor, beta: float) -> LossOutput:
    """Shared body of the losses that are a function of β·r_w and β·r_l only; rewards are β·r, detached."""
    check_hyperparameters(function, beta=(beta, POSITIVE))
    chosen, rejected = paired_log_ratios(function, policy_chosen_logps, policy_rejected_logps,
                                         reference_chosen_logps, reference_rejected_logps)
    return LossOutput(losses_of(beta * chosen, beta * rejected), *_scaled_rewards(beta, chosen, rejected))


def dpo_loss(policy_chosen_logps: Tensor, policy_rejected_logps: Tensor, reference_chosen_logps: Tensor,
             reference_rejected_logps: Tensor, *, beta: float) -> LossOutput:
    """Direct Preference Optimization (Rafailov et al., 2023, Eq. 7): ℓ = −log σ(β·Δ).

    Args:
        policy_chosen_logps, policy_rejected_logps: logπ_θ(y_w|x), logπ_θ(y_l|x), shape (B,).
        reference_chosen_logps, reference_rejected_logps: logπ_ref(y_w|x), logπ_ref(y_l|x), shape (B,).
        beta: inverse temperature β > 0.

    Returns:
        losses (B,); rewards β·r_w and β·r_l, each (B,), detached.
    """
    # logsigmoid avoids log(0) for large negative margins.
    return _beta_pair_loss("dpo_loss", lambda chosen, rejected: -F.logsigmoid(chosen - rejected), policy_chosen_logps,
                           policy_rejected_logps, reference_chosen_logps, reference_rejected_logps, beta)


def cdpo_loss(policy_chosen_logps: Tensor, policy_rejected_logps: Tensor, reference_chosen_logps: Tensor,
              reference_rejected_logps: Tensor, *, beta: float, epsilon: float) -> LossOutput:
    """Conservative DPO: DPO with labels assumed flipped with probability ε.

    ℓ = (1 − ε)·(−log σ(βΔ)) + ε·(−log σ(−βΔ)) (Mitchell, 2023, "A note on DPO with noisy preferences").

    Args:
        policy_chosen_logps, ..., reference_rejected_logps: as in `dpo_loss`, each (B,).
        beta: inverse temperature β > 0.
        epsilon: label-noise rate ε in [0, 0.5]; ε = 0 is DPO.

    Returns:
        losses (B,); rewards as in `dpo_loss`.
    """
    check_hyperparameters("cdpo_loss", epsilon=(epsilon, CLOSED_HALF))
    return _beta_pair_loss(
        "cdpo_loss", lambda chosen, rejected: -(1 - epsilon) * F.logsigmoid(chosen - rejected)
        - epsilon * F.logsigmoid(rejected - chosen),
        policy_chosen_logps, policy_rejected_logps, reference_chosen_logps, reference_rejected_logps, beta)


def rdpo_loss(policy_chosen_logps: Tensor, policy_rejected_logps: Tensor, reference_chosen_logps: Tensor,
              reference_rejected_logps: Tensor, *, beta: float, epsilon: float) -> LossOutput:
    """Robust DPO (Chowdhury et al., 2024, Eq. 8): an unbiased DPO loss under label noise of rate ε.

    ℓ = ((1 − ε)·(−log σ(βΔ)) − ε·(−log σ(−βΔ))) / (1 − 2ε). Unlike cDPO its expectation under noisy labels is
    the clean DPO loss; it can be negative.

    Args:
        policy_chosen_logps, ..., reference_rejected_logps: as in `dpo_loss`, each (B,).
        beta: inverse temperature β > 0.
        epsilon: label-noise rate ε in [0, 0.5); ε = 0 is DPO.

    Returns:
        losses (B,); rewards as in `dpo_loss`.
    """
    check_hyperparameters("rdpo_loss", epsilon=(epsilon, HALF_OPEN_HALF))
    return _beta_pair_loss(
        "rdpo_loss", lambda chosen, rejected: (-(1 - epsilon) * F.logsigmoid(chosen - rejected)
                                               + epsilon * F.logsigmoid(rejected - chosen)) / (1 - 2 * epsilon),
        policy_chosen_logps, policy_rejected_logps, reference_chosen_logps, reference_rejected_logps, beta)


def hinge_loss(policy_chosen_logps: Tensor, policy_rejected_logps: Tensor, reference_chosen_logps: Tensor,
               reference_rejected_logps: Tensor, *, beta: float) -> LossOutput:
    """Hinge on the DPO margin (the SLiC hinge of Zhao et al., 2023, on log-ratios): ℓ = max(0, 1 − β·Δ).

    Args:
        policy_chosen_logps, ..., reference_rejected_logps: as in `dpo_loss`, each (B,).
        beta: β > 0; the margin on Δ is 1/β nats.

    Returns:
        losses (B,); rewards as in `dpo_loss`.
    """
    return _beta_pair_loss("hinge_loss", lambda chosen, rejected: torch.relu(1 - (chosen - rejected)),
                           policy_chosen_logps, policy_rejected_logps, reference_chosen_logps,
                           reference_rejected_logps, beta)


def nca_loss(policy_chosen_logps: Tensor, policy_rejected_logps: Tensor, reference_chosen_logps: Tensor,
             reference_rejected_logps: Tensor, *, beta: float) -> LossOutput:
    """Noise Contrastive Alignment, pairwise (Chen et al., 2024, NCA with K = 1):
    ℓ = −log σ(β·r_w) − ½·log σ(−β·r_w) − ½·log σ(−β·r_l). It raises the chosen likelihood itself, not only the
    margin; 2·ln 2 at π_θ = π_ref. Inputs and rewards as in `dpo_loss`,
    β > 0."""
    return _beta_pair_loss(
        "nca_loss", lambda chosen, rejected: -F.logsigmoid(chosen) - 0.5 * F.logsigmoid(-chosen)
        - 0.5 * F.logsigmoid(-rejected),
        policy_chosen_logps, policy_rejected_logps, reference_chosen_logps, reference_rejected_logps, beta)


def apo_zero_loss(policy_chosen_logps: Tensor, policy_rejected_logps: Tensor, reference_chosen_logps: Tensor,
                  reference_rejected_logps: Tensor, *, beta: float) -> LossOutput:
    """Anchored Preference Optimization, zero variant (D'Oosterlinck et al., 2024): ℓ = (1 − σ(β·r_w)) + σ(β·r_l).

    Pushes chosen likelihoods up and rejected ones down, each anchored at the reference; for chosen responses
    better than the model's own outputs. 1 at π_θ = π_ref. Inputs and rewards as in `dpo_loss`,
    β > 0."""
    return _beta_pair_loss("apo_zero_loss",
                           lambda chosen, rejected: 1 - torch.sigmoid(chosen) + torch.sigmoid(rejected),
                           policy_chosen_logps, policy_rejected_logps, reference_chosen_logps,
                           reference_rejected_logps, beta)


def apo_down_loss(policy_chosen_logps: Tensor, policy_rejected_logps: Tensor, reference_chosen_logps: Tensor,
                  reference_rejected_logps: Tensor, *, beta: float) -> LossOutput:
    """Anchored Preference Optimization, down variant (D'Oosterlinck et al., 2024):
    ℓ = σ(β·r_w) + (1 − σ(β·(r_w − r_l))). Lowers both likelihoods, the rejected one more; for chosen responses
    worse than the model's own outputs. 1 at π_θ = π_ref. Inputs and rewards as in `dpo_loss`,
    β > 0."""
    return _beta_pair_loss(
        "apo_down_loss", lambda chosen, rejected: torch.sigmoid(chosen) + 1 - torch.sigmoid(chosen - rejected),
        policy_chosen_logps, policy_rejected_logps, reference_chosen_logps, reference_rejected_logps, beta)


def sppo_hard_loss(policy_chosen_logps: Tensor, policy_rejected_logps: Tensor, reference_chosen_logps: Tensor,
                   reference_rejected_logps: Tensor, *, beta: float) -> LossOutput:
    """Self-Play Preference Optimization with hard labels (Wu et al., 2024, Eq. 3.5 with P(y_w ≻ π) = 1,
    P(y_l ≻ π) = 0 and η = 1/β): ℓ = (r_w − 1/(2β))² + (r_l + 1/(2β))². 1/(2β²) at π_θ = π_ref.

    Args:
        policy_chosen_logps, ..., reference_rejected_logps: as in `dpo_loss`, each (B,).
        beta: β > 0; the log-ratio targets are ±1/(2β).

    Returns:
        losses (B,); rewards as in `dpo_loss`.
    """
    return _beta_pair_loss(
        "sppo_hard_loss", lambda chosen, rejected: ((chosen - 0.5) ** 2 + (rejected + 0.5) ** 2) / beta ** 2,
        policy_chosen_logps, policy_rejected_logps, reference_chosen_logps, reference_rejected_logps, beta)


def bco_pair_loss(policy_chosen_logps: Tensor, policy_rejected_logps: Tensor, reference_chosen_logps: Tensor,
                  reference_rejected_logps: Tensor, delta: Tensor, *, beta: float) -> LossOutput:
    """Binary Classifier Optimization on pairs (Jung et al., 2024, Eq. 7 applied to both responses of a pair):
    ℓ = −log σ(β·r_w − δ) − log σ(−(β·r_l − δ)), where δ is a running mean of past rewards β·r (the caller keeps
    it: a persistent statistic). 2·ln 2 at π_θ = π_ref and δ = 0.

    Args:
        policy_chosen_logps, ..., reference_rejected_logps: as in `dpo_loss`, each (B,).
        delta: reward shift δ, shape (); detached here.
        beta: inverse temperature β > 0.

    Returns:
        losses (B,); rewards as in `dpo_loss`.
    """
    check_scalar("bco_pair_loss", "delta", delta)
    shift = delta.detach()
    return _beta_pair_loss(
        "bco_pair_loss", lambda chosen, rejected: -F.logsigmoid(chosen - shift) - F.logsigmoid(shift - rejected),
        policy_chosen_logps, policy_rejected_logps, reference_chosen_logps, reference_rejected_logps, beta)


def _length_normalised_log_ratios(function: str, policy_chosen_logps: Tensor, policy_rejected_logps: Tensor,
                                  reference_chosen_logps: Tensor, reference_rejected_logps: Tensor,
                                  chosen_lengths: Tensor, rejected_lengths: Tensor) -> tuple[Tensor, Tensor]:
    """(r_w/|y_w|, r_l/|y_l|), each (B,)."""
    chosen, rejected = paired_log_ratios(function, policy_chosen_logps, policy_rejected_logps,
                                         reference_chosen_logps, reference_rejected_logps)
    return mean_logps(function, chosen, chosen_lengths=chosen_lengths), mean_logps(function, rejected,
                                                                             rejected_lengths=rejected_lengths)


def ipo_loss(policy_chosen_logps: Tensor, policy_rejected_logps: Tensor, reference_chosen_logps: Tensor,
             reference_rejected_logps: Tensor, chosen_lengths: Tensor, rejected_lengths: Tensor, *,
             tau: float) -> LossOutput:
    """Identity Preference Optimization (Azar et al., 2024, Eq. 17) on length-averaged log-ratios:
    h = r_w/|y_w| − r_l/|y_l|, ℓ = (h − 1/(2τ))². A squared distance to a finite target instead of DPO's unbounded
    sigmoid margin; (1/(2τ))² at π_θ = π_ref.

    Args:
        policy_chosen_logps, ..., reference_rejected_logps: summed log-probs as in `dpo_loss`, each (B,).
        chosen_lengths, rejected_lengths: response token counts |y_w|, |y_l| (>= 1), each (B,).
        tau: regularisation τ > 0; the target margin is 1/(2τ).

    Returns:
        losses (B,); rewards r_w/|y_w| and r_l/|y_l| (log-ratios per token), each (B,), detached.
    """
    check_hyperparameters("ipo_loss", tau=(tau, POSITIVE))
    chosen, rejected = _length_normalised_log_ratios("ipo_loss", policy_chosen_logps, policy_rejected_logps,
                                                     reference_chosen_logps, reference_rejected_logps,
                                                     chosen_lengths, rejected_lengths)
    return LossOutput((chosen - rejected - 1 / (2 * tau)) ** 2, chosen.detach(), rejected.detach())


def dpo_norm_loss(policy_chosen_logps: Tensor, policy_rejected_logps: Tensor, reference_chosen_logps: Tensor,
                  reference_rejected_logps: Tensor, chosen_lengths: Tensor, rejected_lengths: Tensor, *,
                  beta: float) -> LossOutput:
    """Length-normalised DPO (the LN-DPO baseline of Meng et al., 2024): ℓ = −log σ(β·(r_w/|y_w| − r_l/|y_l|)),
    so a long response cannot win by its length alone. ln 2 at π_θ = π_ref.

    Args:
        policy_chosen_logps, ..., reference_rejected_logps: summed log-probs as in `dpo_loss`, each (B,).
        chosen_lengths, rejected_lengths: response token counts (>= 1), each (B,).
        beta: inverse temperature β > 0 on per-token log-ratios.

    Returns:
        losses (B,); rewards β·r/|y|, each (B,), detached.
    """
    check_hyperparameters("dpo_norm_loss", beta=(beta, POSITIVE))
    chosen, rejected = _length_normalised_log_ratios("dpo_norm_loss", policy_chosen_logps, policy_rejected_logps,
                                                     reference_chosen_logps, reference_rejected_logps,
                                                     chosen_lengths, rejected_lengths)
    return LossOutput(-F.logsigmoid(beta * (chosen - rejected)), *_scaled_rewards(beta, chosen, rejected))


def simpo_loss(policy_chosen_logps: Tensor, policy_rejected_logps: Tensor, chosen_lengths: Tensor,
               rejected_lengths: Tensor, *, beta: float, gamma: float) -> LossOutput:
    """SimPO (Meng et al., 2024, Eq. 6): ℓ = −log σ(β·logπ_θ(y_w|x)/|y_w| − β·logπ_θ(y_l|x)/|y_l| − γ).
    No reference model; γ is a target margin on the per-token reward.

    Args:
        policy_chosen_logps, policy_rejected_logps: summed log-probs, each (B,).
        chosen_lengths, rejected_lengths: response token counts (>= 1), each (B,).
        beta: reward scale β > 0.
        gamma: margin γ >= 0.

    Returns:
        losses (B,); rewards β·logπ_θ(y|x)/|y|, each (B,), detached.
    """
    check_hyperparameters("simpo_loss", beta=(beta, POSITIVE), gamma=(gamma, NONNEGATIVE))
    chosen = mean_logps("simpo_loss", policy_chosen_logps, chosen_lengths=chosen_lengths)
    rejected = mean_logps("simpo_loss", policy_rejected_logps, rejected_lengths=rejected_lengths)
    return LossOutput(-F.logsigmoid(beta * (chosen - rejected) - gamma), *_scaled_rewards(beta, chosen, rejected))


def orpo_loss(policy_chosen_logps: Tensor, policy_rejected_logps: Tensor, chosen_lengths: Tensor,
              rejected_lengths: Tensor, *, lambda_coef: float) -> LossOutput:
    """Odds-Ratio Preference Optimization (Hong et al., 2024, Eqs. 6-7): with p = exp(logπ_θ(y|x)/|y|) and
    odds(y) = p/(1 − p), ℓ = −logπ_θ(y_w|x)/|y_w| + λ·(−log σ(log odds(y_w) − log odds(y_l))).
    No reference model: the per-token NLL on the chosen response is the SFT term. log(1 − p) is computed stably
    (`log_odds`).

    Args:
        policy_chosen_logps, policy_rejected_logps: summed log-probs, each (B,).
        chosen_lengths, rejected_lengths: response token counts (>= 1), each (B,).
        lambda_coef: weight λ >= 0 of the odds-ratio term.

    Returns:
        losses (B,); rewards logπ_θ(y|x)/|y| (log-probs per token), each (B,), detached.
    """
    check_hyperparameters("orpo_loss", lambda_coef=(lambda_coef, NONNEGATIVE))
    chosen = mean_logps("orpo_loss", policy_chosen_logps, chosen_lengths=chosen_lengths)
    rejected = mean_logps("orpo_loss", policy_rejected_logps, rejected_lengths=rejected_lengths)
    odds_ratio_loss = -F.logsigmoid(log_odds(chosen) - log_odds(rejected))
    return LossOutput(-chosen + lambda_coef * odds_ratio_loss, chosen.detach(), rejected.detach())


def slic_loss(policy_chosen_logps: Tensor, policy_rejected_logps: Tensor, *, beta: float,
              lambda_coef: float) -> LossOutput:
    """SLiC-HF (Zhao et al., 2023): a rank-calibration hinge plus an NLL regulariser on y_w, no reference model.

    ℓ = max(0, β − logπ_θ(y_w|x) + logπ_θ(y_l|x)) + λ·(−logπ_θ(y_w|x)).

    Args:
        policy_chosen_logps, policy_rejected_logps: summed log-probs, each (B,).
        beta: margin β >= 0 in nats.
        lambda_coef: weight λ >= 0 of the regulariser.

    Returns:
        losses (B,); rewards are the detached policy log-probs, each (B,).
    """
    check_vectors("slic_loss", policy_chosen_logps=policy_chosen_logps, policy_rejected_logps=policy_rejected_logps)
    check_hyperparameters("slic_loss", beta=(beta, NONNEGATIVE), lambda_coef=(lambda_coef, NONNEGATIVE))
    hinge = torch.relu(beta - policy_chosen_logps + policy_rejected_logps)
    losses = hinge - lambda_coef * policy_chosen_logps
    return LossOutput(losses, policy_chosen_logps.detach(), policy_rejected_logps.detach())


def paired_reward_accuracies(chosen_rewards: Tensor, rejected_rewards: Tensor) -> Tensor:
    """1 where a chosen reward beats the rejected reward of its own pair, else 0.

    Args:
        chosen_rewards: shape (B,).
        rejected_rewards: shape (B,), row k is the partner of chosen row k.

    Returns:
        Accuracies as floats in {0, 1}, shape (B,).
    """
    check_vectors("paired_reward_accuracies", chosen_rewards=chosen_rewards, rejected_rewards=rejected_rewards)
    return (chosen_rewards > rejected_rewards).to(chosen_rewards.dtype)
