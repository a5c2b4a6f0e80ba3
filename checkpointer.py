"""The checkpoint component of a training run: writes a trainer's state into the run directory and restores it.

The trainer decides when (BasicTrainer.train) and hands over what (`BasicTrainer.training_state()`, a TrainingState);
the Checkpointer decides how: which files, gathered from every process, written atomically (checkpoints.py), and on
resume read back through the weights loader (weights.py) and handed to `BasicTrainer.load_training_state`. Layout
and guarantees: docs/checkpoints.md.
"""
from pathlib import Path
from typing import Any, Dict, NamedTuple, Optional

import torch
from omegaconf import DictConfig, OmegaConf

import checkpoints
import distributed
import lora
import weights
from checkpoints import LATEST, OPTIMIZER, POLICY, REFERENCE, SCHEDULER, TRAINER_STATE, CheckpointError, save_checkpoint
from console import say
from models import is_sequence_classifier

KINDS = ("intermediate", "resumable", "final")
RESUME_ONLY = (REFERENCE,)  # weights a resumed run needs that are no result of it (humanline's synced reference)


class TrainingState(NamedTuple):
    """Everything a checkpoint holds of a trainer.

    `values` is the one place plain training state flows through: counters, the last evaluation, the wandb run id,
    and whatever a subclass adds (a loss's running statistics, say). It must be tensors and plain Python values, so
    that trainer_state.pt loads with torch.load(weights_only=True); restoring gives the saved dict back to
    `load_training_state`.
    """

    weights: Dict[str, torch.nn.Module]  # checkpoint file name -> module whose weights it holds (policy.pt: the LM)
    model: torch.nn.Module  # the module the optimizer steps (the policy; PPO's includes its value head)
    optimizer: Optional[torch.optim.Optimizer]  # None before training starts
    scheduler: Optional[torch.optim.lr_scheduler.LRScheduler]
    values: Dict[str, Any]  # must hold example_counter (the step of every file) and last_eval_metrics


