"""Helpers that tests/test_distributed.py runs inside training processes (one, or several under a process group).

The trainers here are the framework's own with two observers added: every logged optimizer step's metrics are
appended, unrounded, to <run_dir>/steps.jsonl, and the saved policy's logits (a reward model's scores) on a fixed
probe are written beside the checkpoint. They are selected like any user trainer:
`loss.trainer=distributed_worker.RecordingDPOTrainer` (with tests/ on PYTHONPATH). `python tests/distributed_worker.py RUN_DIR RUN_DIR` prints how far two recorded runs differ.
"""
import json
import sys
from pathlib import Path
from typing import Dict, List, Sequence, Tuple

import peft
import torch
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf
from transformers import AutoConfig, AutoModelForCausalLM

import distributed
import trainers
from models import RewardModel
from train import train
from utils import REPO_ROOT
from weights import read_policy_state

PROBE_IDS = torch.arange(2, 50).reshape(3, 16)  # (3, 16) token ids the saved policy is probed with
STEP_IDS = torch.arange(7, 87).reshape(4, 20)  # (4, 20) token ids of the global batch of resume_observations
STEPS_FILE, PROBE_FILE, ONE_STEP_FILE = "steps.jsonl", "probe_logits.pt", "one_step.pt"


class StepRecorder:
    """Trainer mixin: full-precision per-step metrics and probe logits for comparing runs (rank 0 writes)."""

    def log_train_metrics(self, metrics: Dict[str, list], progress) -> None:
        if self.is_main:
            means = {k: sum(v) / len(v) for k, v in metrics.items() if v}
            with open(self.run_dir / STEPS_FILE, "a") as f:
                f.write(json.dumps(means) + "\n")
        super().log_train_metrics(metrics, progress)

    def save_checkpoint(self, kind: str) -> Path:
        output_dir = super().save_checkpoint(kind)
        self.policy.eval()
        probe = PROBE_IDS.to(self.device)
        with torch.no_grad():  # every rank takes part: a sharded forward gathers each block's weights
            # A reward model's probe is its (3,) scores; a causal LM's its logits.
            output = self.policy(probe, torch.ones_like(probe)) if isinstance(self.policy, RewardModel) else \
                self.policy(probe, use_cache=False).logits
        if self.is_main:
            torch.save(output.cpu(), output_dir / PROBE_FILE)
        return output_dir


def recording_trainer(loss: str) -> str:
    """The name of a class here that records `loss`'s trainer (config/loss/<loss>.yaml), made on first use."""
    trainer = OmegaConf.load(REPO_ROOT / "config" / "loss" / f"{loss}.yaml").trainer
    name = f"Recording{trainer}"
    if name not in globals():
        globals()[name] = type(name, (StepRecorder, getattr(trainers, trainer)), {})
    return name


# Every trainer a recorded run may use exists at import, so that spawned processes find it by name too.
for _loss_file in sorted((REPO_ROOT / "config" / "loss").glob("*.yaml")):
    recording_trainer(_loss_file.stem)


def recorded_run_overrides(loss: str, exp_name: str, cache_dir: Path) -> List[str]:
    """Command-line overrides of a small recorded run of `loss` on the tiny model (16 examples, 4 steps), in float64
    so that runs summing in different orders agree to ~1e-13 and the comparisons hold on any CPU."""
    return [f"loss={loss}", "model=tiny", "datasets=[hh]", "mode=train", f"exp_name={exp_name}",
            f"cache_dir={cache_dir}", f"loss.trainer=distributed_worker.{recording_trainer(loss)}",
            "wandb.enabled=false", "n_epochs=null", "n_examples=16", "n_eval_examples=8", "model.batch_size=4",
            "model.eval_batch_size=4", "minimum_log_interval_secs=0", "lr=1e-4", "warmup_steps=1",
            "model.max_length=64", "model.max_prompt_length=32", "model.policy_dtype=float64",
            "model.reference_dtype=float64"]


def run_recorded(loss: str, exp_name: str, cache_dir: Path, extra: Sequence[str] = ()) -> Path:
    """Trains in this process (alone, or as one rank of a process group); returns the final checkpoint directory."""
    with initialize_config_dir(config_dir=str(REPO_ROOT / "config"), version_base=None):
        config = compose(config_name="config",
                         overrides=recorded_run_overrides(loss, exp_name, cache_dir) + list(extra))
    return train(config, loss)


