"""Mixing datasets by ratio: per-dataset caps and weights applied to a loader's items, epoch by epoch.

Without weights or caps a loader's epoch is all its items, as in the original. With them, each dataset's items
form a pool (its first `max_examples` items in the shuffled order when capped); an epoch holds as many items as
the pools together, and dataset d contributes round(weight_d / sum of weights x that many) of them (every dataset
keeps its pool size when only caps are set). A dataset whose share exceeds its pool is oversampled: every item of
the pool comes `share // pool` times and a random `share % pool` of them once more; a smaller share is a random
subset, drawn afresh each epoch. All draws come from the loader's iteration RNG, so a seed fixes the mix and a
resumed run replays it exactly.
"""
import math
import random
from typing import Dict, List, Mapping, Optional, Sequence

from feedback.examples import DataError


class Mixture:
    """Per-dataset caps and weights over the items of one loader; `active` is False when there are neither."""

    def __init__(self, names: Sequence[str], weights: Optional[Mapping[str, float]] = None,
                 max_examples: Optional[Mapping[str, int]] = None):
        self.names = list(dict.fromkeys(names))
        self.weights = dict(weights or {})
        self.max_examples = dict(max_examples or {})
        self.active = bool(self.weights or self.max_examples)
        for key, values in (("dataset_weights", self.weights), ("dataset_max_examples", self.max_examples)):
            unknown = sorted(set(values) - set(self.names))
            if unknown:
                raise DataError(f"{key}: {unknown} not in datasets {self.names}")
        missing = [name for name in self.names if name not in self.weights]
        if self.weights and missing:
            raise DataError(f"dataset_weights: no weight for {missing}; give every dataset of datasets a weight")
        if not all(_is_number(w) and w > 0 for w in self.weights.values()):
            raise DataError(f"dataset_weights: every weight must be a positive number, got {self.weights}")
        if not all(isinstance(n, int) and not isinstance(n, bool) and n > 0 for n in self.max_examples.values()):
            raise DataError(f"dataset_max_examples: every cap must be a positive integer, got {self.max_examples}")

    def pools(self, items: List) -> Dict[str, List]:
        """Each dataset's items (in their current order) and its cap; items tell their dataset by `.example.source`."""
        pools = {name: [] for name in self.names}
        for item in items:
            pools[item.example.source].append(item)
        for name, pool in pools.items():
            if not pool:
                raise DataError(f"dataset '{name}' gives this loader no items to mix (does it have the feedback the "
                                f"loss needs?)")
            if name in self.max_examples:
                del pool[self.max_examples[name]:]
        return pools

    def shares(self, pool_sizes: Mapping[str, int]) -> Dict[str, int]:
        """Items per epoch of each dataset: its weight's share of all pools' items (largest remainders rounded up)."""
        if not self.weights:
            return dict(pool_sizes)
        total, weight_sum = sum(pool_sizes.values()), sum(self.weights.values())
        exact = {name: total * self.weights[name] / weight_sum for name in self.names}
        shares = {name: math.floor(value) for name, value in exact.items()}
        by_remainder = sorted(self.names, key=lambda name: (shares[name] - exact[name], self.names.index(name)))
        for name in by_remainder[:total - sum(shares.values())]:
            shares[name] += 1
        return shares

    def draw(self, pools: Mapping[str, List], rng: random.Random) -> List:
        """One epoch's items: each pool repeated or subsampled to its share, then shuffled together."""
        epoch = []
        for name, share in self.shares({name: len(pool) for name, pool in pools.items()}).items():
            pool = pools[name]
            copies, extra = divmod(share, len(pool))
            epoch += pool * copies + rng.sample(pool, extra)
        rng.shuffle(epoch)
        return epoch


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)
