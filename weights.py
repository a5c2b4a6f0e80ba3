"""What is at a weights path, and how to load it: the one loader behind model.load_from (train.py), saved_policy
(eval.py) and resuming a run (checkpointer.py).

A path may name
* a `policy.pt` (checkpoints.save_checkpoint's `{step_idx, state, metrics}`), or a checkpoint directory holding one
  (a step-<N> or an unfinished LATEST);
* a Hugging Face model directory (config.json + weights): an exported checkpoint such as a finished LATEST, or any
  fine-tuned model. `<dir>/policy.pt` of an exported checkpoint, the path the original wrote, reads its export;
* a Hugging Face sequence-classification directory: an exported reward model (loss=bradley-terry), loaded as one;
* a LoRA adapter directory (adapter_config.json + adapter_model.safetensors), or a checkpoint directory holding one
  in adapter/ (a LoRA run's checkpoint before the final one, lora.py). It holds differences from a base model, which
  the caller names; a LoRA reward model's adapters (peft's SEQ_CLS task) build a sequence classifier.
Each kind is a WeightFormat in FORMATS, tried in order (so a finished LoRA run's LATEST, which holds its adapters and
their merged model, reads as the merged model); supporting another kind is one more WeightFormat there.
"""
import json
from pathlib import Path
from typing import Dict, List, NamedTuple, Optional

import torch
from omegaconf import DictConfig, OmegaConf
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, PreTrainedModel

from checkpoints import POLICY, CheckpointError, is_hf_model_dir, load_checkpoint, load_weights
from lora import ADAPTER_WEIGHTS, SEQ_CLS, adapter_location, adapter_task_type, merge_adapters, without_quantization
from models import (RewardModel, from_pretrained, grow_embeddings, is_sequence_classifier, load_causal_lm, model_kwargs,
                    trusts_remote_code)
from utils import disable_dropout
from resolve import candidate_paths


class WeightFormat:
    """One kind of weights location. Subclasses implement the three methods."""

    description = ""  # for error messages: "a policy.pt ..."

    def holds_reward_model(self, found: Path) -> bool:
        """What `found` builds: a reward model (a sequence classifier), or a causal LM."""
        return False

    def find(self, path: Path) -> Optional[Path]:
        """The file or directory this format reads for a user's `path`, or None if `path` is not of this kind."""
        raise NotImplementedError

    def build(self, found: Path, model_config: DictConfig, dtype: str, seed: int, vocab_size: int, key: str,
              base: Optional["Weights"]) -> PreTrainedModel:
        """The causal LM (or reward model) with these weights, its embeddings at least `vocab_size` rows
        (models.grow_embeddings); errors name the config `key` the weights came from. Formats that hold differences
        (adapters) apply them to `base`, or to model.name_or_path's model when it is None; the others ignore it."""
        raise NotImplementedError

    def state_dict(self, found: Path, model_config: Optional[DictConfig]) -> Dict[str, torch.Tensor]:
        """The causal LM's full state dict (Hugging Face parameter names), on the CPU."""
        raise NotImplementedError


class PolicyFile(WeightFormat):
    """policy.pt: a full state dict, loaded into the model that model.name_or_path builds."""

    description = "a policy.pt (or a checkpoint directory holding one)"

    def find(self, path: Path) -> Optional[Path]:
        if path.is_file():
            return path
        return path / POLICY if (path / POLICY).is_file() else None

    def build(self, found, model_config, dtype, seed, vocab_size, key, base):
        model = load_causal_lm(model_config, dtype, seed)
        grow_embeddings(model, vocab_size, seed)  # a run that added tokens saved grown embeddings
        load_weights(model, found)
        return model

    def state_dict(self, found, model_config):
        return load_checkpoint(found)["state"]


