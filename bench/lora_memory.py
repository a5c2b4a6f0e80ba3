"""Peak memory of DPO training on one model: full fine-tuning against LoRA, with and without the reference log-prob
cache, and the trainable parameter counts.

    .venv/bin/python bench/lora_memory.py [--activation_checkpointing]     # about 4 minutes on 2 shared cores

The model is a randomly initialised Llama (`--hidden`, `--layers`; the tiny model's 4,096-token vocabulary and
tokenizer), built by the real train path (builders.build_models, from a seed) in float32. Each setup runs HALOs'
own DPOTrainer.train() for `--steps` optimizer steps of `--batch` pairs of the bundled HH sample (max_length
`--max_length`), RMSprop, then its final evaluation; no checkpoint is written (debug=true). The setups differ only
in `model.use_peft` and `cache_reference_logprobs`:

* full: the policy, and a second copy of the weights as the reference model;
* full + cache: the same, with the reference model freed once the cache is filled;
* LoRA: adapters (r=`--r`) on every linear layer; the reference is the policy with its adapters disabled;
* LoRA + cache: the same, and training runs no reference pass at all.

Memory is counted by bench/memory.py's TensorMemoryTracker around training, holding the built models' weights
(policy, LoRA adapters, reference model) from the start: the largest number of bytes held at once by the weights and
by the tensors training creates (gradients, optimizer state, activations, logits, batches). A reference model freed
by the cache stops counting when it is garbage. Python objects (the cache's floats, the tokenised dataset) are not
counted, nor is what building the models allocates transiently.
"""
import argparse
import json
import os
import shutil
import sys
import tempfile
from pathlib import Path
from typing import List, NamedTuple, Optional

REPO_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO_ROOT))
os.environ.update(HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", TRANSFORMERS_OFFLINE="1", TOKENIZERS_PARALLELISM="false")

import torch  # noqa: E402
from hydra import compose, initialize_config_dir  # noqa: E402

from bench.memory import TensorMemoryTracker  # noqa: E402
from builders import build_models, build_train_and_eval_loaders  # noqa: E402
from configuration import validate_train_config  # noqa: E402
from lora import parameter_counts  # noqa: E402
from models import load_tokenizer  # noqa: E402
from trainers import DPOTrainer  # noqa: E402
from utils import register_resolvers  # noqa: E402

MiB = 2 ** 20
SETUPS = {"full": (), "full + cache": ("cache_reference_logprobs=true",), "LoRA": ("model.use_peft=true",),
          "LoRA + cache": ("model.use_peft=true", "cache_reference_logprobs=true")}


class Measurement(NamedTuple):
    trainable: int  # parameters the optimizer steps
    total: int  # parameters of the policy (with LoRA: base + adapters)
    weights_bytes: int  # the models' weights (policy, adapters, reference model)
    peak_bytes: int  # most tensor bytes held at once, building and training


def model_dir(directory: Path, hidden: int, layers: int) -> Path:
    """The tiny model's config and tokenizer, with `hidden` width and `layers` blocks (heads of 64)."""
    shutil.copytree(REPO_ROOT / "assets" / "tiny-llama", directory)
    config = json.loads((directory / "config.json").read_text())
    config.update(hidden_size=hidden, intermediate_size=4 * hidden, num_hidden_layers=layers,
                  num_attention_heads=hidden // 64, num_key_value_heads=hidden // 64, head_dim=64)
    (directory / "config.json").write_text(json.dumps(config))
    return directory


def measure(model_path: Path, cache_dir: Path, overrides: List[str]) -> Measurement:
    with initialize_config_dir(config_dir=str(REPO_ROOT / "config"), version_base=None):
        config = compose(config_name="config", overrides=[
            "loss=dpo", "model=tiny", "datasets=[hh]", "mode=train", "exp_name=bench", f"cache_dir={cache_dir}",
            f"model.name_or_path={model_path}", "debug=true", "do_first_eval=false", *overrides])
    validate_train_config(config, "dpo")
    tokenizer = load_tokenizer(config.model)
    train_loader, eval_loader = build_train_and_eval_loaders(config, tokenizer)
    cpu = torch.device("cpu")
    policy, reference = build_models(config, cpu, len(tokenizer), DPOTrainer.wrap_policy)
    trainer = DPOTrainer(tokenizer, config, train_loader, eval_loader, policy, reference, device=cpu)
    del reference  # from here the trainer alone holds the reference model, so that the cache can free it
    with TensorMemoryTracker() as tracker:
        tracker.hold(model_tensors(policy, trainer.reference_model))
        weights_bytes = tracker.live_bytes
        trainer.train()
    return Measurement(*parameter_counts(policy), weights_bytes, tracker.peak_bytes)


def model_tensors(policy: torch.nn.Module, reference) -> List[torch.Tensor]:
    """The parameters and buffers of the policy and the reference model. A CachedReference and an
    AdapterFreeReference are no modules: their weights are those of the model they wrap, or the policy's."""
    models = [m for m in (policy, reference, getattr(reference, "model", None)) if isinstance(m, torch.nn.Module)]
    return [tensor for model in models for tensor in (*model.parameters(), *model.buffers())]


def parse_args(argv: Optional[List[str]] = None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--r", type=int, default=16)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--max_length", type=int, default=256)
    parser.add_argument("--activation_checkpointing", action="store_true",
                        help="recompute each block's activations in backward (model.activation_checkpointing)")
    return parser.parse_args(argv)


def main(argv: Optional[List[str]] = None) -> None:
    args = parse_args(argv)
    register_resolvers()
    torch.set_num_threads(max(1, len(os.sched_getaffinity(0))))
    shared = [f"model.peft.r={args.r}", f"model.peft.alpha={2 * args.r}", f"model.batch_size={args.batch}",
              f"model.eval_batch_size={args.batch}", f"n_examples={args.steps * args.batch}", "n_epochs=null",
              f"n_eval_examples={args.batch}", f"model.max_length={args.max_length}",
              f"model.max_prompt_length={args.max_length // 2}", "wandb.enabled=false",
              f"model.activation_checkpointing={str(args.activation_checkpointing).lower()}"]
    rows = {}
    with tempfile.TemporaryDirectory() as scratch:
        model_path = model_dir(Path(scratch) / "model", args.hidden, args.layers)
        for name, overrides in SETUPS.items():
            rows[name] = measure(model_path, Path(scratch) / name.replace(" ", ""), shared + list(overrides))
    full = rows["full"]
    print(f"\ntorch {torch.__version__}, Llama {args.layers} x {args.hidden}, float32, DPO, RMSprop, {args.steps} "
          f"steps of {args.batch} pairs, max_length {args.max_length}, LoRA r={args.r} on all linear layers, activation "
          f"checkpointing {'on' if args.activation_checkpointing else 'off'}\n")
    print("| setup | trainable parameters | weights, MiB | peak, MiB | peak / full |")
    print("|---|---:|---:|---:|---:|")
    for name, row in rows.items():
        print(f"| {name} | {row.trainable:,} of {row.total:,} ({100 * row.trainable / row.total:.2f}%) "
              f"| {row.weights_bytes / MiB:,.1f} | {row.peak_bytes / MiB:,.1f} | {row.peak_bytes / full.peak_bytes:.3f} |")


if __name__ == "__main__":
    main()
