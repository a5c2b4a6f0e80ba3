"""Per-GPU memory of a training run before it is launched: weights, gradients, optimizer state, activations and the
reference model, for full FSDP and for LoRA, computed from the run's config and the model's dimensions.

    python memory_plan.py model=llama7b loss=dpo                    # 8 GPUs of 80 GiB
    python memory_plan.py model=llama30b loss=kto --gpus 8 --gpu-gib 80 ++model.batch_size=16
    python memory_plan.py model=llama13b loss=dpo --lora-r 16 --lora-targets q_proj k_proj v_proj o_proj

The arguments with `=` are train.py's config overrides (the same presets and keys); the model's dimensions come
from its config.json: a bundled copy in assets/architectures/<preset>/ (llama7b, llama13b, llama30b, llama-1b,
pythia-1b), a local model directory, or the Hugging Face cache (`--model-config DIR` names one). Parameters are
counted on PyTorch's meta device, so nothing is allocated. The LoRA column reads only r and the target modules.
docs/performance.md ("Memory plan") gives the formulas; they are estimates of what the tensors need, not a
measurement: the CUDA context and allocator fragmentation (typically 1 to 3 GiB) come on top.
"""
import argparse
import sys
from typing import Dict, List, NamedTuple, Optional, Sequence

import torch
from hydra import compose, initialize_config_dir
from omegaconf import DictConfig, OmegaConf
from transformers import AutoConfig, AutoModelForCausalLM

from errors import ConfigError, HalosError
from resolve import resolve_class
from trainers import PairedPreferenceTrainer
from utils import REPO_ROOT, register_resolvers

ARCHITECTURES_DIR = REPO_ROOT / "assets" / "architectures"
GIB = 2**30
# Tensors of optimizer state per parameter (torch defaults: no momentum buffer for RMSprop and SGD).
OPTIMIZER_STATES = {"SGD": 0, "RMSprop": 1, "Adagrad": 1, "Adam": 2, "AdamW": 2, "NAdam": 2, "RAdam": 2, "Adamax": 2}


class ModelShape(NamedTuple):
    """What the plan needs of an architecture, read from a model built on the meta device."""

    parameters: int
    block_parameters: int  # of one transformer block (model.block_name), the unit FSDP gathers
    layers: int
    hidden: int
    kv_hidden: int  # key/value width: kv heads x head dim
    intermediate: int
    gated_mlp: bool  # SwiGLU (gate, up, down) rather than two matrices
    vocab: int
    lora_parameters: int  # r x (in + out) over the target Linear modules, for the LoRA plan's r and targets
    lora_rows: int  # summed r over the target modules of one block (their low-rank activations)


def architecture_dir(model_choice: Optional[str], model_config: DictConfig, override: Optional[str]) -> str:
    """Where the model's config.json is read from: --model-config, the bundled copy, or name_or_path."""
    if override:
        return override
    bundled = ARCHITECTURES_DIR / str(model_choice)
    return str(bundled) if (bundled / "config.json").is_file() else str(model_config.name_or_path)


