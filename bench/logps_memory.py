"""Peak memory of the per-token log-prob computation: HALOs' chunked version against one full log-softmax.

    .venv/bin/python bench/logps_memory.py      # about 30 seconds

Both take the same (B, T, V) logits and (B, T) labels and return (B, T-1) label log-probs in float32; the full
version is the plain `log_softmax(logits.float()).gather(labels)`. Memory is counted by bench/memory.py (bytes of
the tensors each computation allocates, beyond its inputs): once after the forward, once over forward + backward.
The backward's own output, the (B, T, V) gradient of the logits that the lm_head's backward consumes, is the same
for both and listed apart; the `fwd+bwd` columns are what each allocates besides it.
"""
import argparse
import os
import sys
from pathlib import Path
from typing import Callable, List, Optional

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from bench.memory import TensorMemoryTracker  # noqa: E402
from utils import IGNORE_INDEX, get_token_logps  # noqa: E402

MiB = 2 ** 20


def full_log_softmax(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    labels = labels[:, 1:]
    mask = labels != IGNORE_INDEX
    log_probs = F.log_softmax(logits[:, :-1].float(), dim=-1)
    return torch.gather(log_probs, 2, labels.masked_fill(~mask, 0).unsqueeze(2)).squeeze(2) * mask


def chunked(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    return get_token_logps(logits, labels)[0]


def measure(function: Callable, batch: int, length: int, vocab: int, dtype: torch.dtype):
    """(forward peak, fwd+bwd peak besides the logits' gradient, gradient bytes) of one call, in bytes."""
    logits = torch.randn(batch, length, vocab).to(dtype).requires_grad_()
    labels = torch.randint(0, vocab, (batch, length))
    labels[:, : length // 3] = IGNORE_INDEX  # a prompt
    with TensorMemoryTracker() as tracker:
        token_logps = function(logits, labels)
        forward_peak = tracker.peak_bytes
        token_logps.sum().backward()
    gradient_bytes = logits.grad.numel() * logits.grad.element_size()
    return forward_peak, tracker.peak_bytes - gradient_bytes, gradient_bytes


def parse_args(argv: Optional[List[str]] = None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--length", type=int, default=256)
    parser.add_argument("--vocabs", type=int, nargs="+", default=[32_000, 128_256])
    return parser.parse_args(argv)


def main(argv: Optional[List[str]] = None) -> None:
    args = parse_args(argv)
    print(f"torch {torch.__version__}, logits ({args.batch}, {args.length}, V), load average {os.getloadavg()[0]:.2f}\n")
    print("| V | logits dtype | forward MiB: full / chunked | fwd+bwd besides the logits' gradient | fwd+bwd in all |")
    print("|---:|---|---|---|---|")
    for vocab in args.vocabs:
        for dtype in (torch.float32, torch.bfloat16):
            full = measure(full_log_softmax, args.batch, args.length, vocab, dtype)
            ours = measure(chunked, args.batch, args.length, vocab, dtype)
            print(f"| {vocab:,} | {str(dtype).removeprefix('torch.')} | {compared(full[0], ours[0])} "
                  f"| {compared(full[1], ours[1])} | {compared(full[1] + full[2], ours[1] + ours[2])} |", flush=True)


def compared(full_bytes: int, chunked_bytes: int) -> str:
    return f"{full_bytes / MiB:,.0f} / {chunked_bytes / MiB:,.2f} (x{chunked_bytes / full_bytes:.3f})"

if __name__ == "__main__":
    main()