def read_steps(run_dir: Path) -> List[Dict[str, float]]:
    with open(run_dir / STEPS_FILE) as f:
        return [json.loads(line) for line in f]


def tiny_model(dtype: torch.dtype = torch.float32) -> torch.nn.Module:
    """The tiny Llama with seeded random weights (identical in every process)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        return AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(REPO_ROOT / "assets" / "tiny-llama"),
                                                dtype=dtype)


def collective_observations() -> Dict[str, list]:
    """Gathers where ranks hold different numbers of rows (rank 0: 3 rows, rank 1: none) and a mean over ranks."""
    rank = distributed.rank()
    rows = torch.arange(6.0).reshape(3, 2) if rank == 0 else torch.empty(0, 2)
    return {
        "rows": distributed.all_gather_if_needed(rows).tolist(),
        "ragged": distributed.all_gather_if_needed(torch.arange(rank + 1.0)).tolist(),
        "scalars": distributed.all_gather_if_needed(torch.tensor(rank + 0.5)).tolist(),
        "mean": distributed.all_reduce_mean(torch.tensor([rank + 1.0, 10.0 * rank])).tolist(),
    }


def state_dict_observations() -> Dict[str, float]:
    """Keys of the full state dict of a sharded model on this rank, and its largest difference from the weights
    before sharding (rank 0 only)."""
    model = tiny_model()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    distributed.shard_model(model, "LlamaDecoderLayer", None)
    full = distributed.full_state_dict(model)
    same_keys = set(full) == set(before)
    return {"n_keys": len(full), "same_keys": same_keys,
            "max_diff": max((full[k] - before[k]).abs().max().item() for k in full) if same_keys else None}


def checkpointing_observations() -> Dict[str, float]:
    """One training step of the sharded tiny model with and without HF activation checkpointing: how often the
    first block's attention runs (HF checkpoints the block's forward inside FSDP's hooks, so the recompute shows
    in its submodules), and the largest difference between the two runs' gradients."""
    ids = torch.arange(2, 42).reshape(2, 20) + 40 * distributed.rank()
    calls, grads = {}, {}
    for checkpointing in (False, True):
        model = tiny_model()
        if checkpointing:
            model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        distributed.shard_model(model, "LlamaDecoderLayer", None)
        model.train()
        calls[checkpointing] = 0

        def count_call(*_, key=checkpointing):
            calls[key] += 1

        model.model.layers[0].self_attn.register_forward_pre_hook(count_call)
        model(ids, labels=ids, use_cache=False).loss.backward()
        grads[checkpointing] = {n: p.grad.full_tensor() for n, p in model.named_parameters()}
    return {"attention_calls_plain": calls[False], "attention_calls_checkpointed": calls[True],
            "grad_max_diff": max((grads[True][n] - grads[False][n]).abs().max().item() for n in grads[True])}