class Checkpointer:
    """Writes `step-<N>` and `LATEST` checkpoints of a run and restores resumable ones.

    Every process calls `save` and `restore` together (under FSDP the weights and optimizer state are gathered to
    rank 0, which writes, and sent back out from rank 0 on restore).
    """

    def __init__(self, config: DictConfig, tokenizer, is_main: bool = True):
        self.config = config
        self.tokenizer = tokenizer
        self.is_main = is_main
        self.run_dir = Path(config.local_run_dir)
        self.latest = self.run_dir / LATEST
        self.resumable_at: Optional[int] = None  # examples of the newest resumable LATEST, written or resumed from

    def save(self, state: TrainingState, kind: str) -> Path:
        """Writes a checkpoint of `kind` and returns its directory.

        * intermediate: `step-<N>` (N = examples seen) with the weights and tokenizer; the newest
          keep_last_checkpoints are kept.
        * resumable: `LATEST` with also optimizer.pt and scheduler.pt: everything `restore` needs.
        * final: `LATEST` of the finished run.
        The policy's weights are written once: as a Hugging Face export in the final checkpoint and, with
        export_intermediate, in every checkpoint; as policy.pt otherwise. A LoRA policy's are its adapters
        (adapter_config.json + adapter_model.safetensors), with the merged model exported beside them. RESUME_ONLY
        weights go into resumable checkpoints only. trainer_state.pt (counters, metrics, RNG states, config) is in
        every checkpoint.
        """
        if kind not in KINDS:
            raise ValueError(f"checkpoint kind must be one of {KINDS}, got {kind!r}")
        step = state.values["example_counter"]
        metrics = state.values["last_eval_metrics"]
        directory = self.run_dir / f"step-{step}" if kind == "intermediate" else self.latest
        exported = kind == "final" or self.config.export_intermediate
        # A LoRA policy's frozen base is never gathered: resuming and merging rebuild it from the config.
        module_states = {name: distributed.full_state_dict(module, trainable_only=lora.is_adapted(module))
                         for name, module in state.weights.items() if kind == "resumable" or name not in RESUME_ONLY}
        optimizer_state = distributed.full_optimizer_state_dict(state.model, state.optimizer) \
            if kind == "resumable" else None
        if self.is_main:
            def write(target: Path) -> None:
                for name, module_state in module_states.items():
                    module = state.weights[name]
                    if lora.is_adapted(module):
                        lora.write_adapters(module, module_state, target)
                        if exported:
                            self.export_merged(target)
                    elif name == POLICY and exported:
                        checkpoints.export_hf(module, module_state, target)
                    else:
                        save_checkpoint(target / name, module_state, step, metrics)
                if optimizer_state is not None:
                    save_checkpoint(target / OPTIMIZER, optimizer_state, step)
                    save_checkpoint(target / SCHEDULER, state.scheduler.state_dict(), step)
                trainer_state = {**state.values, "rng": checkpoints.rng_states(), "finished": kind == "final",
                                 "config": OmegaConf.to_container(self.config, resolve=True)}
                save_checkpoint(target / TRAINER_STATE, trainer_state, step, metrics)
                self.tokenizer.save_pretrained(target)

            self.write_or_explain(directory, write, step)
            say(f"saved {kind} checkpoint after {step} examples to {directory}")
            if kind == "intermediate":
                checkpoints.prune_step_dirs(self.run_dir, self.config.keep_last_checkpoints)
        distributed.barrier()
        if kind == "resumable":
            self.resumable_at = step
        return directory

    def export_merged(self, directory: Path) -> None:
        """Exports the adapters written to `directory`, merged into the run's base model, as a Hugging Face model
        there. The base is rebuilt on the CPU as training built it (model.load_from or model.name_or_path, the same
        seed; in full precision for QLoRA), so that vLLM or AutoModelForCausalLM serve the trained policy (a reward
        model's: AutoModelForSequenceClassification)."""
        with torch.random.fork_rng(devices=[]):  # a resumed run must find the generators as this run leaves them
            merged = weights.merge_into_base(directory, self.config, len(self.tokenizer))
        if is_sequence_classifier(merged):  # a reward model pools at the last token that is not the pad token
            merged.config.pad_token_id = self.tokenizer.pad_token_id
        checkpoints.export_hf(merged, merged.state_dict(), directory)

    def write_or_explain(self, directory: Path, write, step: int) -> None:
        """checkpoints.write_atomically, with a failure of the file system (an unwritable or full run directory)
        turned into one line that says what survives."""
        try:
            checkpoints.write_atomically(directory, write)
        except OSError as e:
            raise CheckpointError(f"cannot write the checkpoint after {step} examples to {directory}: "
                                  f"{e.strerror or e}{f' ({e.filename})' if e.filename else ''}. "
                                  f"{self.last_good()}") from None

    def last_good(self) -> str:
        """A sentence naming the checkpoint a failed run can continue from."""
        if self.resumable_at is None:
            return "No resumable checkpoint was written yet"
        return (f"Nothing else is lost: {self.latest} (after {self.resumable_at} examples) is the last good "
                "checkpoint; continue with ++resume_from=auto")

    def restore(self, state: TrainingState, directory: Path) -> Dict[str, Any]:
        """Loads a resumable checkpoint into `state`'s modules, optimizer and scheduler (in place) and the RNG
        states, and returns the saved `values` for load_training_state."""
        saved = checkpoints.load_checkpoint(directory / TRAINER_STATE)["state"]
        policy_weights = weights.find_weights(directory)
        if policy_weights is None:
            raise CheckpointError(f"{directory} holds no policy weights (neither {POLICY}, a Hugging Face export nor "
                                  "LoRA adapters)")

        def main_state(name: str, module: Optional[torch.nn.Module] = None) -> Dict:
            """The full state of one file, or of `module`'s weights (a LoRA policy's: its adapters), read on rank 0
            only (the other ranks receive their shards from it)."""
            if not self.is_main:
                return {}
            if module is not None and lora.is_adapted(module):
                return lora.read_adapters(module, directory)
            if name == POLICY:
                return policy_weights.state_dict(self.config.model)
            return checkpoints.load_checkpoint(directory / name)["state"]

        try:
            for name, module in state.weights.items():
                distributed.load_full_state_dict(module, main_state(name, module),
                                                 trainable_only=lora.is_adapted(module))
            distributed.load_full_optimizer_state_dict(state.model, state.optimizer, main_state(OPTIMIZER))
            state.scheduler.load_state_dict(checkpoints.load_checkpoint(directory / SCHEDULER)["state"])
        except (RuntimeError, KeyError) as e:  # torch's mismatch messages run over many lines
            reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise CheckpointError(f"{directory} does not fit this run: {reason}") from None
        checkpoints.restore_rng_states(saved["rng"])
        self.resumable_at = saved["example_counter"]
        return {key: value for key, value in saved.items() if key not in ("rng", "finished", "config")}
