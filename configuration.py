"""Config checks that run once, before any model or dataset loads, and report every problem together.

The YAML files are the schema: a key that is not in config/config.yaml, config/model/base_model.yaml or the chosen
config/loss/<name>.yaml is an error, so a misspelt `++loss.betta=0.2` fails at once instead of being ignored.
"""
import difflib
import inspect
from pathlib import Path
from typing import Iterable, List, Optional, Sequence, Set

import torch
import yaml
from omegaconf import DictConfig, OmegaConf

import data_config
import dataloader
import trainers
from errors import ConfigError
from resolve import resolve_class, resolve_path
from utils import REPO_ROOT

CONFIG_DIR = REPO_ROOT / "config"
STRUCTURAL_KEYS = {"defaults", "hydra"}
CONFIG_GROUPS = {"model", "loss"}  # top-level keys filled by the defaults list
TRAIN_MODES = ("train",)


def yaml_keys(path: Path) -> Set[str]:
    """Top-level keys of a YAML config file (without Hydra's own `defaults`/`hydra`)."""
    with open(path) as f:
        return set(yaml.safe_load(f) or {}) - STRUCTURAL_KEYS


def unknown_keys(prefix: str, present: Iterable[str], known: Set[str]) -> List[str]:
    problems = []
    for key in sorted(set(present) - known):
        close = difflib.get_close_matches(key, known, n=1)
        hint = f" (did you mean {prefix}{close[0]}?)" if close else ""
        problems.append(f"{prefix}{key}: unknown key{hint}")
    return problems


def _interpolated_keys(config: DictConfig, prefix: str = "") -> Set[str]:
    """Dotted keys whose value is an interpolation like ${exp_name} (read before the config is resolved)."""
    keys = set()
    for key in config.keys():
        if OmegaConf.is_interpolation(config, key):
            keys.add(f"{prefix}{key}")
        elif isinstance(config._get_node(key), DictConfig):
            keys |= _interpolated_keys(config._get_node(key), f"{prefix}{key}.")
    return keys


def is_positive_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value > 0


def _check_schema(config: DictConfig, loss_choice: str, search_dirs: Sequence[str]) -> List[str]:
    # Interpolations of a missing key (local_run_dir: ${cache_dir}/${exp_name}) are not reported themselves.
    derived = _interpolated_keys(config)
    OmegaConf.resolve(config)
    problems = [f"{key}: required but not set (pass {key}=...)" for key in sorted(OmegaConf.missing_keys(config))
                if key not in derived]
    problems += unknown_keys("", config.keys(), yaml_keys(CONFIG_DIR / "config.yaml") | CONFIG_GROUPS)
    problems += unknown_keys("model.", config.model.keys(), yaml_keys(CONFIG_DIR / "model" / "base_model.yaml"))
    problems += unknown_keys("wandb.", config.wandb.keys(), {"enabled", "entity", "project"})
    loss_file = next((f for d in (CONFIG_DIR, *map(Path, search_dirs)) if (f := d / "loss" / f"{loss_choice}.yaml").exists()),
                     None)
    if loss_file is not None:
        problems += unknown_keys("loss.", config.loss.keys(), yaml_keys(loss_file))
    for key in ("name", "trainer", "dataloader", "use_reference_model"):
        if key not in config.loss:
            problems.append(f"loss.{key}: required in every loss config")
    return problems


def _check_classes(config: DictConfig) -> List[str]:
    problems = []
    for key, module, base in (("trainer", "trainers", trainers.BasicTrainer),
                              ("dataloader", "dataloader", dataloader.DataLoader)):
        if key not in config.loss:
            continue  # reported by the schema check
        try:
            cls = resolve_class(str(config.loss[key]), module)
        except ConfigError as e:
            problems.append(f"loss.{key}: {e}")
            continue
        if not issubclass(cls, base):
            problems.append(f"loss.{key}: {cls.__name__} is not a subclass of {base.__name__}")
        elif key == "trainer":
            problems += cls.config_problems(config)
    problems += data_config.config_problems(config)
    return problems


