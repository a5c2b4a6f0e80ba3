"""The one config validator of train.py and eval.py: it runs before any model or dataset loads and reports every
problem together, one `key: problem` line each.

The YAML files are the schema: a key that is not in config/config.yaml, config/model/base_model.yaml or the chosen
config/loss/<name>.yaml is an error, so a misspelt `++loss.betta=0.2` fails at once instead of being ignored.

CHECKS says which checks each entry point runs: functions of (config, invocation) that return `key: problem` lines.
ADJUSTMENTS run once the checks pass and settle derived values (a rounded eval_every, an attention fallback),
returning a warning line for each change. Adding a check is writing such a function and listing it there.
"""
import difflib
import inspect
import os
import re
from pathlib import Path
from typing import Callable, Dict, FrozenSet, Iterable, List, NamedTuple, Optional, Sequence, Set, Tuple

import torch
import yaml
from omegaconf import DictConfig, OmegaConf

import data_config
import dataloader
import lora
import shared_prompts
import trainers
import weights
from errors import ConfigError, HalosError
from models import ATTENTION_IMPLEMENTATIONS, attention_implementation, attention_unavailable
from resolve import resolve_class, resolve_path
from utils import REPO_ROOT
from vllm_sampling import SAMPLERS

CONFIG_DIR = REPO_ROOT / "config"
STRUCTURAL_KEYS = {"defaults", "hydra"}
CONFIG_GROUPS = {"model", "loss"}  # top-level keys filled by the defaults list
TRAIN_MODES = ("train",)
EVAL_MODES = ("sample", "eval", "alpacaeval")
# exp_name is a directory name under cache_dir and a file name under samples_dir: one path component.
RUN_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9._+=,@-]*")
RESERVED_RUN_NAMES = ("wandb", "reference_logps")  # directories of cache_dir that are not runs
MAX_SEED = 2**32 - 1  # numpy's seed range


class Invocation(NamedTuple):
    """How a config was asked for: which entry point, and what the checks cannot read from the config itself."""

    entry_point: str  # "train" (train.py) or "eval" (eval.py)
    loss_choice: Optional[str] = None  # train.py: the loss config's name, config/loss/<name>.yaml
    n_processes: int = 1  # training processes the batches are split over
    search_dirs: Sequence[str] = ()  # extra config directories (hydra.searchpath) holding users' loss configs
    command_line_keys: FrozenSet[str] = frozenset()  # dotted keys set on the command line (model.use_flash_attention)


Check = Callable[[DictConfig, Invocation], List[str]]


def yaml_keys(path: Path, section: Optional[str] = None) -> Set[str]:
    """Top-level keys of a YAML config file (without Hydra's own `defaults`/`hydra`), or the keys of its `section`."""
    with open(path) as f:
        content = yaml.safe_load(f) or {}
    return set(content[section]) if section is not None else set(content) - STRUCTURAL_KEYS


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


def _check_schema(config: DictConfig, invocation: Invocation) -> List[str]:
    """Required keys that are missing and keys no YAML file defines. The loss config's own keys are known only to
    train.py (eval.py reads a saved config that has no defaults list)."""
    # Interpolations of a missing key (local_run_dir: ${cache_dir}/${exp_name}) are not reported themselves.
    derived = _interpolated_keys(config)
    OmegaConf.resolve(config)
    problems = [f"{key}: required but not set (pass {key}=...)" for key in sorted(OmegaConf.missing_keys(config))
                if key not in derived]
    problems += unknown_keys("", config.keys(), yaml_keys(CONFIG_DIR / "config.yaml") | CONFIG_GROUPS)
    problems += unknown_keys("model.", config.model.keys(), yaml_keys(CONFIG_DIR / "model" / "base_model.yaml"))
    if isinstance(config.model.get("peft"), DictConfig):
        problems += unknown_keys("model.peft.", config.model.peft.keys(),
                                 yaml_keys(CONFIG_DIR / "model" / "base_model.yaml", "peft"))
    problems += unknown_keys("wandb.", config.wandb.keys(), {"enabled", "entity", "project"})
    if invocation.entry_point != "train":
        return problems
    loss_file = next((f for d in (CONFIG_DIR, *map(Path, invocation.search_dirs))
                      if (f := d / "loss" / f"{invocation.loss_choice}.yaml").exists()), None)
    if loss_file is not None:
        problems += unknown_keys("loss.", config.loss.keys(), yaml_keys(loss_file))
    for key in ("name", "trainer", "dataloader", "use_reference_model"):
        if key not in config.loss:
            problems.append(f"loss.{key}: required in every loss config")
    return problems


def _check_classes(config: DictConfig, invocation: Invocation) -> List[str]:
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


