"""Helpers that tests/test_distributed.py runs inside training processes (one, or several under a process group).

The trainers here are the framework's own with two observers added: every logged optimizer step's metrics are
appended, unrounded, to <run_dir>/steps.jsonl, and the saved policy's logits on a fixed probe are written beside the
checkpoint. They are selected like any user trainer: `loss.trainer=distributed_worker.RecordingDPOTrainer`.
"""
import json
from pathlib import Path
from typing import Dict, List, Sequence, Tuple

import torch
from hydra import compose, initialize_config_dir

import trainers
from train import train
from utils import REPO_ROOT

PROBE_IDS = torch.arange(2, 50).reshape(3, 16)  # (3, 16) token ids the saved policy is probed with
STEPS_FILE, PROBE_FILE = "steps.jsonl", "probe_logits.pt"


class StepRecorder:
    """Trainer mixin: full-precision per-step metrics and probe logits for comparing runs (rank 0 writes)."""

    def log_train_metrics(self, metrics: Dict[str, list], progress) -> None:
        if self.is_main:
            means = {k: sum(v) / len(v) for k, v in metrics.items() if v}
            with open(self.run_dir / STEPS_FILE, "a") as f:
                f.write(json.dumps(means) + "\n")
        super().log_train_metrics(metrics, progress)

    def save(self, output_dir=None, metrics=None) -> Path:
        output_dir = super().save(output_dir, metrics)
        self.policy.eval()
        with torch.no_grad():  # every rank takes part: a sharded forward gathers each block's weights
            logits = self.policy(PROBE_IDS.to(self.device), use_cache=False).logits
        if self.is_main:
            torch.save(logits.cpu(), output_dir / PROBE_FILE)
        return output_dir


class RecordingSFTTrainer(StepRecorder, trainers.SFTTrainer):
    pass


class RecordingDPOTrainer(StepRecorder, trainers.DPOTrainer):
    pass


class RecordingKTOTrainer(StepRecorder, trainers.KTOTrainer):
    pass


class RecordingKTOZeroTrainer(StepRecorder, trainers.KTOZeroTrainer):
    pass


RECORDING_TRAINERS = {"sft": "RecordingSFTTrainer", "dpo": "RecordingDPOTrainer", "kto": "RecordingKTOTrainer",
                      "kto-zero": "RecordingKTOZeroTrainer"}


def recorded_run_overrides(loss: str, exp_name: str, cache_dir: Path) -> List[str]:
    """Command-line overrides of a small recorded run of `loss` on the tiny model (16 examples, 4 steps)."""
    return [f"loss={loss}", "model=tiny", "datasets=[hh]", "mode=train", f"exp_name={exp_name}",
            f"cache_dir={cache_dir}", f"loss.trainer=distributed_worker.{RECORDING_TRAINERS[loss]}",
            "wandb.enabled=false", "n_epochs=null", "n_examples=16", "n_eval_examples=8", "model.batch_size=4",
            "model.eval_batch_size=4", "minimum_log_interval_secs=0", "lr=1e-3", "warmup_steps=1",
            "model.max_length=96", "model.max_prompt_length=48"]


def run_recorded(loss: str, exp_name: str, cache_dir: Path, extra: Sequence[str] = ()) -> Path:
    """Trains in this process (alone, or as one rank of a process group); returns the final checkpoint directory."""
    with initialize_config_dir(config_dir=str(REPO_ROOT / "config"), version_base=None):
        config = compose(config_name="config", overrides=recorded_run_overrides(loss, exp_name, cache_dir) + list(extra))
    return train(config, loss)


def run_recorded_many(runs: Sequence[Tuple[str, str, Sequence[str]]], cache_dir: Path) -> None:
    """Several (loss, exp_name, extra overrides) runs one after another, in one process group (for spawn)."""
    for loss, exp_name, extra in runs:
        run_recorded(loss, exp_name, cache_dir, extra)


def read_steps(run_dir: Path) -> List[Dict[str, float]]:
    with open(run_dir / STEPS_FILE) as f:
        return [json.loads(line) for line in f]
