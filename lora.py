"""LoRA adapters on the policy (peft), and the reference model they make free: the policy with its adapters
disabled (docs/lora.md).

With model.use_peft the policy is the causal LM with LoRA adapters on its linear layers (model.peft) and only the
adapters train. The reference model is then no second copy of the weights but an `AdapterFreeReference`: the policy
run under peft's `disable_adapter()` without gradients, which computes exactly what the base model computes.
A reward model (loss=bradley-terry) carries its adapters on the sequence classifier (peft's SEQ_CLS task), so that
its score head trains whole beside them and is saved with them.
Checkpoints hold the adapters in peft's own layout (adapter/adapter_config.json + adapter/adapter_model.safetensors,
loadable by `PeftModel.from_pretrained`); the Checkpointer writes them and, in the final checkpoint, a merged model.
QLoRA (model.peft.load_in_4bit) loads the base model in 4 bits with bitsandbytes, on one CUDA GPU.
"""
import importlib.util
import json
import warnings
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional

import torch
from omegaconf import DictConfig, ListConfig, OmegaConf
from safetensors.torch import load_file, save_file

import losses
from distributed import rank0_print
from errors import HalosError
from resolve import candidate_paths

try:
    import peft
except ImportError:  # the optional `peft` extra; model.use_peft=true then fails the config check
    peft = None

ADAPTER_CONFIG, ADAPTER_WEIGHTS = "adapter_config.json", "adapter_model.safetensors"
# A checkpoint's adapters live in a directory of their own: Hugging Face reads adapter files beside a config.json as
# adapters to apply on top of that model, so beside a merged export they would be applied twice.
ADAPTER_DIR = "adapter"
ALL_LINEAR = "all-linear"  # peft's shorthand: every linear layer but the output head
# peft's task types: adapters on a causal LM, or on a sequence classifier (a reward model), whose score head then
# trains whole and is saved with the adapters (peft adds it to modules_to_save).
CAUSAL_LM, SEQ_CLS = "CAUSAL_LM", "SEQ_CLS"
TASK_MODELS = {CAUSAL_LM: "a causal LM", SEQ_CLS: "a reward model (a sequence classifier, loss=bradley-terry)"}
NUMBER_RULES = {"r": losses.POSITIVE_INT, "alpha": losses.POSITIVE,
                "dropout": losses.Rule("in [0, 1)", lambda value: 0 <= value < 1)}


class AdapterError(HalosError):
    """Adapters that cannot be loaded into, or saved from, this run's policy."""


def uses_peft(model_config: DictConfig) -> bool:
    """model.use_peft; configs saved by runs from before the key existed read as false."""
    return bool(model_config.get("use_peft", False))


def is_adapter_dir(path: Path) -> bool:
    return path.is_dir() and (path / ADAPTER_CONFIG).is_file() and (path / ADAPTER_WEIGHTS).is_file()


def adapter_location(path: Path) -> Optional[Path]:
    """The adapter directory `path` is (any peft LoRA adapter) or holds (a checkpoint of a LoRA run: its
    ADAPTER_DIR), or None."""
    return next((candidate for candidate in (path, path / ADAPTER_DIR) if is_adapter_dir(candidate)), None)


def is_adapted(module: torch.nn.Module) -> bool:
    """Whether `module` is a peft model (its checkpoint holds adapters, not all weights)."""
    return peft is not None and isinstance(module, peft.PeftModel)


def adapted_model(module: torch.nn.Module) -> Optional[torch.nn.Module]:
    """The peft model `module` is or contains (PPO's policy holds it beside its value head), or None."""
    return next((m for m in module.modules() if is_adapted(m)), None)


# --- config --------------------------------------------------------------------------------------------------


