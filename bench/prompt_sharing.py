"""What shared-prompt batches (share_prompts=true) buy: DPO and KTO steps with and without sharing on the bundled HH
sample, then DPO steps on synthetic pairs over a sweep of prompt/response lengths, all in one run.

    .venv/bin/python bench/prompt_sharing.py                 # about 15 minutes on 2 cores
    .venv/bin/python bench/prompt_sharing.py --sweep 64/64 1024/64 --repeats 1

Both contenders are HALOs' own training step (bench/train_throughput.py's `halos_step`: get_batch_metrics, backward,
AdamW) on the same model, weights and batch, packed, differing only in share_prompts; they are timed round-robin in
CPU seconds with one intra-op thread (train_throughput.measure) and their tensor peak is taken by bench/memory.py.
Tokens are the non-padding tokens of the unshared rows the policy scores (DPO: chosen + rejected; KTO: targets + KL
rows), the same for both contenders, so the tokens/s ratio is the speed-up. "run" counts the tokens that the step's
forward passes, policy and reference, actually compute (a shared prompt once), the work sharing saves.

The sweep's pairs are random token ids, a prompt of P tokens and two responses of R tokens each, 8 pairs per batch;
the model is the benchmark's Llama with positions for the longest rows.
"""
import argparse
import os
import sys
from pathlib import Path
from typing import Dict, List, Optional, Tuple

REPO_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO_ROOT))

import torch  # noqa: E402

from bench.train_throughput import (Result, Weights, first_batch, halos_config, halos_step, measure,  # noqa: E402
                                    model_config, policy_tokens, set_up)
from bench.step_work import step_work  # noqa: E402
from dataloader import CHOSEN_KEYS, REJECTED_KEYS  # noqa: E402
from utils import IGNORE_INDEX  # noqa: E402

SHARED, UNSHARED = "shared prompts", "unshared"


def computed_tokens(loss: str, batch: Dict, pad_token_id: int) -> Tuple[int, int]:
    """Tokens the step's forward passes run (unshared, shared)."""
    return tuple(sum(work.tokens for work in step_work(loss, batch, pad_token_id, shared)) for shared in (False, True))


def synthetic_pairs(n_pairs: int, prompt_length: int, response_length: int, vocab: int, seed: int = 0) -> Dict:
    """A paired batch (the CHOSEN_KEYS/REJECTED_KEYS tensors DPO reads) of random prompts and responses."""
    generator = torch.Generator().manual_seed(seed)
    prompts = torch.randint(2, vocab, (n_pairs, prompt_length), generator=generator)
    batch = {}
    for keys in (CHOSEN_KEYS, REJECTED_KEYS):
        responses = torch.randint(2, vocab, (n_pairs, response_length), generator=generator)
        batch[keys.combined_input_ids] = torch.cat([prompts, responses], 1)
        batch[keys.combined_attention_mask] = torch.ones_like(batch[keys.combined_input_ids])
        batch[keys.labels] = torch.cat([torch.full_like(prompts, IGNORE_INDEX), responses], 1)
    return batch


def compare(loss: str, args, weights: Weights, tokenizer, batch: Optional[Dict] = None) -> Dict[str, Result]:
    steps = {name: halos_step(loss, args, weights, tokenizer, batch=batch, share_prompts=name == SHARED)
             for name in (UNSHARED, SHARED)}
    return {result.name: result for result in measure(steps, args.repeats)}


def row(label: str, tokens: int, computed: Tuple[int, int], results: Dict[str, Result]) -> str:
    unshared, shared = results[UNSHARED], results[SHARED]
    return (f"| {label} | {tokens:,} | {computed[0]:,} / {computed[1]:,} | {tokens / unshared.seconds:,.0f} | "
            f"{tokens / shared.seconds:,.0f} | {unshared.seconds / shared.seconds:.2f}x | "
            f"{unshared.peak_bytes / 2**20:,.0f} / {shared.peak_bytes / 2**20:,.0f} |")


HEADER = ("| {what} | tokens | run unshared / shared | tokens/s unshared | tokens/s shared | speed-up | "
          "peak MiB unshared / shared |\n|---|---:|---:|---:|---:|---:|---:|")


def hh_table(args, weights: Weights, tokenizer) -> List[str]:
    lines = []
    for loss in args.losses:
        _, batch = first_batch(halos_config(loss, args), tokenizer)
        print(f"HH {loss}:", flush=True)
        results = compare(loss, args, weights, tokenizer)
        lines.append(row(loss, policy_tokens(loss, batch), computed_tokens(loss, batch, tokenizer.pad_token_id),
                         results))
    return [HEADER.format(what="HH"), *lines]


def sweep_table(args, tokenizer) -> List[str]:
    lengths = [tuple(int(n) for n in ratio.split("/")) for ratio in args.sweep]
    longest = max(p + r for p, r in lengths)
    weights = Weights(model_config(args, max_positions=longest))
    lines = []
    for prompt_length, response_length in lengths:
        batch = synthetic_pairs(args.batch_size, prompt_length, response_length, args.vocab)
        print(f"sweep {prompt_length}/{response_length}:", flush=True)
        results = compare("dpo", args, weights, tokenizer, batch)
        tokens = policy_tokens("dpo", batch)
        lines.append(row(f"{prompt_length}/{response_length}", tokens,
                         computed_tokens("dpo", batch, tokenizer.pad_token_id), results))
    return [HEADER.format(what="DPO, prompt/response"), *lines]


def parse_args(argv: Optional[List[str]] = None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--losses", nargs="+", default=["dpo", "kto"], choices=["dpo", "kto"])
    parser.add_argument("--sweep", nargs="*", default=["64/64", "128/64", "256/64", "512/64", "1024/64"],
                        help="prompt/response lengths of the synthetic DPO pairs (none: HH only)")
    parser.add_argument("--repeats", type=int, default=3, help="timed steps per contender (the median is reported)")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--max-length", type=int, default=512, help="HH: max_length (max_prompt_length is half)")
    parser.add_argument("--vocab", type=int, default=32_000)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads (train_throughput.measure)")
    return parser.parse_args(argv)


def main(argv: Optional[List[str]] = None) -> None:
    args = parse_args(argv)
    tokenizer, weights = set_up(args)
    tables = [hh_table(args, weights, tokenizer)] + ([sweep_table(args, tokenizer)] if args.sweep else [])
    for table in tables:
        print("\n" + "\n".join(table))
    print(f"\nload average at end {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
