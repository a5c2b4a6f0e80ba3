"""Losses of scored feedback: a Bradley-Terry reward model on preference pairs, and offline GRPO on groups of scored
responses to one prompt. B sequences, T token positions; masks are True at response tokens.
"""
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor

from losses.checks import NONNEGATIVE, OPEN_UNIT, POSITIVE, check_hyperparameters, check_token_level, check_vectors, require
from losses.outputs import LossOutput


def bradley_terry_loss(chosen_scores: Tensor, rejected_scores: Tensor) -> LossOutput:
    """Bradley-Terry reward model (Bradley & Terry, 1952; Ouyang et al., 2022, Eq. 1): ℓ = −log σ(r_w − r_l), where
    r is the model's scalar score of a response, so that P(y_w ≻ y_l) = σ(r_w − r_l).

    Args:
        chosen_scores, rejected_scores: scores r_w, r_l of each pair's responses, shape (B,).

    Returns:
        losses (B,); the detached scores as chosen and rejected rewards, each (B,).
    """
    check_vectors("bradley_terry_loss", chosen_scores=chosen_scores, rejected_scores=rejected_scores)
    return LossOutput(-F.logsigmoid(chosen_scores - rejected_scores), chosen_scores.detach(), rejected_scores.detach())


def grpo_advantages(scores: Tensor, group_means: Tensor, group_stds: Tensor, *, epsilon: float) -> Tensor:
    """Group-normalised advantages (Shao et al., 2024, §4.1.2): A = (score − group mean) / (group std + ε).

    Args:
        scores: each response's scalar score, shape (B,).
        group_means, group_stds: mean and population standard deviation of the scores of all responses to the same
            prompt, shape (B,).
        epsilon: ε > 0; a group whose scores are all equal gets advantages 0 (not 0/0).

    Returns:
        Advantages, shape (B,), constant (no gradient).
    """
    check_vectors("grpo_advantages", scores=scores, group_means=group_means, group_stds=group_stds)
    check_hyperparameters("grpo_advantages", epsilon=(epsilon, POSITIVE))
    require(bool((group_stds >= 0).all()), "grpo_advantages: group_stds must be >= 0")
    return ((scores - group_means) / (group_stds + epsilon)).detach()


class GRPOLossOutput(NamedTuple):
    """The GRPO objective of a batch and per-sequence diagnostics.

    Attributes:
        loss: Σ_t ℓ_t over every response token of the batch divided by `token_count`, shape (), with gradient.
        losses: each sequence's mean ℓ_t over its tokens, shape (B,), detached.
        kl: each sequence's mean k3 KL estimate over its tokens, shape (B,), detached.
        clipped: each sequence's fraction of tokens whose ratio was clipped, shape (B,), detached.
    """

    loss: Tensor
    losses: Tensor
    kl: Tensor
    clipped: Tensor


def grpo_loss(policy_token_logps: Tensor, reference_token_logps: Tensor, mask: Tensor, advantages: Tensor,
              token_count: Tensor | float, *, beta: float, epsilon: float) -> GRPOLossOutput:
    """Offline GRPO (Shao et al., 2024, Eq. 3) with the reference model as the sampling policy.

    With ρ_t = exp(logπ_θ(y_t) − logπ_ref(y_t)) and the sequence's advantage A:
        ℓ_t = −min(ρ_t·A, clip(ρ_t, 1 − ε, 1 + ε)·A) + β·KL_t,
        KL_t = exp(logπ_ref − logπ_θ) − (logπ_ref − logπ_θ) − 1 (the k3 estimator, ≥ 0, with gradient),
    and loss = Σ_t ℓ_t / token_count over the response tokens: the token mean when token_count is their number.
    The caller chooses token_count so that the mean is over a whole optimizer step (trainers.GRPOTrainer).

    Args:
        policy_token_logps: logπ_θ of each token, shape (B, T), with gradient.
        reference_token_logps: logπ_ref of each token, shape (B, T); treated as constant.
        mask: shape (B, T), True at response tokens; every row has at least one.
        advantages: A of each sequence, shape (B,); treated as constant.
        token_count: the divisor of the summed token losses, > 0.
        beta: KL weight β >= 0.
        epsilon: clip range ε in (0, 1].

    Returns:
        GRPOLossOutput.
    """
    check_token_level("grpo_loss", policy_token_logps=policy_token_logps,
                      reference_token_logps=reference_token_logps, mask=mask)
    check_vectors("grpo_loss", advantages=advantages)
    require(advantages.size(0) == mask.size(0), f"grpo_loss: advantages has {advantages.size(0)} rows but mask "
                                                f"has {mask.size(0)}; they must match")
    check_hyperparameters("grpo_loss", beta=(beta, NONNEGATIVE), epsilon=(epsilon, OPEN_UNIT))
    mask = mask.bool()
    tokens = mask.sum(1)
    require(bool((tokens > 0).all()), "grpo_loss: every sequence needs at least one response token")
    log_ratios = torch.where(mask, policy_token_logps - reference_token_logps.detach(), 0.0)
    ratios = log_ratios.exp()
    advantage = advantages.detach().unsqueeze(1)
    unclipped, clipped = ratios * advantage, ratios.clamp(1 - epsilon, 1 + epsilon) * advantage
    kl = torch.exp(-log_ratios) + log_ratios - 1
    token_losses = torch.where(mask, -torch.min(unclipped, clipped) + beta * kl, 0.0)
    per_sequence = lambda values: (torch.where(mask, values, 0.0).sum(1) / tokens).detach()  # noqa: E731
    return GRPOLossOutput(token_losses.sum() / token_count, per_sequence(token_losses), per_sequence(kl),
                          per_sequence((clipped < unclipped).to(token_losses.dtype)))
