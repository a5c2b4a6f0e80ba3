"""Training-step throughput and peak memory on the CPU: HALOs' SFT, DPO and KTO steps against the bare-model floor
and against TRL's trainers, all on the same model, weights, batch, lengths and optimizer.

    .venv/bin/python bench/train_throughput.py              # about 5 minutes on 2 cores
    .venv/bin/python bench/train_throughput.py --skip-trl   # without TRL (pip install -r bench/requirements.txt)

The model is a randomly initialised Llama with a 32k vocabulary (about 20 M parameters), built once from a seed;
every contender gets its own copy of the same weights (policy and reference). The batch is the first batch of the
bundled HH sample as HALOs' dataloaders build it (8 examples, max_length 256, max_prompt_length 128, the tiny
tokenizer); TRL's collators get the very same token ids. A step is forward(s) + loss + backward + AdamW step
(lr 1e-6, no weight decay) + zero_grad, on that fixed batch, in float32. Tokens are the non-padding tokens of the
rows the policy runs (SFT: targets; DPO: chosen + rejected; KTO: targets + KL rows), the same count for everyone.

Each contender runs one untimed warm-up step (it allocates the optimizer state and fills the reference cache), then
`--repeats` timed steps, round-robin over the contenders (the median is reported), then one step under
bench/memory.py's tracker for the peak bytes of the tensors the step allocates (activations, logits, gradients; not
the weights or the optimizer state).
See docs/performance.md for what each row measures.
"""
import argparse
import os
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path
from typing import Callable, Dict, List, NamedTuple, Optional, Tuple

