"""Losses over single responses labelled desirable ("chosen", n_chosen rows) or undesirable ("rejected",
n_rejected rows); either class may be empty in a batch. r = logπ_θ(y|x) − logπ_ref(y|x).
"""
from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

from losses.checks import NONNEGATIVE, POSITIVE, check_hyperparameters, check_scalar, check_vectors, require
from losses.outputs import KTOLossOutput, LossOutput


def _unpaired_log_ratios(
    function: str,
    policy_chosen_logps: Tensor,
    policy_rejected_logps: Tensor,
    reference_chosen_logps: Tensor,
    reference_rejected_logps: Tensor,
) -> tuple[Tensor, Tensor]:
    """Validates unpaired inputs and returns (r_chosen (n_chosen,), r_rejected (n_rejected,))."""
    check_vectors(function, policy_chosen_logps=policy_chosen_logps, reference_chosen_logps=reference_chosen_logps)
    check_vectors(
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
    check_vectors("kto_kl_estimate", policy_kl_logps=policy_kl_logps, reference_kl_logps=reference_kl_logps)
    require(policy_kl_logps.numel() > 0, "kto_kl_estimate: needs at least one KL pair, got shape (0,)")
    return (policy_kl_logps - reference_kl_logps).mean().detach()


def kto_loss(policy_chosen_logps: Tensor, policy_rejected_logps: Tensor, reference_chosen_logps: Tensor,
             reference_rejected_logps: Tensor, kl_estimate: Tensor, *, beta: float, desirable_weight: float,
             undesirable_weight: float) -> KTOLossOutput:
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
    check_hyperparameters("kto_loss", beta=(beta, POSITIVE), desirable_weight=(desirable_weight, NONNEGATIVE),
                          undesirable_weight=(undesirable_weight, NONNEGATIVE))
    check_scalar("kto_loss", "kl_estimate", kl_estimate)
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


def simple_kto_loss(policy_chosen_logps: Tensor, policy_rejected_logps: Tensor, reference_chosen_logps: Tensor,
                    reference_rejected_logps: Tensor, *, beta: float) -> LossOutput:
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


def kto_zero_loss(policy_chosen_logps: Tensor, policy_rejected_logps: Tensor, reference_chosen_logps: Tensor,
                  reference_rejected_logps: Tensor, *, beta: float) -> LossOutput:
    """KTO with reference point 0: desirable ℓ = 1 − σ(β·r), undesirable ℓ = 1 − σ(−β·r). Also APO-zero for
    unpaired data (D'Oosterlinck et al., 2024). Inputs, outputs and β as in `simple_kto_loss`."""
    return _batch_reference_kto(
        "kto_zero_loss", policy_chosen_logps, policy_rejected_logps, reference_chosen_logps,
        reference_rejected_logps, beta=beta, reference_points=lambda chosen, rejected: (0.0, 0.0),
    )


ReferencePoints = Callable[[Tensor, Tensor], tuple[Tensor | float, Tensor | float]]


def _batch_reference_kto(function: str, policy_chosen_logps: Tensor, policy_rejected_logps: Tensor,
                         reference_chosen_logps: Tensor, reference_rejected_logps: Tensor, *, beta: float,
                         reference_points: ReferencePoints) -> LossOutput:
    """Shared body of the KTO variants whose reference points come from the batch itself (or are 0).

    `reference_points(chosen_ratios, rejected_ratios)` returns the (desirable, undesirable) reference points.
    """
    check_hyperparameters(function, beta=(beta, POSITIVE))
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


def bco_loss(policy_chosen_logps: Tensor, policy_rejected_logps: Tensor, reference_chosen_logps: Tensor,
             reference_rejected_logps: Tensor, delta: Tensor, *, beta: float) -> LossOutput:
    """Binary Classifier Optimization (Jung et al., 2024, Eq. 7): a logistic classifier of desirability whose
    logit is the implicit reward shifted by δ, a running mean of past rewards β·r (kept by the caller).

    desirable ℓ = −log σ(β·r − δ); undesirable ℓ = −log σ(−(β·r − δ)). ln 2 at π_θ = π_ref and δ = 0.

    Args:
        policy_chosen_logps, reference_chosen_logps: shape (n_chosen,); may be empty.
        policy_rejected_logps, reference_rejected_logps: shape (n_rejected,); may be empty.
        delta: reward shift δ, shape (); detached here.
        beta: inverse temperature β > 0.

    Returns:
        losses (n_chosen + n_rejected,), chosen first; detached rewards β·r per class.
    """
    check_hyperparameters("bco_loss", beta=(beta, POSITIVE))
    check_scalar("bco_loss", "delta", delta)
    chosen_ratios, rejected_ratios = _unpaired_log_ratios(
        "bco_loss", policy_chosen_logps, policy_rejected_logps, reference_chosen_logps, reference_rejected_logps
    )
    shift = delta.detach()
    losses = torch.cat((-F.logsigmoid(beta * chosen_ratios - shift), -F.logsigmoid(shift - beta * rejected_ratios)))
    return LossOutput(losses, beta * chosen_ratios.detach(), beta * rejected_ratios.detach())
