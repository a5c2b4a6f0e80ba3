"""Humanline (Liu et al., 2025): a loss's sequence rewards built from token log-ratios clamped to
[log_epsilon_P, log_epsilon_R] (losses.humanline_log_ratios), and its reference model re-synced to the policy every
`sync_freq` optimizer steps. Trainers that offer it declare `humanline_capable` (their losses read the log-ratios
r = logπ_θ − logπ_ref alone: DPO, KTO); `loss.humanline: true` turns it on (docs/online.md).
"""
from typing import List, NamedTuple, Optional

import torch
from omegaconf import DictConfig

import losses
from loss_inputs import SequenceLogps

RULES = {"log_epsilon_P": losses.NONPOSITIVE, "log_epsilon_R": losses.NONNEGATIVE, "sync_freq": losses.POSITIVE_INT}
KEYS = ("humanline", *RULES)  # the loss config keys of a trainer that offers humanline


class Humanline(NamedTuple):
    """A run's humanline settings (config.loss)."""

    log_epsilon_P: float
    log_epsilon_R: float
    sync_freq: int  # optimizer steps between two syncs of the reference model to the policy

    @classmethod
    def from_loss_config(cls, loss_config: DictConfig) -> Optional["Humanline"]:
        """The settings when loss.humanline is true, else None."""
        if not loss_config.get("humanline", False):
            return None
        return cls(loss_config.log_epsilon_P, loss_config.log_epsilon_R, loss_config.sync_freq)

    def log_ratio_sides(self, policy: NamedTuple, reference: NamedTuple):
        """(policy, reference) containers (PairedLogps or UnpairedLogps) for a loss of r alone: the policy side
        holds each sequence's summed clamped log-ratios, the reference side zeros, so that r is exactly their sum."""
        def clamped(mine: SequenceLogps, theirs: SequenceLogps) -> SequenceLogps:
            ratios = losses.humanline_log_ratios(mine.token_logps, theirs.token_logps, mine.token_mask,
                                                 log_epsilon_P=self.log_epsilon_P, log_epsilon_R=self.log_epsilon_R)
            return SequenceLogps(ratios.sum(1), mine.lengths)

        sides = [clamped(mine, theirs) for mine, theirs in zip(policy, reference)]
        zeros = [SequenceLogps(torch.zeros_like(side.logps), side.lengths) for side in sides]
        return type(policy)(*sides), type(reference)(*zeros)

    def sync_due(self, update_counter: int) -> bool:
        """Whether the reference model takes the policy's weights after optimizer step `update_counter`."""
        return update_counter % self.sync_freq == 0


def config_problems(trainer_name: str, capable: bool, config: DictConfig) -> List[str]:
    """`key: problem` lines for the humanline keys of config.loss (none when loss.humanline is false)."""
    enabled = config.loss.get("humanline", False)
    if not isinstance(enabled, bool):
        return [f"loss.humanline: expected true or false, got {enabled!r}"]
    if not enabled:
        return []
    if not capable:
        return [f"loss.humanline: {trainer_name} offers no humanline variant (DPO and KTO do)"]
    problems = [f"loss.{key}: {problem}" for key, rule in RULES.items()
                if (problem := losses.rule_problem(rule, config.loss.get(key)))]
    if config.model.get("use_peft") is True:
        problems.append("model.use_peft: humanline re-syncs a reference model of its own to the policy; a LoRA run's "
                        "reference is the policy with its adapters disabled; use one or the other")
    if config.cache_reference_logprobs is True:
        problems.append("cache_reference_logprobs: humanline re-syncs the reference model to the policy, so its "
                        "log-probs change and cannot be cached")
    return problems
