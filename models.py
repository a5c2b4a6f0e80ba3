"""Building the policy, reference model and tokenizer from a `model` config, and the modules trained around a causal
LM: PPO's value head and the Bradley-Terry reward model's scalar head."""
import copy
import os
from typing import Any, Callable, List, Optional, Sequence, Tuple

import torch
import transformers.utils
from omegaconf import DictConfig
from safetensors import SafetensorError
from transformers import (AutoConfig, AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer,
                          PreTrainedModel, PreTrainedTokenizerBase)

from errors import HalosError
from hub import hub_reachable
from lora import is_adapted, quantization_options
from utils import disable_dropout, pack_rows


class ModelLoadError(HalosError):
    """A model or tokenizer that cannot be loaded (unreachable hub, bad path)."""


def _hub_offline() -> bool:
    return any(os.environ.get(var, "").lower() in ("1", "true", "yes") for var in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"))


def from_pretrained(load: Callable[..., Any], name_or_path: str, key: str, **kwargs) -> Any:
    """Calls a Hugging Face `from_pretrained` with a fast, readable failure when the hub is out of reach.

    Local directories load directly. For hub ids the hub is probed first (a few seconds at most); if it is
    unreachable only the local Hugging Face cache is tried, instead of waiting through long network retries.
    """
    if not os.path.isdir(name_or_path) and (_hub_offline() or not hub_reachable()):
        kwargs["local_files_only"] = True
    try:
        return load(name_or_path, **kwargs)
    except (OSError, ValueError, SafetensorError) as e:  # a missing, unreachable or corrupt model
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        where = "" if os.path.isdir(name_or_path) else " (the hub is unreachable and it is not in the local cache)" \
            if kwargs.get("local_files_only") else ""
        raise ModelLoadError(f"cannot load {key}='{name_or_path}'{where}: {reason}") from None


def trusts_remote_code(model_config: DictConfig) -> bool:
    """model.trust_remote_code: whether a model or tokenizer may run Python code shipped with it. Configs saved by
    runs from before the key existed read as false."""
    return bool(model_config.get("trust_remote_code", False))


def load_tokenizer(model_config: DictConfig, control_tokens: Sequence[str] = ()) -> PreTrainedTokenizerBase:
    """The model's tokenizer; models without a pad token pad with EOS (padding is always masked out).

    `control_tokens` (csft's <|good|>/<|bad|>) are added as special tokens so each encodes to one id.
    """
    name = model_config.tokenizer_name_or_path or model_config.name_or_path
    key = "model.tokenizer_name_or_path" if model_config.tokenizer_name_or_path else "model.name_or_path"
    tokenizer = from_pretrained(AutoTokenizer.from_pretrained, name, key,
                                trust_remote_code=trusts_remote_code(model_config))
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token_id = tokenizer.eos_token_id
    if control_tokens:
        tokenizer.add_special_tokens({"additional_special_tokens": list(control_tokens)})
    return tokenizer


def control_tokens(loss_config: DictConfig) -> List[str]:
    """The loss's control tokens (csft), or none."""
    return [t for t in (loss_config.get("chosen_control_token"), loss_config.get("rejected_control_token")) if t]


ATTENTION_IMPLEMENTATIONS = ("sdpa", "eager", "flash_attention_2", "flash_attention_3", "flash_attention_4",
                             "flex_attention")


def attention_implementation(model_config: DictConfig) -> str:
    """The attention kernel a model is built with: model.attn_implementation when set, else flash_attention_2 with
    model.use_flash_attention (the original's switch), else PyTorch's sdpa."""
    if model_config.get("attn_implementation"):
        return str(model_config.attn_implementation)
    return "flash_attention_2" if model_config.use_flash_attention else "sdpa"


def attention_unavailable(implementation: str) -> Optional[str]:
    """Why `implementation` cannot run on this machine (the package or device it needs), or None when it can.

    Checked before anything loads: transformers itself only fails when the model is built, after the data has.
    """
    if implementation in ("eager", "sdpa"):
        return None
    version = implementation.removeprefix("flash_attention_")
    if version in ("2", "3", "4"):
        available = getattr(transformers.utils, f"is_flash_attn_{version}_available")()
        package = "flash-attn" if version == "2" else f"flash-attn {version}"
        return None if available else f"{implementation} needs the {package} package and a CUDA GPU"
    if implementation == "flex_attention":
        return None if transformers.utils.is_torch_flex_attn_available() else "flex_attention needs a newer torch"
    return (f"'{implementation}' is not an attention implementation (expected one of "
            f"{', '.join(ATTENTION_IMPLEMENTATIONS)})")


def model_kwargs(model_config: DictConfig, dtype: str) -> dict:
    """What every from_pretrained/from_config call of a model gets: its dtype, attention kernel and remote-code
    permission."""
    return dict(dtype=getattr(torch, dtype), trust_remote_code=trusts_remote_code(model_config),
                attn_implementation=attention_implementation(model_config))


def load_causal_lm(model_config: DictConfig, dtype: str, seed: int,
                   key: str = "model.name_or_path") -> PreTrainedModel:
    """A causal LM in `dtype` with dropout disabled; `key` is the config key named when it cannot be loaded.

    With `model.from_config` the architecture comes from name_or_path's config.json and the weights are random,
    drawn from a generator seeded with `seed`: the policy and reference model built this way are identical. With
    QLoRA (model.peft.load_in_4bit) the weights are quantized to 4 bits on the GPU as they load.
    """
    trust_remote_code = trusts_remote_code(model_config)
    kwargs = model_kwargs(model_config, dtype)
    if model_config.from_config:
        config = from_pretrained(AutoConfig.from_pretrained, model_config.name_or_path, "model.name_or_path",
                                 trust_remote_code=trust_remote_code)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            model = AutoModelForCausalLM.from_config(config, **kwargs)
    else:
        model = from_pretrained(AutoModelForCausalLM.from_pretrained, model_config.name_or_path, key,
                                **kwargs, **quantization_options(model_config, dtype))
    disable_dropout(model)
    return model


def grow_embeddings(model: PreTrainedModel, vocab_size: int, seed: int) -> None:
    """Grows the embedding matrix to `vocab_size` rows for added tokens.

    Never shrinks: many models pad their vocabulary past the tokenizer's size (the original shrank Pythia's). The
    new rows are drawn from a generator seeded with `seed`, so the same model grown again is the same: a LoRA run's
    frozen base is rebuilt for resuming, evaluating and merging its adapters.
    """
    if vocab_size > model.get_input_embeddings().weight.size(0):
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            model.resize_token_embeddings(vocab_size)


class ValueHead(torch.nn.Module):
    """Maps each position's last hidden state (B, T, H) to a scalar value (B, T): a 3-layer ReLU MLP in float32."""

    def __init__(self, hidden_size: int):
        super().__init__()
        self.summary = torch.nn.Sequential(
            torch.nn.Linear(hidden_size, hidden_size), torch.nn.ReLU(),
            torch.nn.Linear(hidden_size, hidden_size), torch.nn.ReLU(),
            torch.nn.Linear(hidden_size, 1))

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return self.summary(hidden_states.float()).squeeze(-1)


class CausalLMWithValueHead(torch.nn.Module):
    """A causal LM plus a value head for offline PPO.

    The head reads detached hidden states, so the critic loss trains only the head, never the language model.
    Checkpoints keep the two apart: `pretrained_model`'s weights load into a plain causal LM.
    """

    def __init__(self, pretrained_model: PreTrainedModel):
        super().__init__()
        self.pretrained_model = pretrained_model
        config = pretrained_model.config
        self.v_head = ValueHead(getattr(config, "word_embed_proj_dim", None) or config.hidden_size)
        self.v_head.to(next(pretrained_model.parameters()).device)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, **kwargs) -> Tuple[torch.Tensor, torch.Tensor]:
        """Logits (B, T, V) and values (B, T)."""
        output = self.pretrained_model(input_ids, attention_mask=attention_mask, output_hidden_states=True, **kwargs)
        return output.logits, self.v_head(output.hidden_states[-1].detach())


