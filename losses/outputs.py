"""What a preference loss returns."""
from typing import NamedTuple

from torch import Tensor


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
