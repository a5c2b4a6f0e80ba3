"""Shared-prompt segments (`share_prompts=true`): rows of a batch that start with the same prompt run it once.

A preference pair is two rows, [prompt, chosen] and [prompt, rejected]. Here they become one segment
[prompt, chosen, rejected] of a packed row in which the rejected tokens attend to the prompt but not to the chosen
ones, and their position ids continue from the end of the prompt. Every token then sees exactly the context and the
positions it had in its own row, so the log-probs are those of the unshared rows, while the prompt, on HH most of
the tokens, is computed once instead of twice (Wang & Hegde 2024, arXiv 2410.20305). Several segments pack into a
row, as `utils.pack_rows` packs sequences.

Which rows share is read off their content, not off the loss: rows whose tokens before their first label are
identical form one segment (DPO's chosen and rejected rows; KTO's target row and its KL row, which the dataloader
builds from the same prompt; two unpaired rows of one prompt that land in the same batch). The shared *stem* stops
one token short of the prompt: the logits of the prompt's last token predict each response's first token, so that
token starts every branch (run once per branch), and each kept logit still scores exactly one label.

Attention: `attention_masks` builds the mask through transformers' mask interface for the model's attention
implementation (a boolean 4-D mask for sdpa, an additive one for eager, a BlockMask for flex_attention) from one
index function. A 4-D mask or a BlockMask given to a model is used as it is, so sliding-window layers get their
window from that function too, measured in positions as the unshared rows measure it; models whose layers differ
(`config.layer_types`: Gemma 2, Qwen 2) get one mask per kind of layer.
"""
from typing import Callable, Dict, List, NamedTuple, Optional, Union

import numpy as np
import torch
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS

from utils import IGNORE_INDEX, first_fit_decreasing, right_padded_lengths

# The attention implementations whose masks a model takes as given, and the architectures whose log-probs are
# tested equal to the unshared rows' (tests/test_shared_prompts.py); others are refused rather than trusted.
MASKED_ATTENTION = ("sdpa", "eager", "flex_attention")
TESTED_MODEL_TYPES = ("llama", "mistral", "gpt_neox", "qwen2", "qwen3", "gemma", "gemma2")
LAYER_KINDS = ("full_attention", "sliding_attention")


class SharedRows(NamedTuple):
    """N right-padded (N, T) rows laid out as shared-prompt segments in R packed rows of C columns.

    The last four fields are all the attention mask needs: a position attends to the earlier positions of its own
    segment that lie in the stem or in its own branch.
    """

    input_ids: torch.Tensor  # (R, C), the pad id after the last segment of a row
    labels: torch.Tensor  # (R, C), IGNORE_INDEX in stems, at each branch's first token and in padding
    rows: torch.Tensor  # (R, C) long: the original row of each position (N in stems and padding)
    columns: torch.Tensor  # (R, C) long: its column in that row
    position_ids: torch.Tensor  # (R, C): a stem's are 0..s-1, a branch's continue from s
    segment_ids: torch.Tensor  # (R, C): 1, 2, ... for the segments of a row, 0 for its padding
    branch_ids: torch.Tensor  # (R, C): 0 in stems (and padding), k >= 1 in the k-th branch of a segment


class Segment(NamedTuple):
    stem: int  # shared tokens (columns 0..stem-1 of every member row)
    members: List[int]  # original rows, one branch each, in batch order


def stem_lengths(labels: torch.Tensor) -> List[int]:
    """(N,) tokens before the one whose logits score each row's first label (column 0 is never scored); 0 for a
    row without labels."""
    labelled = labels[:, 1:] != IGNORE_INDEX
    first = labelled.int().argmax(1)  # the first labelled column, minus one: the column of its predicting token
    return torch.where(labelled.any(1), first, 0).tolist()


def find_segments(input_ids: torch.Tensor, stems: List[int]) -> List[Segment]:
    """Rows grouped by identical stem tokens (rows with an empty stem stay alone), in order of first appearance."""
    groups: Dict[object, Segment] = {}
    ids = input_ids.tolist()
    for row, stem in enumerate(stems):
        key = tuple(ids[row][:stem]) if stem else row  # an int never equals a tuple
        groups.setdefault(key, Segment(stem, [])).members.append(row)
    return list(groups.values())


