"""Likelihood terms: SFT's negative log-likelihood, length-averaged log-probs and ORPO's log-odds."""
import math

import torch
from torch import Tensor

from losses.checks import check_lengths, check_vectors

LOG_2 = math.log(2)


def sft_loss(policy_logps: Tensor) -> Tensor:
    """Negative log-likelihood per example, ℓ = −logπ_θ(y|x) (used by sft and csft).

    Args:
        policy_logps: summed response log-probs, shape (B,).

    Returns:
        Per-example losses, shape (B,).
    """
    check_vectors("sft_loss", policy_logps=policy_logps)
    return -policy_logps


def mean_logps(function: str, logps: Tensor, **lengths: Tensor) -> Tensor:
    """Log-probs per response token, logps / |y|, shape (B,); the one keyword (its name is used in errors) gives
    the (B,) response token counts (>= 1)."""
    (name, counts), = lengths.items()
    check_vectors(function, logps=logps, **lengths)
    check_lengths(function, **lengths)
    return logps / counts.to(logps.dtype)


def log_odds(logps: Tensor) -> Tensor:
    """log(p / (1 − p)) for log-probabilities logp < 0, stably: logp − log(1 − e^logp).

    log(1 − e^a) is log(−expm1(a)) near 0 (where 1 − e^a cancels) and log1p(−e^a) far below it. A log-prob that
    rounds to 0 (p = 1 in floating point) is moved to the largest value below 0, where the odds are finite.
    """
    logps = logps.clamp(max=-torch.finfo(logps.dtype).tiny)
    near_zero = logps > -LOG_2
    # Each branch gets only inputs in its own range, so the branch torch.where drops has finite gradients too.
    near = torch.log(-torch.expm1(torch.where(near_zero, logps, -LOG_2)))
    far = torch.log1p(-torch.exp(torch.where(near_zero, -LOG_2, logps)))
    return logps - torch.where(near_zero, near, far)