def copy_weights(source: torch.nn.Module, target: torch.nn.Module) -> None:
    """Gives `target`'s parameters the values of `source`'s, in place and in target's dtype (humanline's reference
    sync). Under FSDP both models are sharded alike (distributed.shard_model), so each process copies its shards."""
    sources = dict(source.named_parameters())
    with torch.no_grad():
        for name, parameter in target.named_parameters():
            parameter.copy_(sources[name])


def is_sequence_classifier(model: torch.nn.Module) -> bool:
    return type(model).__name__.endswith("ForSequenceClassification")


class RewardModel(torch.nn.Module):
    """A scalar-head reward model: a Hugging Face sequence classifier with one label (`classifier`), scoring each
    sequence at its last token that is not the pad token, as AutoModelForSequenceClassification does, so that the
    exported classifier gives the scores training saw. Packed rows are scored per sequence.

    Built around a causal LM, it keeps the LM's backbone and adds a fresh (seeded) linear head; built around a
    sequence classifier (a reward model's checkpoint), it keeps that.
    """

    def __init__(self, model: PreTrainedModel):
        super().__init__()
        self.classifier = model if is_sequence_classifier(model) else self.classifier_from(model)

    @staticmethod
    def classifier_from(causal_lm: PreTrainedModel) -> PreTrainedModel:
        """A one-label sequence classifier sharing `causal_lm`'s backbone, with a head drawn from the global RNG
        (the run's seed) the way Hugging Face initialises it; the LM head is dropped."""
        config = copy.deepcopy(causal_lm.config)
        config.num_labels = 1
        with torch.device("meta"):  # its own backbone would be replaced at once: allocate nothing
            classifier = AutoModelForSequenceClassification.from_config(config)
        setattr(classifier, classifier.base_model_prefix, getattr(causal_lm, causal_lm.base_model_prefix))
        weight = causal_lm.get_input_embeddings().weight
        classifier.score = torch.nn.Linear(weight.size(1), 1, bias=False, device=weight.device, dtype=weight.dtype)
        torch.nn.init.normal_(classifier.score.weight, std=getattr(config, "initializer_range", 0.02))
        return classifier

    @property
    def sequence_classifier(self) -> PreTrainedModel:
        """The Hugging Face classifier; with LoRA, the one inside peft's model (its layers carry the adapters)."""
        return self.classifier.get_base_model() if is_adapted(self.classifier) else self.classifier

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, pack: bool = False) -> torch.Tensor:
        """(N,) scores of (N, T) right-padded rows, read at each row's last non-pad token: float32, or float64 for a
        float64 model."""
        classifier = self.sequence_classifier
        pad_token_id = classifier.config.pad_token_id
        columns = torch.arange(input_ids.size(1), device=input_ids.device)
        last = ((input_ids != pad_token_id) * columns).argmax(1)  # the column Hugging Face pools at
        backbone = getattr(classifier, classifier.base_model_prefix)
        packed = pack_rows(input_ids, attention_mask, input_ids, pad_token_id) if pack else None
        if packed is None:
            hidden = backbone(input_ids, attention_mask=attention_mask, use_cache=False).last_hidden_state
            pooled = hidden[torch.arange(input_ids.size(0), device=input_ids.device), last]
        else:
            hidden = backbone(packed.input_ids, position_ids=packed.position_ids, use_cache=False).last_hidden_state
            # Where each row's pooled token went: row r's column c sits where packed.rows == r and position c.
            flat = torch.full((packed.n_rows * input_ids.size(1) + 1,), -1, dtype=torch.long, device=input_ids.device)
            keys = (packed.rows * input_ids.size(1) + packed.position_ids).clamp(max=flat.numel() - 1).reshape(-1)
            flat[keys] = torch.arange(keys.numel(), device=input_ids.device)
            rows = torch.arange(input_ids.size(0), device=input_ids.device)
            pooled = hidden.reshape(-1, hidden.size(-1))[flat[rows * input_ids.size(1) + last]]
        scores = classifier.score(pooled).squeeze(-1)
        return scores.to(torch.promote_types(scores.dtype, torch.float32))
