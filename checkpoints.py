"""Checkpoints you can trust: atomic directories, exact resume, Hugging Face export, loading without pickled code.

Layout of a run directory (docs/checkpoints.md)::

    <cache_dir>/<exp_name>/config.yaml        resolved config
    <cache_dir>/<exp_name>/tokenizer files
    <cache_dir>/<exp_name>/LATEST/            the newest checkpoint: the policy's weights, once (policy.pt, or in an
                                              exported checkpoint a Hugging Face model: config.json,
                                              model.safetensors), v_head.pt for PPO, tokenizer files,
                                              trainer_state.pt; while the run goes on also optimizer.pt and
                                              scheduler.pt (resumable). The finished run's LATEST is exported.
    <cache_dir>/<exp_name>/step-<N>/          intermediate checkpoints (N = training examples seen)

Every .pt file is a `{step_idx, state, metrics}` dict of tensors and plain Python values, read back with
`torch.load(weights_only=True)`; Hugging Face weights are safetensors. A checkpoint directory is written next to its
target under a temporary name and renamed into place, so a crash leaves the previous one loadable.
"""
import os
import random
import re
import shutil
import signal
import tempfile
import threading
from pathlib import Path
from typing import Any, Callable, Dict, List, Mapping, NamedTuple, Optional

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf

from distributed import rank0_print
from errors import HalosError
from resolve import resolve_path

LATEST = "LATEST"
POLICY, V_HEAD, REFERENCE = "policy.pt", "v_head.pt", "reference.pt"  # reference.pt: humanline's synced reference
OPTIMIZER, SCHEDULER, TRAINER_STATE = "optimizer.pt", "scheduler.pt", "trainer_state.pt"
AUTO = "auto"  # resume_from value: this run's own LATEST when it is resumable
# The new checkpoint's weights and optimizer state (up to 2x the weights for Adam) beside the previous one's weights.
CHECKPOINT_SIZE_FACTOR = 3
# Settings that fix which batch comes next or what the saved optimizer state means: a resumed run must keep them.
RESUME_INVARIANT_KEYS = ("seed", "datasets", "model.name_or_path", "model.batch_size", "loss.name", "loss.dataloader",
                         "optimizer", "frac_unique_desirable", "frac_unique_undesirable", "model.use_peft",
                         "model.load_lora_from")
# They fix the data's order, or which parameters train and how (LoRA's settings).
RESUME_INVARIANT_PREFIXES = ("datasets.", "dataset_weights.", "dataset_max_examples.", "model.peft.")
# Settings that name the run rather than shape its training: changing them on resume is not worth a warning.
RUN_IDENTITY_KEYS = ("exp_name", "cache_dir", "local_run_dir", "resume_from", "saved_policy")


class CheckpointError(HalosError):
    """A checkpoint that cannot be read or does not fit the model, or a run directory that cannot hold one."""


# --- files -----------------------------------------------------------------------------------------------------