def config_problems(config: DictConfig, n_processes: int, task_type: Optional[str]) -> List[str]:
    """`key: problem` lines for model.use_peft, model.peft and model.load_lora_from (before anything loads); the
    adapters load_lora_from names must be for `task_type` (the model the run trains; None: either)."""
    model = config.model
    if "use_peft" not in model:  # a run saved before LoRA existed
        return []
    if not isinstance(model.use_peft, bool):
        return [f"model.use_peft: expected true or false, got {model.use_peft!r}"]
    settings = model.get("peft")
    if not isinstance(settings, DictConfig):
        return [f"model.peft: expected a mapping of LoRA settings (r, alpha, ...), got {settings!r}"]
    problems = [f"model.peft.{key}: {problem}" for key, rule in NUMBER_RULES.items()
                if (problem := losses.rule_problem(rule, settings[key]))]
    if not _is_name_list(settings.target_modules, allow_string=True):
        problems.append(f"model.peft.target_modules: expected {ALL_LINEAR}, a module-name regex or a list of module "
                        f"names, got {settings.target_modules!r}")
    if settings.modules_to_save is not None and not _is_name_list(settings.modules_to_save, allow_string=False):
        problems.append(f"model.peft.modules_to_save: expected null or a list of module names, got "
                        f"{settings.modules_to_save!r}")
    if not isinstance(settings.load_in_4bit, bool):
        problems.append(f"model.peft.load_in_4bit: expected true or false, got {settings.load_in_4bit!r}")
    if not model.use_peft:
        asked = [key for key, value in (("model.load_lora_from", model.load_lora_from is not None),
                                        ("model.peft.load_in_4bit", settings.load_in_4bit is True)) if value]
        return problems + [f"{key}: trains LoRA adapters; set model.use_peft=true" for key in asked]
    if peft is None:
        problems.append("model.use_peft: needs the peft package: pip install peft==0.21.2 (the `peft` extra)")
    if settings.load_in_4bit is True:
        problems += quantization_problems(n_processes)
        if model.from_config:
            problems.append("model.peft.load_in_4bit: QLoRA quantizes pretrained weights; model.from_config builds "
                            "random ones")
    if model.load_lora_from is not None:
        try:
            adapters = locate_adapters(str(model.load_lora_from), config.cache_dir)
        except AdapterError as e:
            return problems + [str(e)]
        if task_type is not None:
            try:
                check_task_type(adapters, task_type)
            except AdapterError as e:
                problems.append(f"model.load_lora_from: {e}")
    return problems


def locate_adapters(value: str, cache_dir: str, key: str = "model.load_lora_from") -> Path:
    """The adapter directory a config value names (a checkpoint of a LoRA run, or any peft LoRA adapter), looked
    up as resolve.candidate_paths does; raises AdapterError naming `key` when there is none."""
    candidates = candidate_paths(value, cache_dir)
    found = next((location for path in candidates if (location := adapter_location(path)) is not None), None)
    if found is not None:
        return found
    existing = next((path for path in candidates if path.exists()), None)
    if existing is None:
        raise AdapterError(f"{key}: {value} not found (looked under cache_dir={cache_dir} and the working directory)")
    raise AdapterError(f"{key}: {existing} holds no LoRA adapters (expected {ADAPTER_CONFIG} and {ADAPTER_WEIGHTS})")


def _is_name_list(value: Any, allow_string: bool) -> bool:
    if isinstance(value, str):
        return allow_string and bool(value)
    return isinstance(value, (list, ListConfig)) and len(value) > 0 and all(isinstance(v, str) and v for v in value)


def quantization_problems(n_processes: int) -> List[str]:
    """Why QLoRA cannot run here: it needs a CUDA GPU and bitsandbytes, and runs in one process."""
    if not torch.cuda.is_available():
        return ["model.peft.load_in_4bit: QLoRA needs a CUDA GPU and the bitsandbytes package; this machine has no "
                "CUDA GPU (train LoRA in full precision with model.peft.load_in_4bit=false)"]
    if importlib.util.find_spec("bitsandbytes") is None:
        return ["model.peft.load_in_4bit: QLoRA needs the bitsandbytes package: pip install bitsandbytes"]
    if n_processes > 1:
        return [f"model.peft.load_in_4bit: QLoRA runs in one process (FSDP does not shard 4-bit weights here), "
                f"not {n_processes}"]
    return []