class HuggingFaceDirectory(WeightFormat):
    """A Hugging Face model directory: the model is built from it (its config.json, its weights)."""

    description = "a Hugging Face model directory (with config.json)"

    def find(self, path: Path) -> Optional[Path]:
        return directory_or_implied(path, lambda directory: is_hf_model_dir(directory)
                                    and not is_sequence_classifier_dir(directory))

    def build(self, found, model_config, dtype, seed, vocab_size, key, base):
        model = load_causal_lm(OmegaConf.merge(model_config, {"name_or_path": str(found), "from_config": False}),
                               dtype, seed, key)
        grow_embeddings(model, vocab_size, seed)
        return model

    def state_dict(self, found, model_config):
        # from_pretrained applies the architecture's own key conversions and ties shared weights, so the state dict
        # has the names and the tied entries that the model built from model.name_or_path expects.
        model = from_pretrained(AutoModelForCausalLM.from_pretrained, str(found), "checkpoint", dtype="auto",
                                trust_remote_code=model_config is not None and trusts_remote_code(model_config))
        return model.state_dict()


class AdapterDirectory(WeightFormat):
    """LoRA adapters, merged into the base model (peft's merge_and_unload) to give a plain causal LM; a reward
    model's (peft's SEQ_CLS task) give a sequence classifier, its score head saved with the adapters."""

    description = "a LoRA adapter directory (adapter_config.json + adapter_model.safetensors, or adapter/ holding them)"

    def find(self, path: Path) -> Optional[Path]:
        return directory_or_implied(path, lambda directory: adapter_location(directory) is not None)

    def holds_reward_model(self, found: Path) -> bool:
        return adapter_task_type(adapter_location(found)) == SEQ_CLS

    def build(self, found, model_config, dtype, seed, vocab_size, key, base):
        # Merged into full-precision weights: a QLoRA run's adapters too, as QLoRA's authors merge them.
        model = load_model(base, without_quantization(model_config), dtype, seed, vocab_size)
        if self.holds_reward_model(found) and not is_sequence_classifier(model):
            model = RewardModel.classifier_from(model)  # the head it draws is replaced by the saved one
        return merge_adapters(model, adapter_location(found))

    def state_dict(self, found, model_config):
        # Without its base model an adapter directory holds no full state: what it holds is the adapters' tensors.
        return load_file(adapter_location(found) / ADAPTER_WEIGHTS)


def directory_or_implied(path: Path, is_kind) -> Optional[Path]:
    """`path` when it is a directory of a kind (`is_kind`), or its directory when `path` is the original's
    `<dir>/policy.pt` and `<dir>` holds that kind instead of a policy.pt."""
    if is_kind(path):
        return path
    implied = path.name == POLICY and not path.exists() and is_kind(path.parent)
    return path.parent if implied else None


ADAPTERS = AdapterDirectory()

class SequenceClassifierDirectory(WeightFormat):
    """A Hugging Face sequence-classification directory (its config.json names a *ForSequenceClassification
    architecture): a reward model, built as one."""

    description = "a Hugging Face sequence-classification (reward model) directory"

    def holds_reward_model(self, found: Path) -> bool:
        return True

    def find(self, path: Path) -> Optional[Path]:
        return path if is_sequence_classifier_dir(path) else None

    def build(self, found, model_config, dtype, seed, vocab_size, key, base):
        model = self.load(found, model_config, dtype, key)
        grow_embeddings(model, vocab_size, seed)
        return model

    def state_dict(self, found, model_config):
        return self.load(found, model_config, "float32", "checkpoint").state_dict()

    @staticmethod
    def load(found: Path, model_config: Optional[DictConfig], dtype: str, key: str) -> PreTrainedModel:
        kwargs = model_kwargs(model_config, dtype) if model_config is not None else {"dtype": getattr(torch, dtype)}
        model = from_pretrained(AutoModelForSequenceClassification.from_pretrained, str(found), key, **kwargs)
        disable_dropout(model)
        return model


def is_sequence_classifier_dir(path: Path) -> bool:
    """Whether `path` is a Hugging Face model directory of a sequence classifier (a reward model)."""
    if not is_hf_model_dir(path):
        return False
    architectures = json.loads((path / "config.json").read_text()).get("architectures") or []
    return any(name.endswith("ForSequenceClassification") for name in architectures)


FORMATS: List[WeightFormat] = [PolicyFile(), SequenceClassifierDirectory(), HuggingFaceDirectory(), ADAPTERS]