REPO_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO_ROOT))
os.environ.update(HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", TRANSFORMERS_OFFLINE="1", TOKENIZERS_PARALLELISM="false")

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from hydra import compose, initialize_config_dir  # noqa: E402
from transformers import LlamaConfig, LlamaForCausalLM  # noqa: E402

import trainers  # noqa: E402
from bench.memory import TensorMemoryTracker  # noqa: E402
from builders import build_dataloader  # noqa: E402
from configuration import validate_train_config  # noqa: E402
from dataloader import CHOSEN_KEYS, KL_KEYS, PROMPT_KEYS, REJECTED_KEYS, STATUS_KEY, TARGET_KEYS  # noqa: E402
from models import load_tokenizer  # noqa: E402
from reference_cache import CachedReference, LogpStore  # noqa: E402
from trainers import concatenate_rows  # noqa: E402
from utils import IGNORE_INDEX, next_token_labels, pack_rows, register_resolvers  # noqa: E402

LOSSES = {"sft": trainers.SFTTrainer, "dpo": trainers.DPOTrainer, "kto": trainers.KTOTrainer}
ROW_GROUPS = {"sft": (TARGET_KEYS,), "dpo": (CHOSEN_KEYS, REJECTED_KEYS), "kto": (TARGET_KEYS,)}  # rows with grad
LEARNING_RATE = 1e-6
Step = Callable[[], None]


class Result(NamedTuple):
    name: str
    seconds: float  # median step time
    peak_bytes: int


def model_config(args, max_positions: int = 512) -> LlamaConfig:
    return LlamaConfig(vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=3 * args.hidden,
                       num_hidden_layers=args.layers, num_attention_heads=args.hidden // 64,
                       num_key_value_heads=args.hidden // 64, max_position_embeddings=max(512, max_positions),
                       tie_word_embeddings=False, attn_implementation="sdpa")


class Weights:
    """Fresh model copies with one set of seeded weights."""

    def __init__(self, config: LlamaConfig, seed: int = 0):
        torch.manual_seed(seed)
        self.config, self.state = config, LlamaForCausalLM(config).state_dict()

    def model(self, trainable: bool = True) -> LlamaForCausalLM:
        model = LlamaForCausalLM(self.config)
        model.load_state_dict(self.state)
        return model.train() if trainable else model.requires_grad_(False).eval()


def halos_config(loss: str, args):
    """The composed, resolved and validated HALOs config of `loss` with the benchmark's batch and lengths."""
    with initialize_config_dir(config_dir=str(REPO_ROOT / "config"), version_base=None):
        config = compose(config_name="config", overrides=[
            f"loss={loss}", "model=tiny", "datasets=[hh]", "exp_name=bench", "mode=train", "wandb.enabled=false",
            f"model.batch_size={args.batch_size}", f"model.max_length={args.max_length}",
            f"model.max_prompt_length={args.max_length // 2}", "n_epochs=null", f"n_examples={args.batch_size}"])
    validate_train_config(config, loss)
    return config


def first_batch(config, tokenizer):
    """The loader (yielding just this batch) and its one batch."""
    loader = build_dataloader(config, tokenizer, "train", config.model.batch_size, None, config.model.batch_size)
    return loader, next(iter(loader))


def policy_tokens(loss: str, batch: Dict) -> int:
    groups = ROW_GROUPS[loss] + ((KL_KEYS,) if loss == "kto" else ())
    return sum(int(batch[keys.combined_attention_mask].sum()) for keys in groups)


def optimizer_for(model: torch.nn.Module) -> torch.optim.Optimizer:
    return torch.optim.AdamW(model.parameters(), lr=LEARNING_RATE, weight_decay=0.0)


def optimizer_step(optimizer: torch.optim.Optimizer) -> None:
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


# --- the floors: the bare model and PyTorch's cross-entropy, nothing else ---------------------------------------


class Layout(NamedTuple):
    """Rows as the floor feeds them to the model: padded with full logits, or lean (HALOs' layout)."""

    input_ids: torch.Tensor  # (R, T)
    model_kwargs: Dict  # attention_mask (padded) or position_ids (packed); logits_to_keep (lean)
    targets: torch.Tensor  # labels of the positions whose logits the model returns, flattened


def padded_layout(input_ids, attention_mask, labels) -> Layout:
    return Layout(input_ids, {"attention_mask": attention_mask}, next_token_labels(labels).flatten())


def lean_layout(input_ids, attention_mask, labels, pad_token_id: int) -> Layout:
    """Packed rows (when packing saves a row) and logits only where the next token is labelled."""
    packed = pack_rows(input_ids, attention_mask, labels, pad_token_id)
    kwargs = {"attention_mask": attention_mask} if packed is None else {"position_ids": packed.position_ids}
    input_ids, labels = (input_ids, labels) if packed is None else (packed.input_ids, packed.labels)
    next_labels = next_token_labels(labels)
    keep = next_labels != IGNORE_INDEX
    return Layout(input_ids, {**kwargs, "logits_to_keep": keep}, next_labels[keep])


def floor_step(loss: str, batch: Dict, weights: Weights, pad_token_id: int, with_reference: bool,
               lean: bool) -> Step:
    """Policy forward+backward over the rows that need gradients, a no-grad policy forward over KTO's KL rows, and
    (with_reference) a reference forward over every row: the least work the loss needs, done by the bare model."""
    def layout(groups):
        rows = concatenate_rows(batch, groups, pad_token_id)
        return lean_layout(*rows, pad_token_id) if lean else padded_layout(*rows)

    policy, reference = weights.model(), weights.model(trainable=False) if with_reference else None
    optimizer = optimizer_for(policy)
    grad_rows = layout(ROW_GROUPS[loss])
    kl_rows = layout((KL_KEYS,)) if loss == "kto" else None

    def step():
        logits = policy(grad_rows.input_ids, use_cache=False, **grad_rows.model_kwargs).logits
        F.cross_entropy(logits.flatten(0, -2), grad_rows.targets, ignore_index=IGNORE_INDEX, reduction="sum").backward()
        with torch.no_grad():
            for model, rows in ((policy, kl_rows), (reference, grad_rows), (reference, kl_rows)):
                if model is not None and rows is not None:
                    model(rows.input_ids, use_cache=False, **rows.model_kwargs)
        optimizer_step(optimizer)
    return step


# --- HALOs -----------------------------------------------------------------------------------------------------


def halos_step(loss: str, args, weights: Weights, tokenizer, cache_dir: Optional[str] = None,
               batch: Optional[Dict] = None, **settings) -> Step:
    """HALOs' training step of `loss` on `batch` (default: the first HH batch): get_batch_metrics, backward, AdamW.

    `settings` are top-level config keys for this contender (pack_sequences, share_prompts); with `cache_dir` the
    reference log-probs are cached there."""
    config = halos_config(loss, args)
    config.update(settings)
    loader = None
    if batch is None:
        loader, batch = first_batch(config, tokenizer)
    reference = weights.model(trainable=False) if LOSSES[loss].requires_reference_model else None
    if cache_dir is not None and reference is not None:
        name = "-".join([loss, *(f"{key}={value}" for key, value in sorted(settings.items()))])
        reference = CachedReference(reference, LogpStore(Path(cache_dir) / f"{name}.pt", {"bench": name}))
    trainer = LOSSES[loss](tokenizer, config, loader, None, weights.model(), reference)
    optimizer = optimizer_for(trainer.policy)

    def step():
        step_loss, _ = trainer.get_batch_metrics(batch, mode="train")
        step_loss.backward()
        optimizer_step(optimizer)
    return step


# --- TRL -------------------------------------------------------------------------------------------------------


def unpadded(ids: torch.Tensor, mask: torch.Tensor) -> List[int]:
    return ids[mask.bool()].tolist()


def trl_examples(loss: str, batch: Dict) -> List[Dict]:
    """HALOs' batch as TRL's collators want it: the same token ids, unpadded."""
    def prompt(k):
        return unpadded(batch[PROMPT_KEYS.input_ids][k], batch[PROMPT_KEYS.attention_mask][k])

    def response(keys, k):
        return unpadded(batch[keys.input_ids][k], batch[keys.attention_mask][k])

    n = len(batch[PROMPT_KEYS.text])
    if loss == "sft":
        return [{"input_ids": unpadded(batch[TARGET_KEYS.combined_input_ids][k],
                                       batch[TARGET_KEYS.combined_attention_mask][k]),
                 "labels": [IGNORE_INDEX] * len(prompt(k)) + response(TARGET_KEYS, k)} for k in range(n)]
    if loss == "dpo":
        return [{"prompt_ids": prompt(k), "chosen_ids": response(CHOSEN_KEYS, k),
                 "rejected_ids": response(REJECTED_KEYS, k)} for k in range(n)]
    return [{"prompt_ids": prompt(k), "completion_ids": response(TARGET_KEYS, k),
             "KL_completion_ids": response(KL_KEYS, k), "label": batch[STATUS_KEY][k] == "chosen"} for k in range(n)]


def trl_text_dataset(loss: str, batch: Dict):
    """A small text dataset for TRL's constructors (which tokenise one); the timed steps use `trl_examples`."""
    from datasets import Dataset

    n = len(batch[PROMPT_KEYS.text])
    prompts = batch[PROMPT_KEYS.text]
    if loss == "sft":
        return Dataset.from_dict({"prompt": prompts, "completion": batch[TARGET_KEYS.text]})
    if loss == "dpo":
        return Dataset.from_dict({"prompt": prompts, "chosen": batch[CHOSEN_KEYS.text],
                                  "rejected": batch[REJECTED_KEYS.text]})
    return Dataset.from_dict({"prompt": prompts, "completion": batch[TARGET_KEYS.text],
                              "label": [batch[STATUS_KEY][k] == "chosen" for k in range(n)]})


def trl_trainer(loss: str, args, weights: Weights, tokenizer, batch: Dict, output_dir: str):
    import trl

    common = dict(output_dir=output_dir, per_device_train_batch_size=args.batch_size, max_length=args.max_length,
                  learning_rate=LEARNING_RATE, weight_decay=0.0,
                  report_to=[], use_cpu=True, bf16=False, save_strategy="no", logging_strategy="no",
                  dataloader_num_workers=0)
    dataset = trl_text_dataset(loss, batch)
    if loss == "sft":
        return trl.SFTTrainer(model=weights.model(), args=trl.SFTConfig(**common), train_dataset=dataset,
                              processing_class=tokenizer)
    if loss == "dpo":
        return trl.DPOTrainer(model=weights.model(), ref_model=weights.model(trainable=False),
                              args=trl.DPOConfig(beta=0.1, **common), train_dataset=dataset, processing_class=tokenizer)
    return trl.KTOTrainer(model=weights.model(), ref_model=weights.model(trainable=False),
                          args=trl.KTOConfig(beta=0.1, train_sampling_strategy="sequential", **common),
                          train_dataset=dataset, processing_class=tokenizer)


def trl_step(loss: str, args, weights: Weights, tokenizer, batch: Dict, output_dir: str) -> Step:
    """TRL's own training_step (forward, loss, metrics, backward) on the collated batch, then the optimizer."""
    trainer = trl_trainer(loss, args, weights, tokenizer, batch, output_dir)
    inputs = trainer.data_collator(trl_examples(loss, batch))
    optimizer = optimizer_for(trainer.model)
    trainer.current_gradient_accumulation_steps = 1  # set by Trainer's own loop, which is not used here

    def step():
        trainer.training_step(trainer.model, inputs)
        optimizer_step(optimizer)
    return step


# --- measuring -------------------------------------------------------------------------------------------------


def measure(steps: Dict[str, Step], repeats: int) -> List[Result]:
    """Median step time (CPU seconds of this process) and tensor peak of each contender.

    CPU time rather than wall time, because the development machines are shared: with one intra-op thread
    (--threads 1, the default) a step's CPU time is what its wall time is on an idle machine, while its wall time
    also counts the time other processes held the core. The timed steps go round-robin over the contenders, so
    that what load remains (cache and memory-bandwidth contention) falls on all of them alike.
    """
    for step in steps.values():
        step()  # warm-up: optimizer state, reference cache
    times = {name: [] for name in steps}
    for _ in range(repeats):
        for name, step in steps.items():
            start = time.process_time()
            step()
            times[name].append(time.process_time() - start)
    results = []
    for name, step in steps.items():
        with TensorMemoryTracker() as tracker:
            step()
        print(f"  {name}: {statistics.median(times[name]):.3f} s/step "
              f"(runs: {', '.join(f'{t:.3f}' for t in times[name])})", flush=True)
        results.append(Result(name, statistics.median(times[name]), tracker.peak_bytes))
    return results


def contenders(loss: str, args, weights: Weights, tokenizer, batch: Dict, workdir: str) -> Dict[str, Step]:
    pad = tokenizer.pad_token_id
    needs_reference = LOSSES[loss].requires_reference_model
    steps = {}
    for lean, layout in ((False, "padded"), (True, "lean")):
        steps[f"floor ({layout}): policy fwd+bwd"] = floor_step(loss, batch, weights, pad, False, lean)
        if needs_reference:
            steps[f"floor ({layout}): + reference fwd"] = floor_step(loss, batch, weights, pad, True, lean)
    steps["halos"] = halos_step(loss, args, weights, tokenizer)
    if loss != "sft":  # SFT rows do not share prompts
        steps["halos, no prompt sharing"] = halos_step(loss, args, weights, tokenizer, share_prompts=False)
    steps["halos, no packing"] = halos_step(loss, args, weights, tokenizer, pack_sequences=False,
                                            share_prompts=False)
    if needs_reference:
        steps["halos, cached reference"] = halos_step(loss, args, weights, tokenizer, cache_dir=workdir)
    if not args.skip_trl:
        steps["trl"] = trl_step(loss, args, weights, tokenizer, batch, os.path.join(workdir, f"trl-{loss}"))
    return steps


def run_loss(loss: str, args, weights: Weights, tokenizer, workdir: str) -> List[Result]:
    _, batch = first_batch(halos_config(loss, args), tokenizer)
    tokens = policy_tokens(loss, batch)
    print(f"{loss}: {tokens} policy tokens per step", flush=True)
    results = measure(contenders(loss, args, weights, tokenizer, batch, workdir), args.repeats)
    print_table(loss, tokens, results)
    return results


def print_table(loss: str, tokens: int, results: List[Result]) -> None:
    """Markdown table: throughput, tensor peak, and each step's time over the floors' and TRL's."""
    by_name = {r.name: r for r in results}

    def floor(layout: str, with_reference: bool) -> Result:
        name = f"floor ({layout}): " + ("+ reference fwd" if with_reference else "policy fwd+bwd")
        return by_name.get(name, by_name[f"floor ({layout}): policy fwd+bwd"])

    trl = by_name.get("trl")
    print(f"\n| {loss} | tokens/s | peak MiB | time / floor (padded) | time / floor (lean) | tokens/s vs TRL |")
    print("|---|---:|---:|---:|---:|---:|")
    for r in results:
        # A cached step is held to the policy-only floor: it runs no reference model.
        with_reference = "cached" not in r.name and "policy fwd+bwd" not in r.name
        versus_trl = f"{trl.seconds / r.seconds:.2f}x" if trl else "-"
        print(f"| {r.name} | {tokens / r.seconds:,.0f} | {r.peak_bytes / 2**20:,.0f} "
              f"| {r.seconds / floor('padded', with_reference).seconds:.2f} "
              f"| {r.seconds / floor('lean', with_reference).seconds:.2f} | {versus_trl} |")
    print(flush=True)


def trl_available() -> bool:
    try:
        import trl  # noqa: F401
    except ImportError:
        return False
    return True


def parse_args(argv: Optional[List[str]] = None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--losses", nargs="+", default=list(LOSSES), choices=list(LOSSES))
    parser.add_argument("--repeats", type=int, default=3, help="timed steps per contender (the median is reported)")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--max-length", type=int, default=256)
    parser.add_argument("--vocab", type=int, default=32_000)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads (see `measure`)")
    parser.add_argument("--skip-trl", action="store_true", help="leave TRL out")
    return parser.parse_args(argv)


def set_up(args) -> Tuple[object, Weights]:
    """Threads (see `measure`), quiet warnings, the tiny tokenizer and the benchmark model's weights, described in
    one line."""
    torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore")
    register_resolvers()
    tokenizer = load_tokenizer(halos_config("sft", args).model)
    if args.vocab < len(tokenizer):
        raise SystemExit(f"--vocab {args.vocab} is smaller than the tokenizer's {len(tokenizer)} ids")
    weights = Weights(model_config(args))
    n_parameters = sum(t.numel() for t in weights.state.values())
    print(f"torch {torch.__version__}, {torch.get_num_threads()} thread(s), "
          f"model {n_parameters / 1e6:.1f} M parameters, "
          f"load average at start {os.getloadavg()[0]:.2f}", flush=True)
    return tokenizer, weights


def main(argv: Optional[List[str]] = None) -> None:
    args = parse_args(argv)
    if not args.skip_trl and not trl_available():
        print("TRL is not installed, so its rows are skipped (pip install -r bench/requirements.txt)")
        args.skip_trl = True
    tokenizer, weights = set_up(args)
    with tempfile.TemporaryDirectory() as workdir:
        for loss in args.losses:
            run_loss(loss, args, weights, tokenizer, workdir)
    print(f"load average at end {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