def model_shape(directory: str, block_name: Optional[str], lora_r: int = 0,
                lora_targets: Sequence[str] = ()) -> ModelShape:
    """The shape of the model whose config.json `directory` holds, with its LoRA adapter of rank `lora_r` on the
    `lora_targets` Linear modules of each block (none by default)."""
    try:
        config = AutoConfig.from_pretrained(directory, local_files_only=True)
    except (OSError, ValueError):
        bundled = ", ".join(sorted(p.name for p in ARCHITECTURES_DIR.iterdir()))
        raise HalosError(f"no config.json for {directory} here (bundled: {bundled}); pass --model-config with a "
                         "directory holding the model's config.json") from None
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    blocks = [m for m in model.modules() if type(m).__name__ == block_name]
    if not blocks:
        raise ConfigError(f"invalid config: model.block_name={block_name} names no module of "
                          f"{type(model).__name__}")
    targets = [m for name, m in blocks[0].named_modules()
               if isinstance(m, torch.nn.Linear) and name.rsplit(".", 1)[-1] in lora_targets]
    if lora_targets and not targets:
        raise ConfigError(f"--lora-targets {' '.join(lora_targets)} name no Linear module of {block_name}")
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    kv_heads = getattr(config, "num_key_value_heads", None) or config.num_attention_heads
    return ModelShape(
        parameters=sum(p.numel() for p in model.parameters()),
        block_parameters=sum(p.numel() for p in blocks[0].parameters()),
        layers=len(blocks), hidden=config.hidden_size, kv_hidden=kv_heads * head_dim,
        intermediate=config.intermediate_size,
        gated_mlp=any(name.endswith("gate_proj") for name, _ in blocks[0].named_modules()),
        vocab=config.vocab_size,
        lora_parameters=len(blocks) * sum(lora_r * (m.in_features + m.out_features) for m in targets),
        lora_rows=lora_r * len(targets))


def dtype_bytes(name: Optional[str]) -> int:
    return getattr(torch, str(name)).itemsize


def block_activation_elements(shape: ModelShape) -> int:
    """Elements per token that one block keeps for its backward with memory-efficient attention (no T x T scores):
    the attention half keeps its input, normed input, q/k/v and attention output (4H + 2 kvH), the MLP half its
    input, normed input and 3I (gated: gate, up, their product) or 2I intermediate values."""
    return 6 * shape.hidden + 2 * shape.kv_hidden + (3 if shape.gated_mlp else 2) * shape.intermediate


def plan(config: DictConfig, shape: ModelShape, gpus: int, lora: bool) -> Dict[str, int]:
    """Bytes per GPU of each component, for full FSDP or (lora) a LoRA adapter on the frozen, sharded base model.

    Sharded tensors count 1/gpus of the whole; the unsharded ones FSDP builds while a unit computes count in full:
    the root unit (embeddings, final norm, head), which stays gathered through forward and backward, and two blocks
    (the one computing and the one prefetched). Activations are the policy's rows of one micro-batch on this GPU, of
    max_length tokens each (an upper bound: rows are as long as their data); with share_prompts a pair's prompt is
    kept once, which this plan does not subtract.
    """
    model = config.model
    storage, compute = dtype_bytes(model.policy_dtype), dtype_bytes(model.fsdp_policy_mp or model.policy_dtype)
    # A paired loss backpropagates through two rows per example (chosen, rejected), the others through one.
    paired = issubclass(resolve_class(str(config.loss.trainer), "trainers"), PairedPreferenceTrainer)
    rows = model.batch_size // gpus * (2 if paired else 1)
    live_reference = config.loss.use_reference_model and not config.cache_reference_logprobs
    tokens = rows * model.max_length
    trained = shape.lora_parameters if lora else shape.parameters
    gathered = shape.parameters - shape.layers * shape.block_parameters + 2 * shape.block_parameters
    states = OPTIMIZER_STATES.get(str(config.optimizer))
    if states is None:
        raise ConfigError(f"invalid config: optimizer: the memory plan knows {', '.join(OPTIMIZER_STATES)}, "
                          f"not {config.optimizer}")
    block = block_activation_elements(shape) + (shape.lora_rows if lora else 0)
    saved = shape.layers * shape.hidden if model.activation_checkpointing else shape.layers * block
    components = {
        "policy weights": shape.parameters * storage // gpus + (shape.lora_parameters * storage // gpus if lora else 0),
        # Gathered weights, and their gradients before the reduce-scatter (only the adapter's with LoRA).
        "FSDP unsharded units": gathered * compute * (1 if lora else 2),
        "gradients": trained * storage // gpus,
        "optimizer state": states * trained * storage // gpus,
        # Block inputs (recomputed from in backward), plus the one block being recomputed.
        "activations": tokens * (saved + (block if model.activation_checkpointing else 0)) * compute,
        # The policy's, kept for backward, and the reference's, computed while the policy's are kept.
        "logits": tokens * shape.vocab * compute * (2 if live_reference else 1),
        # LoRA's reference is the base model with the adapter switched off: no second copy.
        "reference weights": shape.parameters * dtype_bytes(model.reference_dtype) // gpus
        if live_reference and not lora else 0,
    }
    components["total"] = sum(components.values())
    return components