class Weights(NamedTuple):
    """Located weights: the format that reads them, the file or directory it reads, the config key that named it."""

    format: WeightFormat
    path: Path
    key: str

    @property
    def holds_reward_model(self) -> bool:
        return self.format.holds_reward_model(self.path)

    @property
    def directory(self) -> Path:
        """The checkpoint directory, where the files beside the weights live (PPO's v_head.pt)."""
        return self.path if self.path.is_dir() else self.path.parent

    def build(self, model_config: DictConfig, dtype: str, seed: int, vocab_size: int,
              base: Optional["Weights"] = None) -> PreTrainedModel:
        return self.format.build(self.path, model_config, dtype, seed, vocab_size, self.key, base)

    def state_dict(self, model_config: Optional[DictConfig] = None) -> Dict[str, torch.Tensor]:
        """The causal LM's full state dict; `model_config` says whether the model's own code may run."""
        return self.format.state_dict(self.path, model_config)


def expected_formats() -> str:
    return ", ".join(weight_format.description for weight_format in FORMATS)


def find_weights(path: Path, key: str = "checkpoint") -> Optional[Weights]:
    """The weights at an existing or implied `path` (see the module docstring), or None."""
    for weight_format in FORMATS:
        found = weight_format.find(path)
        if found is not None:
            return Weights(weight_format, found, key)
    return None


def read_policy_state(path: Path) -> Dict[str, torch.Tensor]:
    """The policy's full state dict at `path`: a checkpoint directory (policy.pt or export), a policy.pt or a
    Hugging Face model directory; for a LoRA adapter directory the adapters' tensors (peft's names). Raises
    CheckpointError when there are no weights there."""
    found = find_weights(path)
    if found is None:
        raise CheckpointError(f"{path} holds no weights; expected one of: {expected_formats()}")
    return found.state_dict()


def locate(value: str, cache_dir: str, key: str) -> Weights:
    """The weights a config value names, looked up as resolve.candidate_paths does (cache_dir first).

    Raises CheckpointError naming `key` when nothing is there or what is there is none of FORMATS.
    """
    candidates = candidate_paths(value, cache_dir)
    for path in candidates:
        weights = find_weights(path, key)
        if weights is not None:
            return weights
    existing = next((p for p in candidates if p.exists()), None)
    if existing is None:
        raise CheckpointError(f"{key}: {value} not found (looked under cache_dir={cache_dir} and the working "
                              "directory)")
    raise CheckpointError(f"{key}: {existing} holds no weights; expected one of: {expected_formats()}")


def locate_in_config(config: DictConfig, key: str) -> Optional[Weights]:
    """The weights named by a config key (model.load_from, saved_policy), or None when it is null."""
    value = OmegaConf.select(config, key)
    return None if value is None else locate(str(value), config.cache_dir, key)


def load_model(weights: Optional[Weights], model_config: DictConfig, dtype: str, seed: int, vocab_size: int,
               base: Optional[Weights] = None) -> PreTrainedModel:
    """The causal LM with `weights`, or model.name_or_path's own (seeded random ones with from_config) for None.
    Adapters among `weights` are merged into `base` (see WeightFormat.build)."""
    if weights is not None:
        return weights.build(model_config, dtype, seed, vocab_size, base)
    model = load_causal_lm(model_config, dtype, seed)
    grow_embeddings(model, vocab_size, seed)
    return model


def merge_into_base(adapters: Path, config: DictConfig, vocab_size: int) -> PreTrainedModel:
    """A LoRA run's base model (model.load_from's, else model.name_or_path's) in model.policy_dtype, with the
    adapters saved in `adapters` merged into it."""
    start = locate_in_config(config, "model.load_from")
    return ADAPTERS.build(adapters, config.model, config.model.policy_dtype, config.seed, vocab_size, "checkpoint",
                          start)


def load_companions(modules: Dict[str, torch.nn.Module], weights: Weights) -> List[str]:
    """Loads the weights files saved beside the policy (e.g. PPO's v_head.pt) into their modules; returns the names
    loaded. `modules` maps file name to module, as BasicTrainer.checkpoint_modules does."""
    loaded = []
    for name, module in modules.items():
        if name != POLICY and (weights.directory / name).is_file():
            load_weights(module, weights.directory / name)
            loaded.append(name)
    return loaded