def save_checkpoint(path: Path, state: Mapping[str, Any], step_idx: int, metrics: Optional[Mapping[str, float]] = None) -> None:
    """Writes `{step_idx, state, metrics}` to `path` via a temporary file and an atomic rename.

    A crash mid-write leaves any previous file at `path` intact. Metrics are stored as plain floats so that the
    file loads with `torch.load(weights_only=True)`.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    payload = {"step_idx": int(step_idx), "state": dict(state),
               "metrics": {k: float(v) for k, v in (metrics or {}).items()}}
    tmp = path.with_name(f".{path.name}.tmp")
    torch.save(payload, tmp)
    os.replace(tmp, path)


def load_checkpoint(path: Path) -> Dict[str, Any]:
    """Reads a checkpoint written by save_checkpoint; refuses files that need arbitrary unpickling.

    Three failures get their own one-line CheckpointError: a missing file; a file torch.save did not write (or a
    truncated one), which is "not a checkpoint"; and a pickle that would construct other objects than tensors and
    plain values, which is refused before anything in it runs. torch's own message for the last two advises retrying
    with weights_only=False, which is unsafe and, for a file that is not a checkpoint, no help either.
    """
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise CheckpointError(f"checkpoint {path} does not exist") from None
    except Exception as e:  # torch raises UnpicklingError, RuntimeError, KeyError or EOFError
        refused = re.search(r"Unsupported global: GLOBAL (\S+)", str(e))
        if refused:
            raise CheckpointError(f"cannot load checkpoint {path} safely: loading it would call {refused[1]}, and a "
                                  "checkpoint may hold only tensors and plain values") from None
        raise CheckpointError(f"{path} is not a checkpoint: not a complete file written by torch.save") from None
    if not isinstance(payload, dict) or "state" not in payload:
        raise CheckpointError(f"{path} is not a HALOs checkpoint (expected a dict with 'state', 'step_idx', 'metrics')")
    return payload


def load_weights(model: torch.nn.Module, path: Path) -> Dict[str, Any]:
    """Loads a checkpoint's weights into `model` (strictly) and returns the checkpoint's metadata."""
    payload = load_checkpoint(path)
    try:
        result = model.load_state_dict(payload["state"], strict=False)
    except RuntimeError as e:  # tensor shape mismatches
        raise CheckpointError(f"{path} does not fit the model: {str(e).strip().splitlines()[-1].strip()}") from None
    if result.missing_keys or result.unexpected_keys:
        raise CheckpointError(
            f"{path} does not fit the model: {len(result.missing_keys)} missing keys (e.g. {result.missing_keys[:3]}), "
            f"{len(result.unexpected_keys)} unexpected keys (e.g. {result.unexpected_keys[:3]}); "
            "was it trained from a different model.name_or_path?")
    return {"step_idx": payload.get("step_idx"), "metrics": payload.get("metrics", {})}


# --- directories ---------------------------------------------------------------------------------------------


def _temporary(target: Path) -> Path:
    return target.with_name(f".{target.name}.tmp")


def _previous(target: Path) -> Path:
    return target.with_name(f".{target.name}.old")


def write_atomically(target: Path, write: Callable[[Path], None]) -> None:
    """Builds a checkpoint directory with `write(directory)` under a temporary name next to `target`, flushes it to
    disk, then puts it in place of `target`.

    The previous `target` is moved aside only once the new directory is complete and removed only once the new one
    is in place: a failed write removes the temporary directory and leaves the previous one untouched, a crash
    between the two renames leaves it under `.<name>.old`, which recover_interrupted_saves (run at every start)
    moves back.
    """
    tmp, previous = _temporary(target), _previous(target)
    shutil.rmtree(tmp, ignore_errors=True)  # left by a crash during an earlier save
    tmp.mkdir(parents=True)
    try:
        write(tmp)
        _fsync_tree(tmp)  # preemption may power the machine off right after the process exits
    except BaseException:  # a failed write (full disk, permissions) leaves nothing behind
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if target.exists():
        shutil.rmtree(previous, ignore_errors=True)
        os.rename(target, previous)
    os.rename(tmp, target)
    _fsync(target.parent)
    shutil.rmtree(previous, ignore_errors=True)


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_tree(directory: Path) -> None:
    for path in directory.rglob("*"):
        if path.is_file():
            _fsync(path)
    _fsync(directory)


def recover_interrupted_saves(run_dir: Path) -> None:
    """Undoes what a crash during write_atomically left in `run_dir`: a checkpoint moved aside but not yet replaced
    comes back; half-written temporary directories and leftovers of replaced checkpoints are removed."""
    for previous in run_dir.glob(".*.old"):
        target = run_dir / previous.name[1:-len(".old")]
        if target.exists():
            shutil.rmtree(previous)
        else:
            os.rename(previous, target)
            print(f"restored {target} (a save was interrupted after moving it aside)")
    for tmp in run_dir.glob(".*.tmp"):
        if tmp.is_dir():
            shutil.rmtree(tmp)


def step_dirs(run_dir: Path) -> List[Path]:
    """The run's step-<N> checkpoint directories, oldest (smallest N) first."""
    found = [p for p in run_dir.glob("step-*") if p.is_dir() and p.name[len("step-"):].isdigit()]
    return sorted(found, key=lambda p: int(p.name[len("step-"):]))


def prune_step_dirs(run_dir: Path, keep: Optional[int]) -> None:
    """Removes all but the newest `keep` step-<N> checkpoints (keep=None keeps them all)."""
    if keep is None:
        return
    for old in step_dirs(run_dir)[:-keep]:
        shutil.rmtree(old)


# --- Hugging Face export ---------------------------------------------------------------------------------------


def is_hf_model_dir(path: Path) -> bool:
    return path.is_dir() and (path / "config.json").is_file()


def export_hf(model: torch.nn.Module, state: Dict[str, torch.Tensor], directory: Path) -> None:
    """Writes `state`, the full weights of the Hugging Face causal LM `model`, as a model directory that
    AutoModelForCausalLM.from_pretrained (and so vLLM) loads: config.json, model.safetensors (sharded when large),
    generation_config.json. Run on the main process only: `state` is already gathered, nothing here is collective."""
    model.save_pretrained(directory, state_dict=state, is_main_process=True)
    # Hugging Face writes weight files through mkstemp (mode 0600); give them the mode of every other file here,
    # so that a server running as another user (vLLM) can read them.
    umask = os.umask(0)
    os.umask(umask)
    for path in directory.glob("*.safetensors"):
        path.chmod(0o666 & ~umask)


