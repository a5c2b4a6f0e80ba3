"""Humanline clipping (Liu et al., 2025, "Humanline: Online Alignment as Perceptual Loss"): token log-ratios of the
policy to the reference model clamped to [log ε_P, log ε_R] before a loss sees them. A clamped token passes no
gradient, so no single token's probability can run far from the reference's between two syncs of the reference.
"""
import torch
from torch import Tensor

from losses.checks import check_token_level, require


def humanline_log_ratios(policy_token_logps: Tensor, reference_token_logps: Tensor, mask: Tensor, *,
                         log_epsilon_P: float, log_epsilon_R: float) -> Tensor:
    """Per-token log-ratios clamped to [log_epsilon_P, log_epsilon_R] (zero off the mask).

    Args:
        policy_token_logps: logπ_θ of each token, shape (B, T), with gradient.
        reference_token_logps: logπ_ref of each token, shape (B, T); treated as constant.
        mask: shape (B, T), True at response tokens.
        log_epsilon_P: lower bound, <= 0.
        log_epsilon_R: upper bound, >= 0.

    Returns:
        The clamped log-ratios, shape (B, T).
    """
    check_token_level("humanline_log_ratios", policy_token_logps=policy_token_logps,
                      reference_token_logps=reference_token_logps, mask=mask)
    require(log_epsilon_P <= 0 <= log_epsilon_R,
            f"humanline_log_ratios: need log_epsilon_P <= 0 <= log_epsilon_R, got {log_epsilon_P}, {log_epsilon_R}")
    log_ratios = (policy_token_logps - reference_token_logps.detach()).clamp(log_epsilon_P, log_epsilon_R)
    return torch.where(mask.bool(), log_ratios, 0.0)
