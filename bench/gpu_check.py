"""GPU check: SFT, DPO and KTO training steps of a randomly initialised ~1B model in bf16 under FSDP in one NCCL
process (tokens/s, model FLOPs utilisation, peak GPU memory) for padded, packed and shared-prompt batches with sdpa
and flex attention, then a few DPO steps checked against fp32; writes a markdown table.

    bash bench/gpu_check.sh                      # on the GPU machine: installs bench/wheels/, then runs this
    python bench/gpu_check.py --dry-run          # the same code path on the CPU: tiny model, gloo (tested)

The models are llama-1b (TinyLlama's 1.1 B shape) and pythia-1b (GPT-NeoX), built from the config.json files in
assets/architectures/ with seeded random weights: no hub access is needed. The batches are the bundled HH sample
through HALOs' own dataloaders and the tiny tokenizer (its ids fit either vocabulary). Each run is a Hydra-composed,
validated train config (float32 weights, model.fsdp_policy_mp=bfloat16, bf16 reference, activation checkpointing,
RMSprop); the models are built by models.load_causal_lm, sharded by distributed.shard_model (FSDP2, even in one
process) and trained by the trainer's own prepare_step and train_on_batch, the calls its train() makes.

Timing: `--warmup` untimed steps (allocator, flex_attention compilation), then `--steps` timed ones, synchronised.
tokens/s counts the non-padding tokens of the policy's rows (as bench/train_throughput.py does), the same for every
layout, so it compares them directly. Model FLOPs are those of the tokens each pass actually runs (a shared prompt
once; padding not counted): 6 N (2 N without gradients) per token for the N non-embedding weights, the attention's
4 x layers x width per attended key (x3 with gradients), and the head's 2 x hidden x vocab per scored position
(x3 with gradients); activation recomputation is not counted. MFU divides by --peak-tflops (default: the dense bf16
peak of the GPU named in PEAK_BF16_TFLOPS).
"""
import argparse
import os
import sys
import time
import traceback
from collections import defaultdict
from pathlib import Path
from typing import Dict, List, NamedTuple, Optional, Tuple

