"""Small tensor and formatting helpers shared by trainers, models and scripts."""
import itertools
from pathlib import Path
from typing import Iterable, Iterator, List, NamedTuple, Optional, Tuple

import torch
import torch.nn.functional as F
from omegaconf import OmegaConf

REPO_ROOT = Path(__file__).resolve().parent
IGNORE_INDEX = -100  # label value of positions that carry no loss (prompt and padding)


def register_resolvers() -> None:
    """`${repo_path:assets/tiny-llama}` resolves to that path inside this repository, wherever it is run from."""
    if not OmegaConf.has_resolver("repo_path"):
        OmegaConf.register_new_resolver("repo_path", lambda rel: str(REPO_ROOT / rel))


def pad_to_length(tensor: torch.Tensor, length: int, pad_value: float, dim: int = -1) -> torch.Tensor:
    """Right-pads `tensor` along `dim` with `pad_value` up to `length`; never truncates."""
    missing = length - tensor.size(dim)
    if missing <= 0:
        return tensor
    pad_shape = list(tensor.shape)
    pad_shape[dim] = missing
    return torch.cat([tensor, tensor.new_full(pad_shape, pad_value)], dim=dim)


# Logits per chunk of the log-prob computation: 4 Mi elements (16 MiB in float32) bounds its working memory whatever
# the batch, length and vocabulary; at vocab 32k that is 131 positions per chunk.
LOGPS_CHUNK_ELEMENTS = 1 << 22


class _LabelLogps(torch.autograd.Function):
    """log p(label) of each row of (N, V) logits, computed a chunk of rows at a time in float32 (float64 stays).

    Neither the (N, V) log-softmax nor a float32 copy of the whole logits is ever built, in forward or backward:
    forward keeps one logsumexp per row (N,), and backward rebuilds each chunk's softmax from it. With
    `overwrite_logits`, backward writes the gradient into the logits' own storage instead of a new (N, V) tensor.
    """

    @staticmethod
    def forward(ctx, logits: torch.Tensor, labels: torch.Tensor, chunk_rows: int,
                overwrite_logits: bool) -> torch.Tensor:
        dtype = torch.promote_types(logits.dtype, torch.float32)
        label_logps = torch.empty(logits.size(0), dtype=dtype, device=logits.device)
        logsumexp = torch.empty_like(label_logps)
        for start in range(0, logits.size(0), chunk_rows):
            rows = slice(start, start + chunk_rows)
            chunk, chunk_labels = logits[rows].to(dtype), labels[rows].unsqueeze(1)
            # One fused log_softmax per chunk is about 2x faster on CPU than a separate logsumexp.
            label_logps[rows] = torch.log_softmax(chunk, dim=-1).gather(1, chunk_labels).squeeze(1)
            logsumexp[rows] = chunk.gather(1, chunk_labels).squeeze(1) - label_logps[rows]
        ctx.save_for_backward(logits, labels, logsumexp)
        ctx.chunk_rows, ctx.overwrite_logits = chunk_rows, overwrite_logits
        return label_logps

    @staticmethod
    def backward(ctx, grad_label_logps: torch.Tensor):
        logits, labels, logsumexp = ctx.saved_tensors
        # Each chunk is read before its rows are written, so the logits can hold their own gradient. The write bumps
        # their version counter, so any other autograd node that saved them fails loudly instead of reading garbage.
        grad_logits = logits if ctx.overwrite_logits else torch.empty_like(logits)
        in_place = logits.dtype == logsumexp.dtype  # then each chunk is computed in grad_logits itself, with no copy
        for start in range(0, logits.size(0), ctx.chunk_rows):
            rows = slice(start, start + ctx.chunk_rows)
            grad = grad_label_logps[rows].unsqueeze(1)
            # d log p(label) / d logit_j = 1[j == label] - softmax_j
            chunk = torch.sub(logits[rows].to(logsumexp.dtype), logsumexp[rows].unsqueeze(1),
                              out=grad_logits[rows] if in_place else None)
            chunk.exp_().mul_(-grad).scatter_add_(1, labels[rows].unsqueeze(1), grad)
            if not in_place:
                grad_logits[rows] = chunk
        return grad_logits, None, None, None