def quantization_options(model_config: DictConfig, dtype: str) -> Dict[str, Any]:
    """from_pretrained's keyword arguments for QLoRA's 4-bit NF4 base model (computing in `dtype`), or none."""
    if not (uses_peft(model_config) and model_config.peft.load_in_4bit):
        return {}
    from transformers import BitsAndBytesConfig

    quantization = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                      bnb_4bit_compute_dtype=getattr(torch, dtype))
    # bitsandbytes quantizes the weights as they reach the GPU, so they are loaded straight onto it.
    return {"quantization_config": quantization, "device_map": {"": torch.cuda.current_device()}}


def without_quantization(model_config: DictConfig) -> DictConfig:
    """The model config that builds the same base model in full precision (for the merged export)."""
    if not uses_peft(model_config):
        return model_config
    return OmegaConf.merge(model_config, {"peft": {"load_in_4bit": False}})


# --- building --------------------------------------------------------------------------------------------------


Adapt = Callable[..., torch.nn.Module]  # adapt(model, task_type=CAUSAL_LM): the module that trains, adapted or not


def no_adapters(model: torch.nn.Module, task_type: str = CAUSAL_LM) -> torch.nn.Module:
    """The Adapt of a run without LoRA: the model trains whole."""
    return model


def lora_config(model_config: DictConfig, base_name: str, task_type: str) -> "peft.LoraConfig":
    settings = model_config.peft
    target_modules = settings.target_modules
    return peft.LoraConfig(
        task_type=task_type, r=settings.r, lora_alpha=settings.alpha, lora_dropout=settings.dropout,
        target_modules=target_modules if isinstance(target_modules, str) else list(target_modules),
        modules_to_save=None if settings.modules_to_save is None else list(settings.modules_to_save),
        base_model_name_or_path=base_name)


def add_adapters(model: torch.nn.Module, model_config: DictConfig, adapters: Optional[Path], base_name: str,
                 task_type: str = CAUSAL_LM) -> torch.nn.Module:
    """The peft model training LoRA adapters on `model` (a causal LM, or a sequence classifier for SEQ_CLS): the
    ones saved in `adapters` (model.load_lora_from, a checkpoint being evaluated), else new ones as model.peft
    describes (B = 0, so it starts as the base model).

    `base_name` says where the base weights come from; it is recorded in adapter_config.json.
    """
    if adapters is not None:
        check_task_type(adapters, task_type)
    if model_config.peft.load_in_4bit:
        # Upcasts the unquantized parameters (norms, embeddings) to float32 for stable training, as QLoRA does.
        model = peft.prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
    with warnings.catch_warnings():
        # peft asks transformers whether checkpointing is on through a name transformers has deprecated.
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
        if adapters is not None:
            adapted = peft.PeftModel.from_pretrained(model, str(adapters), is_trainable=True)
        else:
            adapted = peft.get_peft_model(model, lora_config(model_config, base_name, task_type))
    trainable, total = parameter_counts(adapted)
    rank0_print(f"LoRA: {trainable:,} of {total:,} parameters trainable ({100 * trainable / total:.2f}%)"
        + (f", adapters from {adapters}" if adapters is not None else ""))
    return adapted


def adapter_task_type(adapters: Path) -> str:
    """The peft task type adapter_config.json in `adapters` records (CAUSAL_LM when it records none)."""
    try:
        recorded = json.loads((adapters / ADAPTER_CONFIG).read_text()).get("task_type")
    except (OSError, ValueError) as e:
        raise AdapterError(f"{adapters / ADAPTER_CONFIG}: not a readable adapter config ({e})") from None
    return recorded or CAUSAL_LM


def check_task_type(adapters: Path, task_type: str) -> None:
    """Raises AdapterError when the adapters saved in `adapters` are for another kind of model than `task_type`."""
    saved = adapter_task_type(adapters)
    if saved != task_type:
        raise AdapterError(f"{adapters}: these adapters are for {TASK_MODELS.get(saved, saved)}, but this run trains "
                           f"{TASK_MODELS[task_type]}")


def merge_adapters(model: torch.nn.Module, adapters: Path) -> torch.nn.Module:
    """`model` with the adapters saved in `adapters` merged into its weights: a plain causal LM (or sequence
    classifier) again."""
    if peft is None:
        raise AdapterError(f"{adapters} holds LoRA adapters; loading them needs the peft package: "
                           "pip install peft==0.21.2 (the `peft` extra)")
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
        try:
            return peft.PeftModel.from_pretrained(model, str(adapters)).merge_and_unload()
        except (KeyError, RuntimeError, ValueError) as e:  # adapters made for another model
            reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise AdapterError(f"{adapters}: the adapters do not fit this base model: {reason}") from None


