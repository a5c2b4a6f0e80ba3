"""Names in a config turned into classes and paths. A leaf module (it imports only `errors`), so that trainers,
checkpoints and the config check can all use it without importing one another."""
import importlib
import inspect
import os
from pathlib import Path
from typing import List, Optional

from errors import ConfigError


def resolve_class(spec: str, default_module: str) -> type:
    """`Name` is looked up in `default_module`; `pkg.module.Name` is imported. Raises ConfigError if absent."""
    module_name, _, class_name = spec.rpartition(".")
    try:
        module = importlib.import_module(module_name or default_module)
    except ImportError as e:
        raise ConfigError(f"cannot import module '{module_name}' for '{spec}': {e}") from None
    found = getattr(module, class_name, None)
    if not inspect.isclass(found):
        raise ConfigError(f"'{spec}' is not a class in {module.__name__}")
    return found


def candidate_paths(value: str, cache_dir: str) -> List[Path]:
    """Where a path from the config may be, in lookup order: absolute as given, else under cache_dir, then relative
    to the working directory (the original only joined paths onto cache_dir)."""
    return [Path(value)] if os.path.isabs(value) else [Path(cache_dir) / value, Path(value)]


def resolve_path(value: str, cache_dir: str) -> Optional[Path]:
    """The first of candidate_paths(value, cache_dir) that exists, or None."""
    return next((p for p in candidate_paths(value, cache_dir) if p.exists()), None)
