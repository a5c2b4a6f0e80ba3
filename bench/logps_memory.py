"""Peak memory of the per-token log-prob computation: HALOs' chunked version against one full log-softmax.

    .venv/bin/python bench/logps_memory.py      # about 30 seconds

All three take the same (B, T, V) logits and (B, T) labels and compute (B, T-1) label log-probs in float32:
* full: the plain `log_softmax(logits.float()).gather(labels)`;
* chunked: `utils.get_token_logps` (PPO's token log-probs);
* chunked, gradient in place: `utils.label_logps(..., overwrite_logits=True)`, what `sequence_logps` runs for every
  other loss, which also writes the logits' gradient into the logits' own storage.
Memory is counted by bench/memory.py: bytes of the tensors each computation allocates beyond its inputs, once after
the forward and once over forward + backward (which includes the (B, T, V) gradient of the logits, unless it is
written in place).
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
from utils import IGNORE_INDEX, get_token_logps, label_logps, next_token_labels  # noqa: E402

MiB = 2 ** 20


def full_log_softmax(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    labels = labels[:, 1:]
    mask = labels != IGNORE_INDEX
    log_probs = F.log_softmax(logits[:, :-1].float(), dim=-1)
    return torch.gather(log_probs, 2, labels.masked_fill(~mask, 0).unsqueeze(2)).squeeze(2) * mask


def chunked(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    return get_token_logps(logits, labels)[0]


def chunked_in_place(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    next_labels = next_token_labels(labels)
    mask = next_labels != IGNORE_INDEX
    token_logps = label_logps(logits.view(-1, logits.size(-1)), next_labels.masked_fill(~mask, 0).view(-1),
                              overwrite_logits=True)
    return token_logps.view_as(mask) * mask


METHODS = {"full": full_log_softmax, "chunked": chunked, "chunked, gradient in place": chunked_in_place}


def measure(function: Callable, batch: int, length: int, vocab: int, dtype: torch.dtype):
    """(forward peak, forward + backward peak) of one call, in bytes."""
    logits = torch.randn(batch, length, vocab).to(dtype).requires_grad_()
    labels = torch.randint(0, vocab, (batch, length))
    labels[:, : length // 3] = IGNORE_INDEX  # a prompt
    with TensorMemoryTracker() as tracker:
        token_logps = function(logits, labels)
        forward_peak = tracker.peak_bytes
        token_logps.sum().backward()
    return forward_peak, tracker.peak_bytes


def parse_args(argv: Optional[List[str]] = None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--length", type=int, default=256)
    parser.add_argument("--vocabs", type=int, nargs="+", default=[32_000, 128_256])
    return parser.parse_args(argv)


def main(argv: Optional[List[str]] = None) -> None:
    args = parse_args(argv)
    print(f"torch {torch.__version__}, logits ({args.batch}, {args.length}, V), "
          f"load average {os.getloadavg()[0]:.2f}\n")
    print("| V | logits dtype | method | forward MiB | x full | forward + backward MiB | x full |")
    print("|---:|---|---|---:|---:|---:|---:|")
    for vocab in args.vocabs:
        for dtype in (torch.float32, torch.bfloat16):
            peaks = {name: measure(function, args.batch, args.length, vocab, dtype)
                     for name, function in METHODS.items()}
            full = peaks["full"]
            for name, (forward, total) in peaks.items():
                print(f"| {vocab:,} | {str(dtype).removeprefix('torch.')} | {name} | {forward / MiB:,.1f} "
                      f"| {forward / full[0]:.3f} | {total / MiB:,.1f} | {total / full[1]:.3f} |", flush=True)


if __name__ == "__main__":
    main()