def parameter_counts(model: torch.nn.Module) -> tuple:
    """(trainable, all) parameter counts."""
    return (sum(p.numel() for p in model.parameters() if p.requires_grad),
            sum(p.numel() for p in model.parameters()))


class AdapterFreeReference:
    """Stands in for the reference model: runs the policy with its LoRA adapters disabled and without gradients.

    That is exactly the base model (a disabled LoRA layer returns its base layer's output), from the weights the
    policy already holds: no second copy is loaded. It runs the policy's own module (PPO's includes the value head,
    whose values the reference's callers ignore), so that under FSDP the sharded root gathers the weights as it does
    for the policy. Not an nn.Module, so that nothing can move, freeze or count the policy's weights through it.
    """

    def __init__(self, policy: torch.nn.Module):
        self.policy = policy
        self.adapted = adapted_model(policy)

    @property
    def config(self):
        """The base model's config (logps.model_logps reads its attention implementation)."""
        return self.adapted.config

    @property
    def dtype(self) -> torch.dtype:
        """The base model's dtype (shared-prompt masks are built in it)."""
        return self.adapted.dtype

    def __call__(self, *args, **kwargs):
        with torch.no_grad(), self.adapted.disable_adapter():
            return self.policy(*args, **kwargs)


# --- adapter files ---------------------------------------------------------------------------------------------


def adapter_key_map(model: torch.nn.Module) -> Dict[str, str]:
    """Each saved adapter key (peft's file layout: without the adapter's name, modules_to_save under the wrapped
    module's name) -> the name of the trainable parameter it holds.

    The keys are peft's own, from get_peft_model_state_dict given markers in place of the tensors, so that the files
    read like those of `PeftModel.save_pretrained` while the tensors come from a gathered (FSDP) state dict.
    """
    names = [name for name, parameter in model.named_parameters() if parameter.requires_grad]
    markers = {name: torch.tensor(index) for index, name in enumerate(names)}
    saved = peft.get_peft_model_state_dict(model, state_dict=markers, save_embedding_layers=False)
    return {key: names[int(marker)] for key, marker in saved.items()}


def write_adapters(model: torch.nn.Module, state: Dict[str, torch.Tensor], checkpoint_dir: Path) -> None:
    """Writes `state`'s trainable tensors (a gathered state dict of `model`) as adapter_config.json and
    adapter_model.safetensors in the checkpoint's ADAPTER_DIR."""
    directory = checkpoint_dir / ADAPTER_DIR
    directory.mkdir()
    tensors = {key: state[name].contiguous() for key, name in adapter_key_map(model).items()}
    save_file(tensors, directory / ADAPTER_WEIGHTS, metadata={"format": "pt"})
    model.peft_config["default"].save_pretrained(str(directory))


def read_adapters(model: torch.nn.Module, checkpoint_dir: Path) -> Dict[str, torch.Tensor]:
    """The adapter tensors a checkpoint holds, keyed by `model`'s parameter names; every trainable parameter of
    `model` must be there, and nothing else."""
    directory = adapter_location(checkpoint_dir)
    if directory is None:
        raise AdapterError(f"{checkpoint_dir} holds no LoRA adapters (expected {ADAPTER_DIR}/{ADAPTER_CONFIG} and "
                           f"{ADAPTER_DIR}/{ADAPTER_WEIGHTS})")
    saved = load_file(directory / ADAPTER_WEIGHTS)
    key_map = adapter_key_map(model)
    missing, unexpected = sorted(key_map.keys() - saved.keys()), sorted(saved.keys() - key_map.keys())
    if missing or unexpected:
        raise AdapterError(f"{directory} does not fit this run's adapters: {len(missing)} missing tensors (e.g. "
                           f"{missing[:2]}), {len(unexpected)} unexpected (e.g. {unexpected[:2]}); was it trained "
                           "with other model.peft settings?")
    return {name: saved[key] for key, name in key_map.items()}