REPO_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO_ROOT))
os.environ.update(HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", TRANSFORMERS_OFFLINE="1", TOKENIZERS_PARALLELISM="false")

import torch  # noqa: E402
import transformers  # noqa: E402
from hydra import compose, initialize_config_dir  # noqa: E402

import distributed  # noqa: E402
from bench.step_work import step_work  # noqa: E402
from bench.train_throughput import policy_tokens  # noqa: E402
from builders import build_dataloader  # noqa: E402
from configuration import validate_train_config  # noqa: E402
from logps import PACKABLE_ATTENTION  # noqa: E402
from memory_plan import ModelShape, model_shape  # noqa: E402
from models import load_causal_lm, load_tokenizer  # noqa: E402
from resolve import resolve_class  # noqa: E402
from utils import register_resolvers  # noqa: E402

ARCHITECTURES = REPO_ROOT / "assets" / "architectures"
TINY_MODEL = REPO_ROOT / "assets" / "tiny-llama"
BLOCKS = {"llama-1b": "LlamaDecoderLayer", "pythia-1b": "GPTNeoXLayer", "tiny": "LlamaDecoderLayer"}
LAYOUTS = {"padded": {"pack_sequences": False, "share_prompts": False},
           "packed": {"pack_sequences": True, "share_prompts": False},
           "shared": {"pack_sequences": True, "share_prompts": True}}
# Dense bf16 tensor-core peaks from NVIDIA's data sheets (SXM parts), matched against torch.cuda.get_device_name().
PEAK_BF16_TFLOPS = {"H200": 989.4, "H100": 989.4, "A100": 312.0, "L40S": 362.1, "A10G": 70.0, "L4": 121.0}
SANITY_STEPS = 3
SANITY_TOLERANCE = 2e-2  # relative: bf16 keeps 8 bits of mantissa (3e-3 per rounding), summed over a sequence


class Contender(NamedTuple):
    model: str
    loss: str
    layout: str
    attention: str


class Measurement(NamedTuple):
    contender: Contender
    note: str  # why there are no figures (an error, the time budget), else ""
    seconds: float = 0.0  # median timed step
    tokens: int = 0  # policy tokens per step
    flops: float = 0.0  # model FLOPs per step
    peak_bytes: Optional[int] = None
    step_metrics: Tuple[Dict[str, float], ...] = ()  # loss/train and logps_train/chosen of every step


def contenders(args) -> List[Contender]:
    """Every loss, layout and attention on the first model; the second model (GPT-NeoX) on DPO only.

    Packed rows without shared prompts need sdpa or eager (logps.PACKABLE_ATTENTION; flex attention would run them
    padded), so that pair is left out rather than reported under a name it does not run."""
    attentions = ["sdpa"] if args.dry_run else ["sdpa", "flex_attention"]
    chosen = []
    for index, model in enumerate(args.models):
        for loss in ("sft", "dpo", "kto") if index == 0 else ("dpo",):
            layouts = ("padded", "packed") if loss == "sft" else tuple(LAYOUTS) if index == 0 else ("packed", "shared")
            chosen += [Contender(model, loss, layout, attention) for layout in layouts
                       for attention in (attentions if index == 0 else attentions[:1])
                       if layout != "packed" or attention in PACKABLE_ATTENTION]
    return chosen


def run_config(args, contender: Contender, fp32: bool = False):
    """The validated train config of one contender (fp32: no mixed precision, an fp32 reference)."""
    model_dir = TINY_MODEL if contender.model == "tiny" else ARCHITECTURES / contender.model
    overrides = [f"loss={contender.loss}", "model=tiny", "datasets=[hh]", "exp_name=gpu_check", "mode=train",
                 "wandb.enabled=false", f"model.name_or_path={model_dir}", f"model.tokenizer_name_or_path={TINY_MODEL}",
                 f"model.block_name={BLOCKS[contender.model]}", "model.policy_dtype=float32",
                 f"model.reference_dtype={'float32' if fp32 else 'bfloat16'}",
                 f"model.fsdp_policy_mp={'null' if fp32 else 'bfloat16'}", "model.activation_checkpointing=true",
                 f"model.batch_size={args.batch_size}", f"model.max_length={args.max_length}",
                 f"model.max_prompt_length={args.max_length // 2}", f"model.attn_implementation={contender.attention}",
                 "n_epochs=null", f"n_examples={args.batch_size * (args.warmup + args.steps)}", "lr=1e-5",
                 "warmup_steps=0", "optimizer=RMSprop"]
    overrides += [f"{key}={str(value).lower()}" for key, value in LAYOUTS[contender.layout].items()]
    with initialize_config_dir(config_dir=str(REPO_ROOT / "config"), version_base=None):
        config = compose(config_name="config", overrides=overrides)
    validate_train_config(config, contender.loss)
    return config


class Models:
    """A sharded policy and reference, built once per model and precision; every contender starts the policy from
    the same initial weights."""

    def __init__(self, config, device: torch.device):
        # Built on the device: a random 1B initialisation on the host takes tens of seconds per model.
        with device:
            policy = load_causal_lm(config.model, "float32", config.seed)
            self.initial_state = {k: v.clone() for k, v in policy.state_dict().items()}
            reference = load_causal_lm(config.model, config.model.reference_dtype, config.seed)
        policy.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        reference.requires_grad_(False).eval()
        self.policy, self.reference = (
            distributed.shard_model(model.to(device), config.model.block_name, config.model.fsdp_policy_mp)
            for model in (policy, reference))

    def prepare(self, attention: str) -> None:
        for model in (self.policy, self.reference):
            model.set_attn_implementation(attention)
        distributed.load_full_state_dict(self.policy, self.initial_state)


def model_flops(shape: ModelShape, loss: str, batch: Dict, pad_token_id: int, shared: bool) -> float:
    """Model FLOPs of one step (see the module docstring)."""
    body = shape.parameters - 2 * shape.vocab * shape.hidden  # untied embeddings and head excluded
    flops = 0.0
    for work in step_work(loss, batch, pad_token_id, shared):
        per_pass = (2 * body * work.tokens + 4 * shape.layers * shape.hidden * work.context
                    + 2 * shape.hidden * shape.vocab * work.scored)
        flops += per_pass * (3 if work.with_gradients else 1)
    return flops


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def loader_for(config, tokenizer, loaders: Dict[str, object]):
    """The loss's train loader, built (and tokenised) once per loss: layouts and attention do not change batches."""
    if config.loss.name not in loaders:
        batch_size = config.model.batch_size
        loaders[config.loss.name] = build_dataloader(config, tokenizer, "train", batch_size, None, config.n_examples,
                                                     batch_size)
    return loaders[config.loss.name]


def trainer_for(config, models: Models, tokenizer, device: torch.device, loaders: Dict[str, object]):
    """The loss's trainer over the contender's batches, with the optimizer and scheduler its train() would build."""
    trainer_cls = resolve_class(config.loss.trainer, "trainers")
    loader = loader_for(config, tokenizer, loaders)
    trainer = trainer_cls(tokenizer, config, loader, None, models.policy, models.reference, device=device)
    trainer.optimizer = getattr(torch.optim, config.optimizer)(trainer.policy.parameters(), lr=config.lr)
    trainer.scheduler = torch.optim.lr_scheduler.LambdaLR(trainer.optimizer, lambda step: 1.0)
    return trainer, list(loader)


def train_steps(trainer, batches: List[Dict], device: torch.device,
                warmup: int) -> Tuple[List[float], Tuple[Dict[str, float], ...]]:
    """Seconds and (loss/train, logps_train/chosen) means of each step; peak memory is counted after `warmup`."""
    times, step_metrics = [], []
    for index, batch in enumerate(batches):
        if index == warmup and device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        batch = distributed.slice_batch_for_rank(batch, 0, 1, device)
        metrics = defaultdict(list)
        synchronize(device)
        start = time.perf_counter()
        trainer.prepare_step([batch])
        trainer.train_on_batch(batch, metrics, pending=0)
        synchronize(device)
        times.append(time.perf_counter() - start)
        step_metrics.append({key: sum(metrics[key]) / len(metrics[key])
                             for key in ("loss/train", "logps_train/chosen") if metrics[key]})
    return times, tuple(step_metrics)


def measure(contender: Contender, config, models: Models, tokenizer, shape: ModelShape, args, device: torch.device,
            loaders: Dict[str, object]) -> Measurement:
    """Warm-up and timed steps of one contender through the trainer's own step."""
    models.prepare(contender.attention)
    trainer, batches = trainer_for(config, models, tokenizer, device, loaders)
    times, step_metrics = train_steps(trainer, batches, device, args.warmup)
    timed, pad = batches[args.warmup:], tokenizer.pad_token_id
    shared = LAYOUTS[contender.layout]["share_prompts"]
    return Measurement(
        contender, "", sorted(times[args.warmup:])[len(timed) // 2],
        sum(policy_tokens(contender.loss, batch) for batch in timed) // len(timed),
        sum(model_flops(shape, contender.loss, batch, pad, shared) for batch in timed) / len(timed),
        torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None, step_metrics)


def fp32_steps(contender: Contender, args, tokenizer, device: torch.device,
               loaders: Dict[str, object]) -> Tuple[Dict[str, float], ...]:
    """The first SANITY_STEPS steps' metrics of `contender` in float32 throughout (no mixed precision)."""
    config = run_config(args, contender, fp32=True)
    models = Models(config, device)
    models.prepare(contender.attention)
    trainer, batches = trainer_for(config, models, tokenizer, device, loaders)
    return train_steps(trainer, batches[:SANITY_STEPS], device, warmup=0)[1]


def run_model(model: str, chosen: List[Contender], args, device: torch.device, deadline: float,
              fp32_check: bool) -> Tuple[List[Measurement], Optional[List[str]]]:
    """Every contender of `model` (skipped past the deadline, an error recorded instead of raised), and on request
    the fp32 comparison of its shared-prompt DPO steps."""
    config = run_config(args, chosen[0])
    tokenizer = load_tokenizer(config.model)
    shape = model_shape(str(config.model.name_or_path), config.model.block_name)
    models = Models(config, device)
    results, loaders = [], {}
    for contender in chosen:
        if time.monotonic() > deadline:
            results.append(Measurement(contender, "skipped: time budget"))
            continue
        print(f"{contender.model} {contender.loss} {contender.layout} {contender.attention}", flush=True)
        try:
            results.append(measure(contender, run_config(args, contender), models, tokenizer, shape, args, device,
                                   loaders))
        except Exception as e:  # noqa: BLE001 (one contender's failure is a result; the others still run)
            traceback.print_exc()
            results.append(Measurement(contender, f"error: {(str(e).strip().splitlines() or [type(e).__name__])[0]}"))
    del models
    if not fp32_check:
        return results, None
    sanity = Contender(model, "dpo", "shared", "sdpa")
    bf16 = next((r for r in results if r.contender == sanity and not r.note), None)
    if bf16 is None:
        return results, ["fp32 check: not run (the bf16 shared-prompt DPO run with sdpa has no figures)"]
    if time.monotonic() > deadline:
        return results, ["fp32 check: skipped: time budget"]
    return results, fp32_comparison(bf16.step_metrics[:SANITY_STEPS],
                                    fp32_steps(sanity, args, tokenizer, device, loaders))


def fp32_comparison(bf16: Tuple[Dict[str, float], ...], fp32: Tuple[Dict[str, float], ...]) -> List[str]:
    """A table of the first steps' loss and chosen log-probs in bf16 and fp32, and a verdict line."""
    lines = ["| step | loss bf16 | loss fp32 | logps/chosen bf16 | logps/chosen fp32 | largest relative difference |",
             "|---:|---:|---:|---:|---:|---:|"]
    worst = 0.0
    for step, (low, full) in enumerate(zip(bf16, fp32)):
        differences = [abs(low[k] - full[k]) / max(abs(full[k]), 1e-6) for k in full]
        worst = max([worst] + differences)
        lines.append(f"| {step} | {low['loss/train']:.5f} | {full['loss/train']:.5f} | "
                     f"{low['logps_train/chosen']:.2f} | {full['logps_train/chosen']:.2f} | {max(differences):.2e} |")
    verdict = "passed" if worst <= SANITY_TOLERANCE else "FAILED"
    return lines + ["", f"fp32 check: {verdict} (largest relative difference {worst:.2e}, allowed {SANITY_TOLERANCE})"]


def results_table(measurements: List[Measurement], peak_tflops: Optional[float]) -> List[str]:
    lines = ["| model | loss | layout | attention | tokens/s | s/step | TFLOP/s | MFU | peak GiB | note |",
             "|---|---|---|---|---:|---:|---:|---:|---:|---|"]
    for m in measurements:
        c = m.contender
        if m.note:
            lines.append(f"| {c.model} | {c.loss} | {c.layout} | {c.attention} | - | - | - | - | - | {m.note} |")
            continue
        tflops = m.flops / m.seconds / 1e12
        mfu = f"{100 * tflops / peak_tflops:.1f}%" if peak_tflops else "-"
        peak = f"{m.peak_bytes / 2**30:.1f}" if m.peak_bytes is not None else "-"
        lines.append(f"| {c.model} | {c.loss} | {c.layout} | {c.attention} | {m.tokens / m.seconds:,.0f} | "
                     f"{m.seconds:.3f} | {tflops:.3g} | {mfu} | {peak} | |")
    return lines


def device_peak_tflops(args) -> Optional[float]:
    if args.peak_tflops or not torch.cuda.is_available():
        return args.peak_tflops
    name = torch.cuda.get_device_name()
    return next((peak for key, peak in PEAK_BF16_TFLOPS.items() if key in name), None)


def check(args) -> None:
    """The whole check inside the process group (rank 0 of 1)."""
    device = distributed.device()
    start = time.monotonic()
    deadline = start + args.budget_s if args.budget_s else float("inf")
    measurements, sanity = [], None
    by_model = defaultdict(list)
    for contender in contenders(args):
        by_model[contender.model].append(contender)
    for index, (model, chosen) in enumerate(by_model.items()):
        results, comparison = run_model(model, chosen, args, device, deadline, fp32_check=index == 0)
        measurements += results
        sanity = sanity or comparison
    hardware = torch.cuda.get_device_name() if device.type == "cuda" else "CPU (dry run: tiny model, gloo)"
    lines = [f"GPU check on {hardware}: torch {torch.__version__}, transformers {transformers.__version__}, "
             f"{torch.distributed.get_backend()} process group of 1, FSDP2 with bf16 mixed precision; batch "
             f"{args.batch_size}, max_length {args.max_length}, {args.steps} timed steps after {args.warmup}; "
             f"{time.monotonic() - start:.0f} s", "", *results_table(measurements, device_peak_tflops(args)), "",
             *(sanity or [])]
    if args.dry_run:
        lines.append("flex_attention is not run on the CPU: FlexAttention has no CPU backward.")
    text = "\n".join(lines) + "\n"
    print("\n" + text)
    Path(args.output).parent.mkdir(parents=True, exist_ok=True)
    Path(args.output).write_text(text)
    failed = any(m.note.startswith("error") for m in measurements) or not sanity or "FAILED" in sanity[-1]
    if failed:
        raise SystemExit(1)


def parse_args(argv: Optional[List[str]] = None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dry-run", action="store_true", help="the tiny model on the CPU with gloo, few steps")
    parser.add_argument("--models", nargs="+", default=None, help="default: llama-1b pythia-1b (dry run: tiny)")
    parser.add_argument("--steps", type=int, default=None, help="timed steps per contender (default 20; dry run 2)")
    parser.add_argument("--warmup", type=int, default=None, help="untimed steps first (default 3; dry run 1)")
    parser.add_argument("--batch-size", type=int, default=None, help="default 16 (dry run 2)")
    parser.add_argument("--max-length", type=int, default=None, help="default 1024 (dry run 64)")
    parser.add_argument("--budget-s", type=float, default=None, help="skip contenders and the fp32 check after "
                                                                      "this many seconds (default 420; dry run none)")
    parser.add_argument("--peak-tflops", type=float, default=None, help="the GPU's dense bf16 peak")
    parser.add_argument("--output", default=os.path.join(os.environ.get("OUT", "."), "gpu_check.md"))
    args = parser.parse_args(argv)
    defaults = dict(models=["tiny"], steps=2, warmup=1, batch_size=2, max_length=64, budget_s=0) if args.dry_run \
        else dict(models=["llama-1b", "pythia-1b"], steps=20, warmup=3, batch_size=16, max_length=1024, budget_s=420)
    for key, value in defaults.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if args.steps < 1 or args.warmup + args.steps < SANITY_STEPS:
        parser.error(f"--steps must be at least 1, and --warmup plus --steps at least {SANITY_STEPS} (the fp32 check)")
    return args


def main(argv: Optional[List[str]] = None) -> None:
    args = parse_args(argv)
    register_resolvers()
    os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", LOCAL_WORLD_SIZE="1",
                      MASTER_ADDR=distributed.LOCALHOST, MASTER_PORT=str(distributed.free_port()))
    distributed.run_in_process_group(check, args)


if __name__ == "__main__":
    main()
