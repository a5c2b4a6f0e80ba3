"""A training run crashed in the middle and resumed with resume_from=auto, for comparing with an uninterrupted run."""
from pathlib import Path
from typing import Callable, Tuple

import pytest

import trainers
from checkpoints import read_trainer_state
from train import train


def crash_and_resume(compose: Callable[..., object], loss: str, monkeypatch,
                     crash_before_batch: int) -> Tuple[int, Path]:
    """Trains `compose()` until just before batch `crash_before_batch`, where a crash (KeyboardInterrupt) stops it,
    then the same run with resume_from=auto. Returns the examples of the checkpoint it resumed from and the final
    checkpoint directory. `compose(*overrides)` builds the run's config."""
    real = trainers.BasicTrainer.train_on_batch

    def crashing(self, batch, metrics, pending):
        if self.batch_counter == crash_before_batch:
            raise KeyboardInterrupt("crash")
        return real(self, batch, metrics, pending)

    monkeypatch.setattr(trainers.BasicTrainer, "train_on_batch", crashing)
    config = compose()
    with pytest.raises(KeyboardInterrupt):
        train(config, loss)
    monkeypatch.setattr(trainers.BasicTrainer, "train_on_batch", real)
    resumed_from = read_trainer_state(Path(config.local_run_dir) / "LATEST")["example_counter"]
    return resumed_from, train(compose("resume_from=auto"), loss)