def _check_values(config: DictConfig, invocation: Invocation) -> List[str]:
    """Batch sizes, lengths, dtypes and the optimisation settings."""
    n_processes = invocation.n_processes
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
    for key in ("minimum_log_interval_secs", "print_interval_secs"):
        if isinstance(config[key], bool) or not isinstance(config[key], (int, float)) or config[key] < 0:
            problems.append(f"{key}: expected a number of seconds >= 0, got {config[key]!r}")
    if not is_positive_int(config.eval_every):
        problems.append(f"eval_every: expected a positive integer, got {config.eval_every!r}")
    elif is_positive_int(model.batch_size) and config.eval_every < model.batch_size:
        problems.append(f"eval_every: {config.eval_every} is smaller than model.batch_size={model.batch_size}")
    for key in ("frac_unique_desirable", "frac_unique_undesirable"):
        if not isinstance(config[key], (int, float)) or not 0 < config[key] <= 1:
            problems.append(f"{key}: expected a fraction in (0, 1], got {config[key]!r}")
    return problems


def _check_checkpoint_options(config: DictConfig, invocation: Invocation) -> List[str]:
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


def _check_speed_options(config: DictConfig, invocation: Invocation) -> List[str]:
    """pack_sequences, share_prompts and cache_reference_logprobs (docs/performance.md)."""
    problems = [f"{key}: expected true or false, got {config[key]!r}"
                for key in ("pack_sequences", "share_prompts", "cache_reference_logprobs")
                if not isinstance(config[key], bool)]
    implementation = "sdpa" if _attention_problem(config) else attention_implementation(config.model)
    if config.share_prompts is True and "share_prompts" in invocation.command_line_keys \
            and implementation not in shared_prompts.MASKED_ATTENTION:
        problems.append(f"share_prompts: {implementation} attention takes no custom attention mask; choose "
                        f"model.attn_implementation=sdpa or flex_attention, or drop the override")
    if config.cache_reference_logprobs is True and "trainer" in config.loss:
        try:
            trainer = resolve_class(str(config.loss.trainer), "trainers")
        except ConfigError:
            return problems  # reported by the class check
        if issubclass(trainer, trainers.BasicTrainer) and trainer.requires_reference_model \
                and not trainer.caches_reference_logps():
            problems.append(f"cache_reference_logprobs: {trainer.__name__} reads reference log-probs the cache does "
                            "not hold (PPO's or a token-level loss's per-token log-probs), so they cannot be cached")
    return problems


def _check_train_mode(config: DictConfig, invocation: Invocation) -> List[str]:
    if OmegaConf.is_missing(config, "mode") or config.mode in TRAIN_MODES:
        return []  # a missing mode is reported by the schema check
    return [f"mode: train.py needs mode=train, got '{config.mode}' (sample/eval modes are for eval.py)"]


def _check_eval_mode(config: DictConfig, invocation: Invocation) -> List[str]:
    if OmegaConf.is_missing(config, "mode") or config.mode in EVAL_MODES:
        return []
    return [f"mode: expected one of {', '.join(EVAL_MODES)} (e.g. ++mode=sample), got {config.mode!r}"]


def _check_run_name(config: DictConfig, invocation: Invocation) -> List[str]:
    """exp_name names a directory of cache_dir and files of samples_dir, so it must be one plain path component:
    `../x` would write outside cache_dir, an empty name or `.` into cache_dir itself."""
    if OmegaConf.is_missing(config, "exp_name"):
        return []
    name = config.exp_name
    problems = []
    if isinstance(name, bool) or not isinstance(name, (str, int)) or not RUN_NAME.fullmatch(str(name)):
        problems.append(f"exp_name: {name!r} is not a run name: use letters, digits and . _ + - = , @ (not first: "
                        ". - + = , @); it names a directory in cache_dir")
    elif str(name) in RESERVED_RUN_NAMES:
        problems.append(f"exp_name: '{name}' is the name of a directory HALOs keeps in cache_dir; choose another")
    if invocation.entry_point == "train" and not problems and not OmegaConf.is_missing(config, "local_run_dir") \
            and os.path.abspath(str(config.local_run_dir)) == os.path.abspath(str(config.cache_dir)):
        problems.append(f"local_run_dir: {config.local_run_dir} is cache_dir itself; a run needs its own directory")
    return problems


def _check_seed(config: DictConfig, invocation: Invocation) -> List[str]:
    seed = config.seed
    if isinstance(seed, int) and not isinstance(seed, bool) and 0 <= seed <= MAX_SEED:
        return []
    return [f"seed: expected an integer from 0 to {MAX_SEED}, got {seed!r}"]


