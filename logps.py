"""Sequence log-probs of a causal LM on right-padded rows: the one forward every trainer's log-probs come from
(docs/performance.md).

The model computes logits only where the next token is labelled (`logits_to_keep`), so its lm_head skips prompt and
padding positions; with packing the rows are packed first (utils.pack_rows), so padding tokens are not run at all;
log-probs are float32, computed chunk by chunk (utils.label_logps). With shared prompts, rows that start with the
same prompt run it once (shared_prompts.py). No KV cache: training needs none, packed rows cannot use one.
"""
from typing import Optional, Tuple

import torch

import shared_prompts
from errors import ConfigError
from utils import IGNORE_INDEX, label_logps, next_token_labels, pack_rows

PACKABLE_ATTENTION = ("sdpa", "eager")  # implementations that build the block-diagonal mask from position_ids


def model_logps(model: torch.nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor, labels: torch.Tensor, *,
                pad_token_id: int, pack: bool, token_level: bool,
                share_prompts: bool = False) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
    """(N,) summed label log-probs of (N, T) right-padded rows and, if `token_level`, their (N, T) per-token values
    (log p(token t | tokens < t) at labelled positions t, 0 elsewhere).

    Args:
        input_ids, attention_mask, labels: (N, T), right-padded; labels IGNORE_INDEX where no loss is taken.
        pad_token_id: fills packed rows that are not full.
        pack: pack the rows when the model's attention supports it (flash-attention would need one packed row, so it
            runs padded).
        share_prompts: run the prompt shared by several rows once (shared_prompts.py; its segments are packed, so
            this packs too); the model must pass shared_prompts.unsupported_reason.
    """
    n_rows, length = input_ids.shape
    positions = torch.arange(length, device=input_ids.device)
    rows = torch.arange(n_rows, device=input_ids.device).unsqueeze(1).expand_as(input_ids)
    columns = positions.unsqueeze(0).expand_as(input_ids)
    layout = {"attention_mask": attention_mask}
    if share_prompts and (reason := shared_prompts.unsupported_reason(model)):
        raise ConfigError(f"share_prompts: {reason}; set share_prompts=false")
    shared = shared_prompts.share_rows(input_ids, attention_mask, labels, pad_token_id) if share_prompts else None
    packed = pack_rows(input_ids, attention_mask, labels, pad_token_id) if shared is None and pack \
        and getattr(model.config, "_attn_implementation", None) in PACKABLE_ATTENTION else None
    if shared is not None:
        input_ids, labels, rows, columns = shared.input_ids, shared.labels, shared.rows, shared.columns
        layout = {"position_ids": shared.position_ids,
                  "attention_mask": shared_prompts.attention_masks(model.config, shared, model.dtype)}
    elif packed is not None:
        # A packed sequence's position ids are its columns in its padded row.
        input_ids, labels, rows, columns = packed.input_ids, packed.labels, packed.rows, packed.position_ids
        layout = {"position_ids": packed.position_ids}
    next_labels = next_token_labels(labels)
    keep = next_labels != IGNORE_INDEX
    logits = model(input_ids, logits_to_keep=keep, use_cache=False, **layout).logits
    # The logits' storage is reused for their gradient: nothing else reads them.
    token_logps = label_logps(logits, next_labels[keep], overwrite_logits=True)
    sums = token_logps.new_zeros(n_rows).index_add(0, rows[keep], token_logps)
    if not token_level:
        return sums, None
    # The logits at position t score the token at t + 1.
    per_token = token_logps.new_zeros(n_rows, length).index_put((rows[keep], columns[keep] + 1), token_logps)
    return sums, per_token