def _check_values(config: DictConfig, n_processes: int) -> List[str]:
    problems = []
    model = config.model
    for key in ("batch_size", "eval_batch_size", "gradient_accumulation_steps", "max_length", "max_prompt_length"):
        if not is_positive_int(model[key]):
            problems.append(f"model.{key}: expected a positive integer, got {model[key]!r}")
    for key in ("batch_size", "eval_batch_size"):
        if is_positive_int(model[key]) and model[key] % n_processes:
            problems.append(f"model.{key}: {model[key]} does not divide over {n_processes} processes")
    if is_positive_int(model.max_length) and is_positive_int(model.max_prompt_length) \
            and model.max_prompt_length >= model.max_length:
        problems.append(f"model.max_prompt_length: {model.max_prompt_length} must be below "
                        f"model.max_length={model.max_length} so every response keeps at least one token")
    for key in ("policy_dtype", "reference_dtype", "fsdp_policy_mp"):
        value = model[key]
        if not (value is None and key == "fsdp_policy_mp") and not isinstance(getattr(torch, str(value), None), torch.dtype):
            problems.append(f"model.{key}: '{value}' is not a torch dtype (e.g. float32, bfloat16)")
    optimizer = getattr(torch.optim, str(config.optimizer), None)
    if not (inspect.isclass(optimizer) and issubclass(optimizer, torch.optim.Optimizer)):
        problems.append(f"optimizer: '{config.optimizer}' is not a torch.optim optimizer (e.g. RMSprop, AdamW)")
    if not isinstance(config.lr, (int, float)) or config.lr <= 0:
        problems.append(f"lr: expected a positive number, got {config.lr!r}")
    if not isinstance(config.warmup_steps, int) or config.warmup_steps < 0:
        problems.append(f"warmup_steps: expected an integer >= 0, got {config.warmup_steps!r}")
    if config.n_epochs is None and config.n_examples is None:
        problems.append("n_epochs: n_epochs and n_examples are both null; set at least one")
    for key in ("n_epochs", "n_examples", "n_eval_examples"):
        if config[key] is not None and not is_positive_int(config[key]):
            problems.append(f"{key}: expected a positive integer or null, got {config[key]!r}")
    if not is_positive_int(config.eval_every):
        problems.append(f"eval_every: expected a positive integer, got {config.eval_every!r}")
    elif is_positive_int(model.batch_size) and config.eval_every < model.batch_size:
        problems.append(f"eval_every: {config.eval_every} is smaller than model.batch_size={model.batch_size}")
    for key in ("frac_unique_desirable", "frac_unique_undesirable"):
        if not isinstance(config[key], (int, float)) or not 0 < config[key] <= 1:
            problems.append(f"{key}: expected a fraction in (0, 1], got {config[key]!r}")
    if model.load_from is not None and resolve_path(str(model.load_from), config.cache_dir) is None:
        problems.append(f"model.load_from: {model.load_from} not found (looked under cache_dir={config.cache_dir} "
                        f"and the working directory)")
    return problems


def _check_checkpoint_options(config: DictConfig) -> List[str]:
    """resume_from, checkpoint_every, keep_last_checkpoints, export_intermediate, model.trust_remote_code
    (docs/checkpoints.md)."""
    problems = [f"{key}: expected a positive integer or null, got {config[key]!r}"
                for key in ("checkpoint_every", "keep_last_checkpoints")
                if config[key] is not None and not is_positive_int(config[key])]
    problems += [f"{key}: expected true or false, got {value!r}"
                 for key, value in (("export_intermediate", config.export_intermediate),
                                    ("model.trust_remote_code", config.model.trust_remote_code))
                 if not isinstance(value, bool)]
    resume_from = config.resume_from
    if resume_from not in (None, "auto") and resolve_path(str(resume_from), config.cache_dir) is None:
        problems.append(f"resume_from: {resume_from} not found (looked under cache_dir={config.cache_dir} and the "
                        "working directory); pass auto to continue this run, or a run directory")
    return problems


def _check_speed_options(config: DictConfig) -> List[str]:
    """pack_sequences and cache_reference_logprobs (docs/performance.md)."""
    problems = [f"{key}: expected true or false, got {config[key]!r}"
                for key in ("pack_sequences", "cache_reference_logprobs") if not isinstance(config[key], bool)]
    if config.cache_reference_logprobs is True and "trainer" in config.loss:
        try:
            trainer = resolve_class(str(config.loss.trainer), "trainers")
        except ConfigError:
            return problems  # reported by the class check
        if issubclass(trainer, trainers.BasicTrainer) and trainer.requires_reference_model \
                and not trainer.caches_reference_logps():
            problems.append(f"cache_reference_logprobs: {trainer.__name__} reads reference log-probs the cache does not "
                            "hold (PPO's or a token-level loss's per-token log-probs), so they cannot be cached")
    return problems


def validate_train_config(config: DictConfig, loss_choice: str, n_processes: int = 1,
                          search_dirs: Sequence[str] = ()) -> List[str]:
    """Resolves and checks a composed training config; returns warnings and raises ConfigError listing every problem.

    Also rounds eval_every down to a multiple of model.batch_size (evaluation happens between batches), as the
    original does, and reports that as a warning.
    """
    problems = _check_schema(config, loss_choice, search_dirs)
    if not OmegaConf.is_missing(config, "mode") and config.mode not in TRAIN_MODES:
        problems.append(f"mode: train.py needs mode=train, got '{config.mode}' (sample/eval modes are for eval.py)")
    problems += _check_values(config, n_processes) + _check_classes(config) + _check_speed_options(config) \
        + _check_checkpoint_options(config)
    if problems:
        raise ConfigError(f"invalid config ({len(problems)} problem{'s' * (len(problems) > 1)}):\n  - "
                          + "\n  - ".join(problems))
    warnings = []
    remainder = config.eval_every % config.model.batch_size
    if remainder:
        rounded = config.eval_every - remainder
        warnings.append(f"eval_every={config.eval_every} is not a multiple of model.batch_size="
                        f"{config.model.batch_size}; evaluating every {rounded} examples instead")
        config.eval_every = rounded
    return warnings