def share_rows(input_ids: torch.Tensor, attention_mask: torch.Tensor, labels: torch.Tensor,
               pad_token_id: int) -> Optional[SharedRows]:
    """The shared-prompt layout of right-padded rows, or None when no two rows share a stem (then plain packing
    does the same work).

    Segments are packed first-fit-decreasing into rows as long as the longest segment.

    Args:
        input_ids, attention_mask, labels: (N, T) right-padded rows; labels IGNORE_INDEX where no loss is taken.
        pad_token_id: fills packed rows that are not full.
    """
    lengths = right_padded_lengths(attention_mask)
    host_ids, host_labels = input_ids.cpu(), labels.cpu()
    segments = find_segments(host_ids, stem_lengths(host_labels))
    if all(len(segment.members) == 1 for segment in segments):
        return None
    n_rows = len(lengths)
    sizes = [segment.stem + sum(lengths[row] - segment.stem for row in segment.members) for segment in segments]
    bins = first_fit_decreasing(sizes, max(sizes))
    shape = (len(bins), max(sizes))
    # Index arrays built on the host, then one gather per tensor on the batch's device.
    source_rows = np.full(shape, n_rows)  # row n_rows is the padding row appended below
    source_columns, positions = np.zeros(shape, dtype=np.int64), np.zeros(shape, dtype=np.int64)
    segment_ids, branch_ids = np.zeros(shape, dtype=np.int64), np.zeros(shape, dtype=np.int64)
    labelled = np.zeros(shape, dtype=bool)
    for r, members in enumerate(bins):
        start = 0
        for segment_id, index in enumerate(members, 1):
            stem, rows = segments[index]
            spans = [(rows[0], 0, 0, stem)] + [(row, branch, stem, lengths[row]) for branch, row in enumerate(rows, 1)]
            for row, branch, first, end in spans:
                span = slice(start, start + end - first)
                source_rows[r, span], source_columns[r, span] = row, np.arange(first, end)
                positions[r, span], segment_ids[r, span], branch_ids[r, span] = np.arange(first, end), segment_id, branch
                labelled[r, span.start + 1:span.stop] = branch > 0  # a branch's first token is scored by nothing
                start = span.stop
        positions[r, start:] = np.arange(shape[1] - start)
    device = input_ids.device
    source_rows, source_columns = (torch.from_numpy(a).to(device) for a in (source_rows, source_columns))
    padded_ids = torch.cat([input_ids, input_ids.new_full((1, input_ids.size(1)), pad_token_id)])
    padded_labels = torch.cat([labels, labels.new_full((1, labels.size(1)), IGNORE_INDEX)])
    gathered_labels = padded_labels[source_rows, source_columns]
    return SharedRows(padded_ids[source_rows, source_columns],
                      torch.where(torch.from_numpy(labelled).to(device), gathered_labels, IGNORE_INDEX),
                      source_rows, source_columns, *(torch.from_numpy(a).to(device)
                                                     for a in (positions, segment_ids, branch_ids)))


def mask_function(shared: SharedRows, window: Optional[int]) -> Callable:
    """transformers' index-based mask function of the layout: True where query q may attend to key k of row b.

    `window` is a sliding window in positions: the unshared rows' columns are their positions, so the window
    excludes exactly the keys it excluded there.
    """
    segment, branch, position = shared.segment_ids, shared.branch_ids, shared.position_ids

    def attends(b, h, q, k):
        allowed = (k <= q) & (segment[b, q] == segment[b, k]) & ((branch[b, k] == 0) | (branch[b, k] == branch[b, q]))
        if window is not None:
            allowed = allowed & (position[b, q] - position[b, k] < window)
        return allowed
    return attends


def unsupported_reason(model: torch.nn.Module) -> Optional[str]:
    """Why `model` cannot run shared-prompt segments exactly, or None when it can."""
    config = model.config
    implementation = config._attn_implementation
    if implementation not in MASKED_ATTENTION:
        return (f"attention {implementation} takes no custom mask; share_prompts needs one of "
                f"{', '.join(MASKED_ATTENTION)}")
    if config.model_type not in TESTED_MODEL_TYPES:
        return (f"model type {config.model_type} is not among those tested with shared-prompt masks "
                f"({', '.join(TESTED_MODEL_TYPES)})")
    unknown = sorted(set(getattr(config, "layer_types", None) or ()) - set(LAYER_KINDS))
    if unknown:
        return f"its {', '.join(unknown)} layers need masks share_prompts cannot build"
    return None


def attention_masks(config, shared: SharedRows, dtype: torch.dtype) -> Union[torch.Tensor, object, Dict]:
    """The layout's attention mask in the form the model's attention implementation reads, built by transformers'
    mask interface; a dict of masks by layer kind for models with `config.layer_types`.

    Args:
        config: the model's config (its attention implementation, sliding window and layer kinds).
        dtype: the model's dtype (eager masks are additive in it).
    """
    build = ALL_MASK_ATTENTION_FUNCTIONS[config._attn_implementation]
    n_rows, n_columns = shared.input_ids.shape
    window = getattr(config, "sliding_window", None)

    def mask(layer_window: Optional[int]):
        return build(batch_size=n_rows, q_length=n_columns, kv_length=n_columns,
                     mask_function=mask_function(shared, layer_window), allow_is_causal_skip=False, dtype=dtype,
                     device=shared.input_ids.device, config=config)

    layer_types = getattr(config, "layer_types", None)
    if not layer_types:
        return mask(window)  # one kind of layer; Mistral's window applies to every layer
    return {kind: mask(window if kind == "sliding_attention" else None) for kind in set(layer_types)}
