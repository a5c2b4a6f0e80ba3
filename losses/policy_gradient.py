"""Token-level policy-gradient losses (offline PPO): B sequences, T token positions, V vocabulary; masks are
True (or 1) at response tokens.
"""
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor

from losses.checks import NONNEGATIVE, OPEN_UNIT, UNIT_INTERVAL, check_hyperparameters, check_token_level, require


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
    require(
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
    check_token_level("whiten", values=values, mask=mask)
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
    check_token_level("gae_advantages", values=values, rewards=rewards, mask=mask)
    check_hyperparameters("gae_advantages", gamma=(gamma, UNIT_INTERVAL), lam=(lam, UNIT_INTERVAL))
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
    check_token_level("ppo_policy_loss", logps=logps, old_logps=old_logps, advantages=advantages, mask=mask)
    check_hyperparameters("ppo_policy_loss", cliprange=(cliprange, OPEN_UNIT))
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
    check_token_level("ppo_critic_loss", values=values, targets=targets, mask=mask)
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
    check_token_level(
        "ppo_loss",
        logps=logps,
        values=values,
        old_logps=old_logps,
        reference_logps=reference_logps,
        advantages=advantages,
        critic_targets=critic_targets,
        mask=mask,
    )
    check_hyperparameters("ppo_loss", critic_coef=(critic_coef, NONNEGATIVE), kl_coef=(kl_coef, NONNEGATIVE))
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
    require(logits.dim() == 3, f"entropy_from_logits: logits must have shape (B, T, V), got {tuple(logits.shape)}")
    require(
        logits.shape[:2] == mask.shape,
        f"entropy_from_logits: mask has shape {tuple(mask.shape)} but logits have (B, T) = {tuple(logits.shape[:2])}",
    )
    entropies = torch.logsumexp(logits, dim=-1) - (torch.softmax(logits, dim=-1) * logits).sum(dim=-1)
    return masked_mean(entropies, mask)
