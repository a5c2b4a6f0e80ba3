"""The forward passes of a training step, the rows each runs, and how much work that is: tokens run, attention
context and scored positions, with or without shared prompts (the benchmarks' token counts and FLOPs)."""
from typing import Dict, List, NamedTuple

import shared_prompts
from dataloader import CHOSEN_KEYS, KL_KEYS, REJECTED_KEYS, TARGET_KEYS
from trainers import concatenate_rows
from utils import IGNORE_INDEX

# (with gradients, row groups) of each pass, policy passes first: KTO's policy runs its KL rows apart and without
# gradients, its reference runs them with the targets (trainers.UnpairedPreferenceTrainer).
PASSES = {
    "sft": [(True, (TARGET_KEYS,))],
    "dpo": [(True, (CHOSEN_KEYS, REJECTED_KEYS)), (False, (CHOSEN_KEYS, REJECTED_KEYS))],
    "kto": [(False, (KL_KEYS,)), (True, (TARGET_KEYS,)), (False, (TARGET_KEYS, KL_KEYS))],
}


class PassWork(NamedTuple):
    with_gradients: bool
    tokens: int  # tokens the pass runs, padding excluded
    context: int  # summed over those tokens, the keys each attends to (its position + 1)
    scored: int  # positions whose logits are computed: those whose next token is labelled


def step_work(loss: str, batch: Dict, pad_token_id: int, shared: bool) -> List[PassWork]:
    """The work of each pass of `loss`'s step on `batch`, its prompts shared or not."""
    work = []
    for with_gradients, groups in PASSES[loss]:
        input_ids, attention_mask, labels = concatenate_rows(batch, groups, pad_token_id)
        scored = int((labels[:, 1:] != IGNORE_INDEX).sum())
        layout = shared_prompts.share_rows(input_ids, attention_mask, labels, pad_token_id) if shared else None
        if layout is None:
            lengths = attention_mask.sum(1)
            tokens, context = int(lengths.sum()), int((lengths * (lengths + 1) // 2).sum())
        else:
            real = layout.segment_ids > 0
            tokens, context = int(real.sum()), int((layout.position_ids[real] + 1).sum())
        work.append(PassWork(with_gradients, tokens, context, scored))
    return work