def _check_weights(config: DictConfig, invocation: Invocation) -> List[str]:
    """model.load_from (both entry points: eval.py's reference model and default policy start there) and
    saved_policy (eval.py) name weights that the loader can read (weights.py), of the kind the run needs: a causal
    LM, or for a reward model's own checkpoints (loss=bradley-terry) a sequence classifier."""
    keys = ("model.load_from", "saved_policy") if invocation.entry_point == "eval" else ("model.load_from",)
    problems = []
    for key in keys:
        try:
            located = weights.locate_in_config(config, key)
        except HalosError as e:
            problems.append(str(e))
            continue
        wanted = _wanted_weights(config, key)
        if located is not None and wanted is not None and located.holds_reward_model != wanted:
            found = "a reward model (a sequence classifier)" if located.holds_reward_model else "a causal LM"
            use = "reward models score samples with label.py" if not wanted else "it needs a reward model"
            problems.append(f"{key}: {located.path} holds {found}, which this run cannot use ({use})")
    return problems


def _check_lora(config: DictConfig, invocation: Invocation) -> List[str]:
    """model.use_peft, model.peft and model.load_lora_from (lora.py): the adapters it names are for the kind of
    model the run trains (a reward model's for loss=bradley-terry, a causal LM's otherwise)."""
    wanted = _wanted_weights(config, "saved_policy")  # adapters are of the trained model, as saved_policy is
    task_type = None if wanted is None else lora.SEQ_CLS if wanted else lora.CAUSAL_LM
    return lora.config_problems(config, invocation.n_processes, task_type)


def _wanted_weights(config: DictConfig, key: str) -> Optional[bool]:
    """Whether `key` must name a reward model (True), a causal LM (False), or may name either (None: a reward model
    starts from either; an unresolvable trainer is reported elsewhere)."""
    if config.get("mode") in ("sample", "alpacaeval"):
        return False if key == "saved_policy" else None
    try:
        trainer = resolve_class(str(config.loss.get("trainer")), "trainers")
    except ConfigError:
        return None
    reward_model = getattr(trainer, "trains_reward_model", False)
    if key == "model.load_from":
        return None if reward_model else False
    return reward_model


def _attention_problem(config: DictConfig) -> Optional[Tuple[str, str]]:
    """(the key that chose it, why it cannot run) when the model's attention implementation is unavailable here."""
    reason = attention_unavailable(attention_implementation(config.model))
    if reason is None:
        return None
    key = "model.attn_implementation" if config.model.get("attn_implementation") else "model.use_flash_attention"
    return key, reason


def _check_attention(config: DictConfig, invocation: Invocation) -> List[str]:
    """An attention implementation asked for on the command line must be available; one that comes from a preset
    or a saved config falls back to sdpa instead (_fall_back_attention)."""
    problem = _attention_problem(config)
    if problem is None:
        return []
    key, reason = problem
    if attention_implementation(config.model) not in ATTENTION_IMPLEMENTATIONS:
        return [f"{key}: {reason}"]
    if key in invocation.command_line_keys:
        return [f"{key}: {reason}, which this machine lacks; drop the override to use sdpa"]
    return []


def _check_sampling(config: DictConfig, invocation: Invocation) -> List[str]:
    """eval.py's own keys: n_samples, num_samples_per_prompt, sample_split, sampler, n_eval_examples,
    model.eval_batch_size, top_p, samples_dir."""
    problems = []
    if config.n_samples is not None and not is_positive_int(config.n_samples):
        problems.append(f"n_samples: expected a positive integer or null (all test prompts), got {config.n_samples!r}")
    if not is_positive_int(config.num_samples_per_prompt):
        problems.append(f"num_samples_per_prompt: expected a positive integer, got {config.num_samples_per_prompt!r}")
    if config.sample_split not in data_config.SPLITS:
        problems.append(f"sample_split: expected one of {', '.join(data_config.SPLITS)}, got {config.sample_split!r}")
    if config.sampler not in SAMPLERS:
        problems.append(f"sampler: expected one of {', '.join(SAMPLERS)}, got {config.sampler!r}")
    if config.get("mode") == "alpacaeval":
        problems += [f"{key}: alpacaeval mode writes one output per AlpacaEval instruction of its test split; "
                     f"set {key}={value}" for key, value in (("num_samples_per_prompt", 1), ("sample_split", "test"))
                     if config[key] != value]
    if config.n_eval_examples is not None and not is_positive_int(config.n_eval_examples):
        problems.append(f"n_eval_examples: expected a positive integer or null, got {config.n_eval_examples!r}")
    if not is_positive_int(config.model.eval_batch_size):
        problems.append(f"model.eval_batch_size: expected a positive integer, got {config.model.eval_batch_size!r}")
    if not isinstance(config.top_p, (int, float)) or not 0 < config.top_p <= 1:
        problems.append(f"top_p: expected a number in (0, 1], got {config.top_p!r}")
    samples_dir = Path(str(config.samples_dir))
    blocking = next((p for p in (samples_dir, *samples_dir.parents) if p.exists() and not p.is_dir()), None)
    if blocking is not None:
        problems.append(f"samples_dir: {blocking} is a file, so {samples_dir} cannot be a directory for the outputs")
    return problems


