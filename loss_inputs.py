"""What a trainer hands its loss: each model's log-probs of each side of a batch, as small typed containers.

A `SequenceLogps` holds, per sequence, the summed log-prob of its response tokens and how many there are (so a loss
can average per token, as IPO, SimPO and ORPO do); per-token log-probs are filled in only for trainers that declare
`token_level_logps = True`, since a (N, T) tensor per model and side is memory a sequence-level loss never reads.
"""
from typing import NamedTuple, Optional

import torch
from torch import Tensor

from utils import IGNORE_INDEX


class SequenceLogps(NamedTuple):
    """One model's log-probs of N sequences.

    Attributes:
        logps: (N,) summed log-probs of each sequence's response tokens.
        lengths: (N,) number of response tokens of each sequence, in logps' dtype (>= 1 for real data).
        token_logps: (N, T) log p(token t | tokens < t) at response positions t of the batch's input rows and 0
            elsewhere; None unless the trainer asked for token-level log-probs.
        token_mask: (N, T) bool, True at response positions; None when token_logps is.
    """

    logps: Tensor
    lengths: Tensor
    token_logps: Optional[Tensor] = None
    token_mask: Optional[Tensor] = None

    def mean_logps(self) -> Tensor:
        """(N,) log-probs per response token."""
        return self.logps / self.lengths

    def rows(self, index) -> "SequenceLogps":
        """The sequences at `index` (a slice or an (N,) bool mask) of every field."""
        return SequenceLogps(*(None if field is None else field[index] for field in self))


class PairedLogps(NamedTuple):
    """One model's log-probs of B preference pairs: row k of `rejected` is the partner of row k of `chosen`."""

    chosen: SequenceLogps
    rejected: SequenceLogps


class UnpairedLogps(NamedTuple):
    """One model's log-probs of the desirable (n_chosen) and undesirable (n_rejected) rows of a batch."""

    chosen: SequenceLogps
    rejected: SequenceLogps


def response_lengths(labels: Tensor, dtype: torch.dtype) -> Tensor:
    """(N,) number of labelled positions of (N, T) labels (IGNORE_INDEX where no loss is taken)."""
    return (labels != IGNORE_INDEX).sum(1).to(dtype)