def compose_config(overrides: Sequence[str]) -> DictConfig:
    register_resolvers()
    with initialize_config_dir(config_dir=str(REPO_ROOT / "config"), version_base=None):
        config = compose(config_name="config", overrides=["exp_name=memory_plan", "mode=train", "datasets=[hh]",
                                                          *overrides])
    OmegaConf.resolve(config)
    return config


def table(config: DictConfig, shape: ModelShape, model_choice: str, loss_choice: str, gpus: int,
          gpu_gib: float) -> List[str]:
    full, lora = plan(config, shape, gpus, lora=False), plan(config, shape, gpus, lora=True)
    model = config.model
    lines = [f"{model_choice} ({shape.parameters / 1e9:.2f} B parameters), loss {loss_choice}, {gpus} GPUs of "
             f"{gpu_gib:g} GiB: batch {model.batch_size} ({model.batch_size // gpus} per GPU), max_length "
             f"{model.max_length}, weights {model.policy_dtype}, compute {model.fsdp_policy_mp or model.policy_dtype}, "
             f"optimizer {config.optimizer}, activation checkpointing {str(model.activation_checkpointing).lower()}; "
             f"LoRA: {shape.lora_parameters / 1e6:.1f} M adapter parameters", "",
             "| per GPU, GiB | full FSDP | LoRA |", "|---|---:|---:|"]
    lines += [f"| {name} | {full[name] / GIB:.2f} | {lora[name] / GIB:.2f} |" for name in full]
    lines.append(f"| fits in {gpu_gib:g} GiB | {'yes' if full['total'] <= gpu_gib * GIB else 'no'} "
                 f"| {'yes' if lora['total'] <= gpu_gib * GIB else 'no'} |")
    return lines


def parse_args(argv: Optional[List[str]] = None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("overrides", nargs="*", help="train.py config overrides, e.g. model=llama7b loss=dpo")
    parser.add_argument("--gpus", type=int, default=8)
    parser.add_argument("--gpu-gib", type=float, default=80.0)
    parser.add_argument("--lora-r", type=int, default=16)
    parser.add_argument("--lora-targets", nargs="+", default=["q_proj", "k_proj", "v_proj", "o_proj"])
    parser.add_argument("--model-config", help="a directory holding the model's config.json")
    return parser.parse_args(argv)


def choice(overrides: Sequence[str], group: str) -> Optional[str]:
    return next((o.split("=", 1)[1] for o in overrides if o.lstrip("+").split("=", 1)[0] == group), None)


def main(argv: Optional[List[str]] = None) -> None:
    args = parse_args(argv)
    model_choice, loss_choice = choice(args.overrides, "model"), choice(args.overrides, "loss")
    if model_choice is None or loss_choice is None:
        raise SystemExit("error: name a model preset and a loss, e.g. python memory_plan.py model=llama7b loss=dpo")
    try:
        config = compose_config(args.overrides)
        if config.model.batch_size % args.gpus:
            raise ConfigError(f"invalid config: model.batch_size: {config.model.batch_size} does not divide over "
                              f"{args.gpus} GPUs")
        shape = model_shape(architecture_dir(model_choice, config.model, args.model_config),
                            config.model.block_name, args.lora_r, args.lora_targets)
        print("\n".join(table(config, shape, model_choice, loss_choice, args.gpus, args.gpu_gib)))
    except HalosError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    main()