def _round_eval_every(config: DictConfig, invocation: Invocation) -> List[str]:
    """eval_every rounded down to a multiple of model.batch_size (evaluation happens between batches), as the
    original does."""
    remainder = config.eval_every % config.model.batch_size
    if not remainder:
        return []
    rounded = config.eval_every - remainder
    warning = (f"eval_every={config.eval_every} is not a multiple of model.batch_size={config.model.batch_size}; "
               f"evaluating every {rounded} examples instead")
    config.eval_every = rounded
    return [warning]


def _unused_reference_dtype(config: DictConfig, invocation: Invocation) -> List[str]:
    """With LoRA the reference model is the policy's own base model, in model.policy_dtype."""
    model = config.model
    if not (lora.uses_peft(model) and config.loss.get("use_reference_model")) \
            or model.reference_dtype == model.policy_dtype:
        return []
    return [f"model.reference_dtype={model.reference_dtype} is unused with model.use_peft: the reference model is the "
            f"policy without its adapters, in model.policy_dtype={model.policy_dtype}"]


def _fall_back_attention(config: DictConfig, invocation: Invocation) -> List[str]:
    """Presets ask for flash-attention (llama, mistral, zephyr), which needs a GPU and the flash-attn package: without
    them the model is built with sdpa instead, and the saved config says so."""
    problem = _attention_problem(config)
    if problem is None:
        return []
    key, reason = problem
    config.model.use_flash_attention = False
    config.model.attn_implementation = "sdpa"
    return [f"{key}: {reason}, which this machine lacks; using sdpa attention instead"]


def _fall_back_share_prompts(config: DictConfig, invocation: Invocation) -> List[str]:
    """share_prompts (on by default) needs attention that takes a custom mask; with flash-attention, which a preset
    or a saved config may choose, every row runs with its own prompt instead, and the saved config says so."""
    implementation = attention_implementation(config.model)
    if config.get("share_prompts") is not True or implementation in shared_prompts.MASKED_ATTENTION:
        return []
    config.share_prompts = False
    return [f"share_prompts: {implementation} attention takes no custom attention mask; every row runs its own "
            "prompt (share_prompts=false)"]


CHECKS: Dict[str, List[Check]] = {
    "train": [_check_schema, _check_train_mode, _check_run_name, _check_seed, _check_values, _check_classes,
              _check_weights, _check_lora, _check_speed_options, _check_checkpoint_options, _check_attention],
    "eval": [_check_schema, _check_eval_mode, _check_run_name, _check_seed, _check_sampling, _check_weights,
             _check_lora, _check_attention],
}
ADJUSTMENTS: Dict[str, List[Check]] = {
    "train": [_round_eval_every, _unused_reference_dtype, _fall_back_attention, _fall_back_share_prompts],
    "eval": [_fall_back_attention, _fall_back_share_prompts],
}


def validate_config(config: DictConfig, invocation: Invocation) -> List[str]:
    """Resolves and checks a composed config for `invocation.entry_point`; raises ConfigError listing every problem,
    else settles the derived values (ADJUSTMENTS) and returns a warning line for each change."""
    problems = [problem for check in CHECKS[invocation.entry_point] for problem in check(config, invocation)]
    if problems:
        raise ConfigError.listing(problems)
    return [warning for adjust in ADJUSTMENTS[invocation.entry_point] for warning in adjust(config, invocation)]


def validate_train_config(config: DictConfig, loss_choice: str, n_processes: int = 1,
                          search_dirs: Sequence[str] = (), command_line_keys: Iterable[str] = ()) -> List[str]:
    """validate_config for train.py; `loss_choice` names config/loss/<name>.yaml."""
    return validate_config(config, Invocation("train", loss_choice, n_processes, tuple(search_dirs),
                                              frozenset(command_line_keys)))


def validate_eval_config(config: DictConfig, command_line_keys: Iterable[str] = ()) -> List[str]:
    """validate_config for eval.py, on a run's saved config with the command line's overrides."""
    return validate_config(config, Invocation("eval", command_line_keys=frozenset(command_line_keys)))
