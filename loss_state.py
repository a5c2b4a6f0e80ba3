"""Statistics a loss keeps across optimizer steps (declared by a trainer's `loss_state_class`), saved in resumable
checkpoints and restored bit for bit."""
from typing import Dict

import torch

import distributed
from losses import LossOutput


class RunningRewardMean:
    """δ = the mean reward β·r of every training example (chosen and rejected) of all processes and all earlier
    optimizer steps; 0 before the first step. BCO's reward shift.

    A step's micro-batches are observed and only folded in when the step ends (`step`), summed over processes in
    float64: the δ a step reads depends on earlier steps alone, so it is the same for any number of processes and any
    split of the step into accumulation micro-batches. (TRL folds each batch in before using it, which makes δ depend
    on the micro-batch size.)
    """

    def __init__(self):
        self.total = torch.zeros((), dtype=torch.float64)
        self.count = torch.zeros((), dtype=torch.float64)
        self.pending = torch.zeros(2, dtype=torch.float64)  # (sum, count) observed in the current step

    @property
    def mean(self) -> torch.Tensor:
        """δ, shape (), float64 (on the CPU: a 0-dim tensor combines with tensors on any device)."""
        return self.total / self.count if self.count > 0 else torch.zeros((), dtype=torch.float64)

    def loss_inputs(self) -> Dict[str, torch.Tensor]:
        """What the loss function reads from this state: delta."""
        return {"delta": self.mean}

    def observe(self, output: LossOutput) -> None:
        """Adds one training micro-batch's rewards to the current step."""
        rewards = torch.cat((output.chosen_rewards, output.rejected_rewards)).detach().double()
        count = torch.tensor(float(rewards.numel()), dtype=torch.float64, device=rewards.device)
        self.pending = self.pending.to(rewards.device) + torch.stack((rewards.sum(), count))  # no device sync

    def step(self) -> None:
        """Folds the finished optimizer step's rewards, from every process, into the mean. Every rank calls this."""
        step_sum, step_count = distributed.all_reduce_sum(self.pending.to(distributed.device())).cpu()
        self.total, self.count = self.total + step_sum, self.count + step_count
        self.pending = torch.zeros(2, dtype=torch.float64)

    def state_dict(self) -> Dict[str, torch.Tensor]:
        return {"total": self.total.clone(), "count": self.count.clone()}

    def load_state_dict(self, state: Dict[str, torch.Tensor]) -> None:
        self.total, self.count = state["total"].clone(), state["count"].clone()
