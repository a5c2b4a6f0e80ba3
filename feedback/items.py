"""Items, what a dataloader flattens its Examples into (one row of a batch each), and the helpers that pick them
from an Example's generations, pairs, desirability flags and scores."""
import math
from dataclasses import dataclass
from fractions import Fraction
from typing import Dict, List, NamedTuple, Optional, Tuple

import numpy as np

from feedback.examples import DataError, Example
from feedback.tokenization import CHOSEN, REJECTED, EncodedExample

GROUP_KEYS = ("score", "group_mean", "group_std")  # a scored response's batch keys (ScoredGroupDataLoader)
PROMPT_MESSAGES_KEY = "prompt_messages"  # an SFT element's prompt as [{"role", "content"}] (eval.py samples keep it)


@dataclass(frozen=True)
class Item:
    """What a loader flattens an Example into: one row of a batch."""
    encoded: EncodedExample

    @property
    def example(self) -> Example:
        return self.encoded.example


@dataclass(frozen=True)
class LabelledResponse(Item):
    """One response (a generation index) with its feedback label (`CHOSEN` = desirable, `REJECTED` = undesirable)."""
    index: int
    status: str


@dataclass(frozen=True)
class PreferencePair(Item):
    """A preferred and a dispreferred response (generation indices) to the same prompt."""
    chosen: int
    rejected: int


@dataclass(frozen=True)
class ScoredResponse(Item):
    """One scored response (a generation index) with the mean and population standard deviation of the scores of
    its prompt's group (every scored response to that prompt), from which GRPO's advantage follows."""
    index: int
    score: float
    group_mean: float
    group_std: float


class ItemParts(NamedTuple):
    """An item's token ids before truncation: the prompt (with any control token) and each response by prefix."""
    encoded: EncodedExample
    control_ids: Tuple[int, ...]
    responses: Dict[str, np.ndarray]


def checked_index(example: Example, index: Optional[int], role: str) -> int:
    """`index` as a non-negative index into the example's generations, with an error naming the example."""
    if index is None or not -len(example.generations) <= index < len(example.generations):
        raise DataError(f"{example.describe()}: {role} index {index} is out of range for its "
                        f"{len(example.generations)} generations")
    return index % len(example.generations)


def binary_labels(example: Example) -> List[Tuple[int, str]]:
    """(generation index, status) of every generation of an example with binary feedback."""
    if len(example.desirable) != len(example.generations):
        raise DataError(f"{example.describe()}: {len(example.desirable)} desirable flags for "
                        f"{len(example.generations)} generations")
    return [(index, CHOSEN if desirable else REJECTED) for index, desirable in enumerate(example.desirable)]


def higher_scores_are_better(example: Example) -> bool:
    """Reads the score direction off the example's pairs (SHP upvotes: higher; OASST ranks: lower)."""
    scores = example.scores
    directions = {scores[i] > scores[j] for i, j in example.pairs if scores[i] != scores[j]}
    if len(directions) != 1:
        problem = "disagree on it" if directions else "are missing or tied"
        raise DataError(f"{example.describe()}: cannot tell whether higher scores are better: its pairs {problem}")
    return directions.pop()


def best_and_worst(example: Example) -> Tuple[int, int]:
    """Indices of the best- and worst-scored generations of an example."""
    if not example.scores or len(example.scores) != len(example.generations):
        raise DataError(f"{example.describe()}: ScoreUnaryDataLoader needs one score per generation, it has "
                        f"{len(example.scores)} scores for {len(example.generations)} generations")
    indices = range(len(example.generations))
    best, worst = (max, min) if higher_scores_are_better(example) else (min, max)
    return best(indices, key=example.scores.__getitem__), worst(indices, key=example.scores.__getitem__)


def scored_responses(encoded: EncodedExample) -> List[ScoredResponse]:
    """Every generation of a scored example with its group's statistics, scores oriented so that higher is better
    (read off the example's pairs when it has any, as for OASST ranks; scored-feedback rows are higher-is-better)."""
    example = encoded.example
    if len(example.scores) != len(example.generations):
        raise DataError(f"{example.describe()}: group losses need one score per generation, it has "
                        f"{len(example.scores)} scores for {len(example.generations)} generations (scored feedback "
                        f"rows give them: prompt, completion, score)")
    sign = 1.0 if not example.pairs or higher_scores_are_better(example) else -1.0
    scores = [sign * float(score) for score in example.scores]
    mean = math.fsum(scores) / len(scores)
    std = math.sqrt(math.fsum((score - mean) ** 2 for score in scores) / len(scores))
    return [ScoredResponse(encoded, index, score, mean, std) for index, score in enumerate(scores)]


def kept_count(available: int, fraction: float) -> int:
    """How many of `available` items a kept fraction allows, rounded up as in the original.

    Exact arithmetic on the float's value, so 10 x 0.3 gives 3 (float multiplication gives 3.0000000000000004).
    """
    return math.ceil(Fraction(fraction) * available)