# --- resuming --------------------------------------------------------------------------------------------------


class ResumePoint(NamedTuple):
    """A checkpoint to continue from and its trainer_state.pt state."""
    directory: Path
    state: Dict[str, Any]  # counters, RNG states, last eval, wandb_run_id, finished, config (see trainers.py)


def rng_states() -> Dict[str, Any]:
    """Python, numpy, torch CPU and (when present) CUDA RNG states, as values torch.load(weights_only=True) reads."""
    kind, keys, position, has_gauss, gauss = np.random.get_state()
    return {"python": random.getstate(), "torch": torch.get_rng_state(),
            "numpy": (kind, torch.from_numpy(keys.astype(np.int64)), position, has_gauss, gauss),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []}


def restore_rng_states(states: Mapping[str, Any]) -> None:
    kind, keys, position, has_gauss, gauss = states["numpy"]
    random.setstate(states["python"])
    np.random.set_state((kind, keys.numpy().astype(np.uint32), position, has_gauss, gauss))
    torch.set_rng_state(states["torch"])
    if states["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(states["cuda"])


def read_trainer_state(directory: Path) -> Optional[Dict[str, Any]]:
    """The trainer_state.pt state of a checkpoint directory, or None when it has none (written before resuming
    existed)."""
    path = directory / TRAINER_STATE
    return load_checkpoint(path)["state"] if path.is_file() else None


def checkpoint_info(directory: Path) -> Dict[str, Any]:
    """`{step_idx, metrics}` of a checkpoint directory: the examples it was trained on and its last evaluation's
    metrics, from trainer_state.pt (every checkpoint has one), else from a policy.pt written before it had."""
    path = directory / TRAINER_STATE if (directory / TRAINER_STATE).is_file() else directory / POLICY
    payload = load_checkpoint(path)
    return {"step_idx": payload["step_idx"], "metrics": payload["metrics"]}


def find_resume_point(config: DictConfig) -> Optional[ResumePoint]:
    """The checkpoint this run continues from (resume_from), or None for a fresh start.

    * null: a fresh start; refused when this run's LATEST is resumable (the run would overwrite it), announced when
      it holds a finished run (the new run replaces it).
    * auto: this run's LATEST when it holds one, else a fresh start. A finished LATEST is returned too, so that a
      job restarted after its run finished does nothing instead of training again.
    * a path (run directory or checkpoint directory): its resumable, unfinished checkpoint.
    """
    own = Path(config.local_run_dir) / LATEST
    if config.resume_from in (None, AUTO):
        state = read_trainer_state(own) if own.is_dir() else None
        if config.resume_from == AUTO and state is not None:
            return ResumePoint(own, checked_state(state, config, own))
        if state is not None and not state["finished"]:
            raise CheckpointError(f"resume_from: {own} holds a resumable checkpoint after {state['example_counter']} "
                                  f"examples; pass ++resume_from=auto to continue that run, or choose another "
                                  f"exp_name (or delete {own}) to start over")
        if own.is_dir():
            rank0_print(f"warning: {own} holds a finished run; this run replaces it when it saves")
        return None
    location = resolve_path(str(config.resume_from), config.cache_dir)
    directory = location / LATEST if (location / LATEST).is_dir() else location
    state = read_trainer_state(directory)
    if state is None or not (directory / OPTIMIZER).is_file() and not state["finished"]:
        missing = TRAINER_STATE if state is None else f"{OPTIMIZER}: an intermediate checkpoint holds weights only"
        raise CheckpointError(f"resume_from: {directory} holds no resumable checkpoint (no {missing}); start a new "
                              f"run from it with ++model.load_from={directory}")
    if state["finished"]:
        raise CheckpointError(f"resume_from: {directory} is the end of a finished run ({state['example_counter']} "
                              f"examples): there is nothing to resume; start a new run from it with "
                              f"++model.load_from={directory}")
    return ResumePoint(directory, checked_state(state, config, directory))


def checked_state(state: Dict[str, Any], config: DictConfig, directory: Path) -> Dict[str, Any]:
    """`state` after comparing the config it was saved with to this one: a changed RESUME_INVARIANT_KEYS setting
    is a CheckpointError, other changes are printed."""
    saved, current = _flatten(state["config"]), _flatten(OmegaConf.to_container(config, resolve=True))
    changed = sorted(k for k in saved.keys() | current.keys()
                     if saved.get(k) != current.get(k) and k.split(".")[0] not in RUN_IDENTITY_KEYS)
    fixed = [k for k in changed if k in RESUME_INVARIANT_KEYS or k.startswith(RESUME_INVARIANT_PREFIXES)]
    if fixed:
        raise CheckpointError(f"resume_from: {directory} was trained with other values of "
                              f"{', '.join(f'{k} ({saved.get(k)!r}, now {current.get(k)!r})' for k in fixed)}; "
                              "a resumed run must keep them")
    if changed:
        rank0_print("warning: resuming with changed settings: "
                    + ", ".join(f"{k}: {saved.get(k)!r} -> {current.get(k)!r}" for k in changed))
    return state


def _flatten(tree: Any, prefix: str = "") -> Dict[str, Any]:
    if isinstance(tree, dict):
        return {k: v for key, value in tree.items() for k, v in _flatten(value, f"{prefix}{key}.").items()}
    if isinstance(tree, list):
        return {k: v for i, value in enumerate(tree) for k, v in _flatten(value, f"{prefix}{i}.").items()}
    return {prefix[:-1]: tree}


# --- startup checks --------------------------------------------------------------------------------------------


def nearest_existing(path: Path) -> Path:
    """`path` or its closest ancestor that exists."""
    return next(p for p in (path, *path.parents) if p.exists())


def check_run_dir_writable(run_dir: Path) -> None:
    """Proves that the run directory can be created and written, creating nothing, so that an unwritable cache_dir
    fails before anything loads while a run that fails its config or data checks leaves no directory behind.

    The probe is a temporary file in the run directory when it exists, else a temporary directory in its closest
    existing ancestor, removed at once (os.access would not see a read-only file system or an ACL).
    """
    try:
        if run_dir.is_dir():
            with tempfile.NamedTemporaryFile(dir=run_dir, prefix=".write-test-"):
                pass
        else:
            ancestor = nearest_existing(run_dir)
            if not ancestor.is_dir():
                raise NotADirectoryError(20, f"{ancestor} is a file")
            os.rmdir(tempfile.mkdtemp(dir=ancestor, prefix=".write-test-"))
    except OSError as e:
        raise CheckpointError(f"cache_dir: cannot write the run directory {run_dir}: {e.strerror or e}") from None


def check_free_space(run_dir: Path, model: torch.nn.Module) -> None:
    """Raises CheckpointError when `run_dir`'s disk cannot hold one more checkpoint of `model` (the previous one
    stays until the new one is complete): CHECKPOINT_SIZE_FACTOR times its weights."""
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    needed, free = CHECKPOINT_SIZE_FACTOR * weights, shutil.disk_usage(nearest_existing(run_dir)).free
    if free < needed:
        raise CheckpointError(f"cache_dir: {run_dir} has {free / 2**30:.2f} GiB free, but a checkpoint of this model "
                              f"needs about {needed / 2**30:.2f} GiB (weights x{CHECKPOINT_SIZE_FACTOR}: the previous "
                              "checkpoint and the optimizer state); free some space or point cache_dir elsewhere")


# --- preemption ------------------------------------------------------------------------------------------------


class StopRequests:
    """Turns SIGTERM and SIGINT into a request that the training loop reads between optimizer steps.

    The first signal is recorded and the previous handlers come back, so a second one acts as usual (SIGINT raises
    KeyboardInterrupt, SIGTERM ends the process at once). Handlers can only be installed from the main thread;
    elsewhere signals keep their usual effect.
    """

    SIGNALS = (signal.SIGTERM, signal.SIGINT)

    def __init__(self):
        self.signal_number: Optional[int] = None
        self.previous_handlers: Dict[int, Any] = {}

    def __enter__(self) -> "StopRequests":
        if threading.current_thread() is threading.main_thread():
            self.previous_handlers = {s: signal.signal(s, self.handle) for s in self.SIGNALS}
        return self

    def __exit__(self, *exc_info) -> None:
        self.restore_handlers()

    def handle(self, signal_number: int, frame) -> None:
        # Nothing is printed here: the signal may have interrupted a write to the same stream (tqdm's), and a
        # reentrant write raises.
        self.signal_number = signal_number
        self.restore_handlers()

    def restore_handlers(self) -> None:
        for signal_number, handler in self.previous_handlers.items():
            signal.signal(signal_number, handler if handler is not None else signal.SIG_DFL)
        self.previous_handlers = {}

    @property
    def requested(self) -> bool:
        return self.signal_number is not None