def label_logps(logits: torch.Tensor, labels: torch.Tensor, overwrite_logits: bool = False) -> torch.Tensor:
    """(N,) log p(label) from (N, V) logits and (N,) valid label ids, in float32 (float64 logits stay float64).

    The log-softmax is computed in chunks of LOGPS_CHUNK_ELEMENTS logits, so the memory it adds to the logits is one
    chunk instead of an (N, V) float32 tensor (docs/performance.md). With `overwrite_logits` the backward pass also
    reuses the logits' storage for their gradient, saving another (N, V) tensor: only for logits nothing reads after
    backward.
    """
    if logits.dim() != 2 or labels.shape != logits.shape[:1]:
        raise ValueError(f"label_logps needs (N, V) logits and (N,) labels, got {tuple(logits.shape)} and "
                         f"{tuple(labels.shape)}")
    return _LabelLogps.apply(logits, labels, max(1, LOGPS_CHUNK_ELEMENTS // logits.size(-1)), overwrite_logits)


def get_token_logps(logits: torch.Tensor, labels: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """Per-token log-probabilities of the labels, in float32 for any model dtype (float64 logits stay float64).

    Token t is predicted by the logits at position t-1, so the outputs cover positions 1..T-1. Chunked as in
    `label_logps`. The original computed the log-softmax in the policy dtype, bf16 by default (F-06).

    Args:
        logits: (B, T, V) model outputs.
        labels: (B, T) target ids, IGNORE_INDEX where no loss is taken.

    Returns:
        token_logps (B, T-1), zero where masked; mask (B, T-1) bool, True at labelled positions.
    """
    if logits.shape[:-1] != labels.shape:
        raise ValueError(f"logits {tuple(logits.shape)} and labels {tuple(labels.shape)} must agree on (batch, length)")
    # Shifting the labels instead of the logits keeps the logits contiguous, so the (B*T, V) view copies nothing;
    # the last position, which predicts nothing, gets a masked label.
    next_labels = next_token_labels(labels)
    mask = next_labels != IGNORE_INDEX
    token_logps = label_logps(logits.reshape(-1, logits.size(-1)), next_labels.masked_fill(~mask, 0).reshape(-1))
    return (token_logps.view_as(mask) * mask)[:, :-1], mask[:, :-1]


def next_token_labels(labels: torch.Tensor) -> torch.Tensor:
    """(B, T) label of the token after each position: labels shifted left, IGNORE_INDEX at the last position."""
    return torch.cat([labels[:, 1:], labels.new_full((labels.size(0), 1), IGNORE_INDEX)], dim=1)


def get_batch_logps(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Sequence log-probabilities: (B,) sums over labelled tokens of log p(label_t | tokens < t), from full logits.

    Computed in float32 (the original computed log_softmax in the policy dtype, bf16 by default). The trainers use
    the leaner `BasicTrainer.model_logps`; this is the plain reference computation it is checked against.

    Args:
        logits: (B, T, V) model outputs.
        labels: (B, T) target ids, IGNORE_INDEX where no loss is taken.
    """
    return get_token_logps(logits, labels)[0].sum(-1)


class PackedRows(NamedTuple):
    """Right-padded (N, T) rows packed into (R, C) rows, R < N, several sequences per row.

    Each sequence keeps its positions 0..len-1, and Hugging Face models given `position_ids` and no attention mask
    attend only within each run of increasing positions, so every sequence sees exactly its padded-row context.
    """

    input_ids: torch.Tensor  # (R, C)
    position_ids: torch.Tensor  # (R, C), restarting at 0 for each sequence (and for the padding that ends a row):
    # a sequence's position ids are its columns in its original row
    labels: torch.Tensor  # (R, C), IGNORE_INDEX at each sequence's first token and at padding
    rows: torch.Tensor  # (R, C) long: the original row of each position (N at padding)
    n_rows: int  # N


def first_fit_decreasing(lengths: List[int], capacity: int) -> List[List[int]]:
    """Indices of `lengths` grouped into bins whose lengths sum to at most `capacity` (longest first)."""
    bins, room = [], []
    for index in sorted(range(len(lengths)), key=lambda i: -lengths[i]):
        target = next((b for b, free in enumerate(room) if free >= lengths[index]), None)
        if target is None:
            bins.append([])
            room.append(capacity)
            target = len(bins) - 1
        bins[target].append(index)
        room[target] -= lengths[index]
    return bins


def right_padded_lengths(attention_mask: torch.Tensor) -> List[int]:
    """(N,) lengths of right-padded rows from their (N, T) attention mask; ValueError for any other padding."""
    lengths = attention_mask.sum(1)
    columns = torch.arange(attention_mask.size(1), device=attention_mask.device)
    if not torch.equal(attention_mask.bool(), columns < lengths.unsqueeze(1)):
        raise ValueError("packing needs right-padded rows (each attention mask is 1s then 0s)")
    return lengths.tolist()


def pack_rows(input_ids: torch.Tensor, attention_mask: torch.Tensor, labels: torch.Tensor,
              pad_token_id: int) -> Optional[PackedRows]:
    """Packs right-padded rows into as few rows of the longest row's length as fit; None if that saves no row.

    Rows no longer than the longest keep the attention cost of the padded batch while the padding tokens are gone.

    Args:
        input_ids, attention_mask, labels: (N, T) right-padded rows (labels IGNORE_INDEX where no loss is taken).
        pad_token_id: fills the end of packed rows that are not full.
    """
    lengths = right_padded_lengths(attention_mask)
    positions = torch.arange(input_ids.size(1), device=input_ids.device)
    capacity = max(lengths)
    bins = first_fit_decreasing(lengths, capacity)
    if len(bins) == len(lengths):
        return None
    shape = (len(bins), capacity)
    packed = PackedRows(input_ids.new_full(shape, pad_token_id), input_ids.new_zeros(shape),
                        labels.new_full(shape, IGNORE_INDEX), input_ids.new_full(shape, len(lengths)), len(lengths))
    for r, members in enumerate(bins):
        start = 0
        for row in members:
            span, length = slice(start, start + lengths[row]), lengths[row]
            packed.input_ids[r, span] = input_ids[row, :length]
            packed.position_ids[r, span] = positions[:length]
            packed.labels[r, start + 1:start + length] = labels[row, 1:length]
            packed.rows[r, span] = row
            start += length
        packed.position_ids[r, start:] = positions[:capacity - start]
    return packed


def disable_dropout(model: torch.nn.Module) -> None:
    """Sets p=0 on every dropout module: training and log-prob evaluation must be deterministic."""
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0


def chunked(items: Iterable, size: int) -> Iterator[list]:
    """Consecutive lists of `size` items (the last one may be shorter)."""
    iterator = iter(items)
    while chunk := list(itertools.islice(iterator, size)):
        yield chunk
