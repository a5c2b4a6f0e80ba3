"""Input checks shared by the loss functions, and the hyperparameter rules trainers declare for the config check."""
from typing import Callable, NamedTuple

from torch import Tensor

from errors import HalosError


class LossInputError(HalosError):
    """A loss function got tensors of the wrong shape or an out-of-range hyperparameter."""


class Rule(NamedTuple):
    """A constraint on one hyperparameter: `holds(value)` and how to say it ("> 0", "in [0, 0.5)")."""

    description: str
    holds: Callable[[float], bool]


POSITIVE = Rule("> 0", lambda value: value > 0)
NONNEGATIVE = Rule(">= 0", lambda value: value >= 0)
NONPOSITIVE = Rule("<= 0", lambda value: value <= 0)
UNIT_INTERVAL = Rule("in [0, 1]", lambda value: 0 <= value <= 1)
HALF_OPEN_HALF = Rule("in [0, 0.5)", lambda value: 0 <= value < 0.5)  # robust DPO divides by 1 - 2ε
CLOSED_HALF = Rule("in [0, 0.5]", lambda value: 0 <= value <= 0.5)
OPEN_UNIT = Rule("in (0, 1]", lambda value: 0 < value <= 1)
POSITIVE_INT = Rule("a positive integer", lambda value: isinstance(value, int) and value > 0)


def rule_problem(rule: Rule, value) -> str:
    """'' if `value` is a number satisfying `rule`, else what is wrong with it."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        expected = rule.description if rule.description.startswith("a ") else f"a number {rule.description}"
        return f"expected {expected}, got {value!r}"
    return "" if rule.holds(value) else f"must be {rule.description}, got {value}"


def require(condition: bool, message: str) -> None:
    if not condition:
        raise LossInputError(message)


def check_hyperparameters(function: str, **values: tuple) -> None:
    """Each keyword is `name=(value, rule)`; raises LossInputError naming the first value that breaks its rule."""
    for name, (value, rule) in values.items():
        problem = rule_problem(rule, value)
        require(not problem, f"{function}: {name} {problem}")


_SHAPE_NAMES = {1: "(B,)", 2: "(B, T)"}


def check_shapes(function: str, dims: int, **tensors: Tensor) -> None:
    """Checks that every tensor has `dims` dimensions and that all share one shape."""
    (first_name, first), *others = tensors.items()
    for name, tensor in tensors.items():
        require(tensor.dim() == dims,
                f"{function}: {name} must have shape {_SHAPE_NAMES[dims]}, got {tuple(tensor.shape)}")
    for name, tensor in others:
        require(tensor.shape == first.shape, f"{function}: {name} has shape {tuple(tensor.shape)} but {first_name} "
                                             f"has {tuple(first.shape)}; they must match")


def check_vectors(function: str, **tensors: Tensor) -> None:
    check_shapes(function, 1, **tensors)


def check_token_level(function: str, **tensors: Tensor) -> None:
    check_shapes(function, 2, **tensors)


def check_scalar(function: str, name: str, value: Tensor) -> None:
    require(value.dim() == 0, f"{function}: {name} must be a scalar tensor, got shape {tuple(value.shape)}")


def check_lengths(function: str, **lengths: Tensor) -> None:
    """Response token counts must be positive: a length-normalised log-prob of an empty response is undefined."""
    for name, tensor in lengths.items():
        require(bool((tensor > 0).all()), f"{function}: every entry of {name} must be >= 1 response token")
