"""Checkpoint files: `{step_idx, state, metrics}` dicts written atomically and read back without unpickling code.

Layout of a run directory (as in the original)::

    <cache_dir>/<exp_name>/config.yaml      resolved config
    <cache_dir>/<exp_name>/LATEST/policy.pt final policy (+ tokenizer files beside it and in the run directory)
    <cache_dir>/<exp_name>/step-<N>/...     intermediate checkpoints (N = training examples seen)
"""
import os
from pathlib import Path
from typing import Any, Dict, Mapping, Optional

import torch

from utils import HalosError


class CheckpointError(HalosError):
    """A checkpoint that cannot be read or does not fit the model."""


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
    """Reads a checkpoint written by save_checkpoint; refuses files that need arbitrary unpickling."""
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise CheckpointError(f"checkpoint {path} does not exist") from None
    except Exception as e:  # torch raises UnpicklingError or RuntimeError with a long explanation
        first_line = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise CheckpointError(f"cannot load checkpoint {path} safely (weights only): {first_line}") from None
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