def optimizer_step(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> None:
    """One step on this rank's rows of STEP_IDS (all of them in one process); equal-length rows, so the mean of the
    ranks' mean losses is the mean loss of the whole batch."""
    rows = STEP_IDS.size(0) // distributed.world_size()
    ids = STEP_IDS[rows * distributed.rank(): rows * (distributed.rank() + 1)]
    model(ids, labels=ids, use_cache=False).loss.backward()
    optimizer.step()
    optimizer.zero_grad()


def sharded_model_and_optimizer() -> Tuple[torch.nn.Module, torch.optim.Optimizer]:
    model = distributed.shard_model(tiny_model(), "LlamaDecoderLayer", None)
    return model, torch.optim.RMSprop(model.parameters(), lr=1e-3)


def resume_observations(cache_dir: Path) -> Dict[str, float]:
    """One step of the sharded tiny model, whose full weights and optimizer state rank 0 saves to ONE_STEP_FILE;
    then a fresh sharded model and optimizer loaded from those states take the same second step as the original.
    Returns the largest weight difference between the two after that step."""
    model, optimizer = sharded_model_and_optimizer()
    optimizer_step(model, optimizer)
    state = {"weights": distributed.full_state_dict(model),
             "optimizer": distributed.full_optimizer_state_dict(model, optimizer)}
    if distributed.is_main_process():
        torch.save(state, cache_dir / ONE_STEP_FILE)
    resumed, resumed_optimizer = sharded_model_and_optimizer()
    distributed.load_full_state_dict(resumed, state["weights"])
    distributed.load_full_optimizer_state_dict(resumed, resumed_optimizer, state["optimizer"])
    optimizer_step(model, optimizer)
    optimizer_step(resumed, resumed_optimizer)
    return {"resumed_max_diff": max((a.full_tensor() - b.full_tensor()).abs().max().item()
                                    for a, b in zip(model.parameters(), resumed.parameters()))}


def lora_resume_observations() -> Dict[str, object]:
    """resume_observations for a sharded LoRA model, its checkpoint state gathered and loaded for the trainable
    adapters only (as the Checkpointer does): the gathered keys, and the largest difference of any parameter (base
    or adapter) between the original and the resumed model after the second step."""
    def adapted_model_and_optimizer(seed: int):
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)  # new adapters differ by rank and by model: loading must overwrite them all
            model = peft.get_peft_model(tiny_model(), peft.LoraConfig(r=4, lora_alpha=8, target_modules="all-linear"))
        distributed.shard_model(model, "LlamaDecoderLayer", None)
        return model, torch.optim.RMSprop([p for p in model.parameters() if p.requires_grad], lr=1e-3)

    model, optimizer = adapted_model_and_optimizer(seed=distributed.rank())
    optimizer_step(model, optimizer)
    weights = distributed.full_state_dict(model, trainable_only=True)
    optimizer_state = distributed.full_optimizer_state_dict(model, optimizer)
    # Read before loading: torch's loader fills the frozen entries into the dict it is given.
    saved_keys, optimizer_keys = sorted(weights), sorted(optimizer_state.get("state", {}))
    resumed, resumed_optimizer = adapted_model_and_optimizer(seed=2 + distributed.rank())
    distributed.load_full_state_dict(resumed, weights if distributed.is_main_process() else {}, trainable_only=True)
    distributed.load_full_optimizer_state_dict(resumed, resumed_optimizer,
                                               optimizer_state if distributed.is_main_process() else {})
    optimizer_step(model, optimizer)
    optimizer_step(resumed, resumed_optimizer)
    return {"saved_keys": saved_keys, "optimizer_keys": optimizer_keys,
            "resumed_max_diff": max((a.full_tensor() - b.full_tensor()).abs().max().item()
                                    for a, b in zip(model.parameters(), resumed.parameters()))}


def two_process_session(cache_dir: Path, runs: Sequence[Tuple[str, str, Sequence[str]]]) -> None:
    """Everything the tests need from one 2-process group (starting processes is the slow part): each rank writes
    its observations to <cache_dir>/observations-<rank>.json, then the recorded (loss, exp_name, extra) runs."""
    observations = {"collectives": collective_observations(), "state_dict": state_dict_observations(),
                    "checkpointing": checkpointing_observations(), "resume": resume_observations(cache_dir),
                    "lora_resume": lora_resume_observations()}
    with open(cache_dir / f"observations-{distributed.rank()}.json", "w") as f:
        json.dump(observations, f)
    for loss, exp_name, extra in runs:
        run_recorded(loss, exp_name, cache_dir, extra)


def compare_runs(one_dir: Path, other_dir: Path) -> Dict[str, float]:
    """Largest absolute differences between two recorded runs: per-step train loss and grad norm, final weights."""
    steps = list(zip(read_steps(one_dir), read_steps(other_dir)))
    one_weights, other_weights = (read_policy_state(d / "LATEST") for d in (one_dir, other_dir))
    return {"steps": len(steps),
            **{f"max |diff| {key}": max(abs(a[key] - b[key]) for a, b in steps) for key in ("loss/train", "grad_norm")},
            "max |diff| weights": max((one_weights[k] - other_weights[k]).abs().max().item() for k in one_weights)}


if __name__ == "__main__":
    # python tests/distributed_worker.py RUN_DIR RUN_DIR: the figures quoted in docs/distributed.md
    print(json.dumps(compare_runs(Path(sys.argv[1]), Path(sys.argv[2])), indent=1))
