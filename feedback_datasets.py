"""The built-in human-feedback datasets, loaded into conversational `Example`s.

Every `get_<name>(split, local_path=None)` returns a `Dataset` whose Examples hold the prompt as messages and each
response as the assistant's bare text; the dataloader formats them with the run's prompt format (the original's
four prefix strings, byte for byte as before, or a chat template). `local_path` points at a local mirror of the
hub repository (see `feedback.sources.load_split`). Each loader counts the rows it reads and drops (with the reason),
for the data report. Any data problem raises `DataError`.

Differences from the original:

* OASST: `sft_index` is the best-ranked response of the prompt; the original left it at -1, which made a
  dispreferred response the SFT target (F-02).
* HH: a non-empty `human_suffix`/`assistant_suffix` closes each turn; the original put it right after the role
  prefix, at the start of the turn (F-03). Same output with the default empty suffixes.
* SHP: the at-most-5-pairs subsampling on train uses its own `random.Random(seed)`, so loading is deterministic
  whatever the global RNG state (the original used the global `random`, F-30). A zero score, which crashed the
  original's ratio, counts as an infinite ratio.
* Space normalisation applies to the texts, not to the role markers around them (identical with the default
  prefixes, which hold no spaces).
* AlpacaEval is read from the repository's `alpaca_eval.json` file rather than through its loading script, which
  current `datasets` versions no longer run.
* Hub failures are one-line `DataError`s within seconds (the hub is probed first), and every dataset can be loaded
  from a local mirror.
* A dataset that is empty after filtering is an error rather than an empty training set.
* New: `ultrafeedback` (UltraFeedback binarized, whole conversations, with its scores), `ultrafeedback_armorm`
  (the ArmoRM-scored variant) and `ultrachat` (SFT), as in the newest HALOs.
"""
import random
import re
from collections import defaultdict
from typing import Any, Iterable, Optional

from tqdm import tqdm

from feedback.examples import DataError, Dataset, Example, Message
from feedback.rows import split_conversation
from feedback.sources import load_split, require_columns

HH_RESPONSE_MARKER = "\n\nAssistant: "
HH_TURN_MARKER = re.compile(r"\s*(Human:|Assistant:)\s+")
HH_ROLES = {"Human:": "user", "Assistant:": "assistant"}
SHP_MIN_SCORE_RATIO = 2
SHP_MAX_PAIRS_PER_PROMPT = 5
ULTRABIN_SPLITS = {"train": "train_prefs", "test": "test_prefs"}
ULTRACHAT_SPLITS = {"train": "train_sft", "test": "test_sft"}
ALL_SPLITS = ("train", "test")


def _rows(rows: Iterable[Any], data: Dataset) -> Iterable[Any]:
    """The rows with a progress bar, each counted as read."""
    for row in tqdm(rows, desc=f"Processing {data.name}"):
        data.count_row()
        yield row


def _require_split(split: str, name: str, splits: Iterable[str]) -> None:
    if split not in splits:
        raise DataError(f"dataset '{name}' has no split '{split}'; expected one of {sorted(splits)}")


def _finish(data: Dataset, name: str, split: str, normalise_spaces: bool) -> Dataset:
    if normalise_spaces:
        for example in data.data.values():
            example.remove_extra_spaces()
    return data.require_examples(name, split)


def _user_prompt(data: Dataset, text: str, origin: str) -> Example:
    return data.conversation([Message("user", text)], origin)


# ----------------------------------------------------------------------------------------------
# Stanford Human Preferences
# ----------------------------------------------------------------------------------------------

def get_shp(split: str, local_path: Optional[str] = None, seed: int = 0) -> Dataset:
    """Stanford Human Preferences (`stanfordnlp/SHP`): pairs of Reddit comments ranked by upvotes.

    On the train split only, rows whose score ratio is below 2 are dropped and each prompt keeps at most 5 randomly
    chosen pairs (drawn with `random.Random(seed)`); all generations are kept. The SFT target is the first response
    seen for the prompt, preferred or not (as the original). Prompts are truncated from the end ('keep_start').
    """
    rows = load_split("stanfordnlp/SHP", split, name="shp", local_path=local_path)
    require_columns(rows, ["history", "human_ref_A", "human_ref_B", "score_A", "score_B", "labels"],
                    name="shp", split=split)
    data = Dataset("SHP")
    for row_number, row in enumerate(_rows(rows, data), start=1):
        if split == "train" and _score_ratio(row["score_A"], row["score_B"]) < SHP_MIN_SCORE_RATIO:
            data.drop(f"score ratio < {SHP_MIN_SCORE_RATIO}")
            continue
        example = _user_prompt(data, row["history"], f"split '{split}' row {row_number}")
        first = example.num_generations()
        example.generations += [row["human_ref_A"], row["human_ref_B"]]
        example.scores += [row["score_A"], row["score_B"]]
        example.pairs.append((first, first + 1) if row["labels"] == 1 else (first + 1, first))
        example.sft_index = 0
        example.truncation_mode = "keep_start"
        example.dataset_name = "shp"
    if split == "train":
        rng = random.Random(seed)
        for example in data.data.values():
            example.pairs = rng.sample(example.pairs, min(SHP_MAX_PAIRS_PER_PROMPT, len(example.pairs)))
    return _finish(data, "shp", split, normalise_spaces=True)


def _score_ratio(score_a: float, score_b: float) -> float:
    """max(a/b, b/a); a zero score makes the ratio infinite unless both are zero (ratio 1)."""
    high, low = max(score_a, score_b), min(score_a, score_b)
    if low <= 0:
        return float("inf") if high > low else 1.0
    return high / low


# ----------------------------------------------------------------------------------------------
# Anthropic HH-RLHF
# ----------------------------------------------------------------------------------------------

def get_hh(split: str, local_path: Optional[str] = None) -> Dataset:
    """Anthropic HH-RLHF (`Anthropic/hh-rlhf`), all subsets of the default configuration."""
    return _get_hh(split, name="hh", data_dir=None, local_path=local_path)


def get_hh_helpful(split: str, local_path: Optional[str] = None) -> Dataset:
    """The `helpful-base` subset of Anthropic HH-RLHF."""
    return _get_hh(split, name="hh_helpful", data_dir="helpful-base", local_path=local_path)


def get_hh_harmless(split: str, local_path: Optional[str] = None) -> Dataset:
    """The `harmless-base` subset of Anthropic HH-RLHF."""
    return _get_hh(split, name="hh_harmless", data_dir="harmless-base", local_path=local_path)


def _get_hh(split: str, *, name: str, data_dir: Optional[str], local_path: Optional[str]) -> Dataset:
    """Each row is a dialogue with two alternative last assistant turns: chosen, then rejected.

    Rows with the same prompt are merged; the SFT target is the chosen response of the first one.
    """
    rows = load_split("Anthropic/hh-rlhf", split, name=name, data_dir=data_dir, local_path=local_path)
    require_columns(rows, ["chosen", "rejected"], name=name, split=split)
    data = Dataset("Anthropic-HH")
    for row_number, row in enumerate(_rows(rows, data), start=1):
        where = f"split '{split}' row {row_number}"
        raw_prompt, chosen, rejected = _split_hh_row(row["chosen"], row["rejected"],
                                                     where=f"dataset '{name}' {where}")
        example = data.conversation(_hh_messages(raw_prompt), where)
        example.add_pair(chosen, rejected)
        example.sft_index = 0
        example.dataset_name = name
    return _finish(data, name, split, normalise_spaces=True)


def _split_hh_row(chosen: str, rejected: str, *, where: str) -> tuple[str, str, str]:
    """Splits a row into (raw prompt, chosen response, rejected response).

    The raw prompt is `chosen` up to and including its last '\\n\\nAssistant: '. As in the original, the rejected
    response is `rejected` minus as many leading characters, assuming both texts share the prompt (a handful of
    real rows do not).
    """
    marker_start = chosen.rfind(HH_RESPONSE_MARKER)
    if marker_start < 0:
        raise DataError(f"{where}: field 'chosen' has no {HH_RESPONSE_MARKER!r} turn; expected an "
                        f"HH dialogue ending with an assistant response")
    cut = marker_start + len(HH_RESPONSE_MARKER)
    return chosen[:cut], chosen[cut:], rejected[cut:]


def _hh_messages(raw_prompt: str) -> list[Message]:
    """'\\n\\nHuman: a\\n\\nAssistant: b ... \\n\\nAssistant: ' as messages (the final empty assistant turn dropped).

    Text before the first role marker (no real row has any) becomes a user turn of its own.
    """
    # re.split with a capturing group gives [leading text, role, text, role, text, ...].
    pieces = HH_TURN_MARKER.split(raw_prompt)
    messages = [Message("user", pieces[0])] if pieces[0] else []
    return messages + [Message(HH_ROLES[role], text) for role, text in zip(pieces[1:-2:2], pieces[2:-2:2])]


# ----------------------------------------------------------------------------------------------
# OpenAssistant
# ----------------------------------------------------------------------------------------------

def get_oasst(split: str, local_path: Optional[str] = None) -> Dataset:
    """OpenAssistant Conversations (`OpenAssistant/oasst1`), English messages only.

    Every ranked message (rank > 0) is paired with its next-best sibling (rank one lower, preferred); the prompt is
    the conversation from the root to their parent. A ranking r0 > r1 > r2 thus gives pairs (r0, r1) and (r1, r2),
    with r1 stored twice. Messages whose better sibling or any ancestor is missing (e.g. not English) are dropped.
    The SFT target is the best-ranked response. 'test' reads the hub's 'validation' split.
    """
    hub_split = "validation" if split == "test" else "train"
    rows = load_split("OpenAssistant/oasst1", hub_split, name="oasst", local_path=local_path)
    require_columns(rows, ["message_id", "parent_id", "text", "role", "lang", "rank"], name="oasst", split=split)
    data = Dataset("OASST")
    messages = []
    for row in _rows(rows, data):
        if row["lang"] == "en":
            messages.append(row)
        else:
            data.drop("not English")
    by_id = {message["message_id"]: message for message in messages}
    children = defaultdict(list)
    for message in messages:
        children[message["parent_id"]].append(message)
    for message in messages:
        if not message["rank"]:  # unranked (None, e.g. prompts) or already the best (0): a sibling, not a pair
            continue
        better = next((sibling for sibling in children[message["parent_id"]]
                       if sibling["rank"] == message["rank"] - 1), None)
        history = None if better is None else _oasst_history(better, by_id)
        if history is None:
            data.drop("next-best sibling or an ancestor missing")
            continue
        example = data.conversation([Message("assistant" if turn["role"] == "assistant" else "user", turn["text"])
                                     for turn in history], f"message {message['message_id']}")
        example.add_pair(better["text"], message["text"])
        example.scores += [better["rank"], message["rank"]]
        example.dataset_name = "oasst"
    for example in data.data.values():
        example.sft_index = min(range(example.num_generations()), key=example.scores.__getitem__)
    return _finish(data, "oasst", split, normalise_spaces=True)


def _oasst_history(message: dict, by_id: dict[str, dict]) -> Optional[list[dict]]:
    """Messages from the root down to `message`'s parent, or None if one of them is missing."""
    history = []
    parent_id = message["parent_id"]
    while parent_id is not None:
        if parent_id not in by_id:
            return None
        history.append(by_id[parent_id])
        parent_id = by_id[parent_id]["parent_id"]
    return history[::-1]


# ----------------------------------------------------------------------------------------------
# UltraFeedback, UltraChat and AlpacaEval
# ----------------------------------------------------------------------------------------------

def get_ultrabin(split: str, local_path: Optional[str] = None) -> Dataset:
    """UltraFeedback binarized (`HuggingFaceH4/ultrafeedback_binarized`, the *_prefs splits), as the original reads
    it: the `prompt` column as one user turn, and one pair per row, the last message of `chosen` over that of
    `rejected`. Spaces are normalised and prompts are truncated from the end ('keep_start')."""
    _require_split(split, "ultrabin", ULTRABIN_SPLITS)
    rows = load_split("HuggingFaceH4/ultrafeedback_binarized", ULTRABIN_SPLITS[split], name="ultrabin",
                      local_path=local_path)
    require_columns(rows, ["prompt", "chosen", "rejected"], name="ultrabin", split=split)
    data = Dataset("Ultrabin")
    for row_number, row in enumerate(_rows(rows, data), start=1):
        example = _user_prompt(data, row["prompt"], f"split '{split}' row {row_number}")
        example.add_pair(row["chosen"][-1]["content"], row["rejected"][-1]["content"])
        example.sft_index = 0
        example.truncation_mode = "keep_start"
        example.dataset_name = "ultrabin"
    return _finish(data, "ultrabin", split, normalise_spaces=True)


def get_ultrafeedback(split: str, local_path: Optional[str] = None) -> Dataset:
    """UltraFeedback binarized (`HuggingFaceH4/ultrafeedback_binarized`) as conversations: the prompt is every
    message of `chosen` before its final assistant turn (so system prompts and earlier turns are kept), the pair is
    chosen over rejected, and `score_chosen`/`score_rejected` are the scores when the columns exist. Text is kept
    verbatim. Rows whose conversations are malformed or whose chosen and rejected histories differ are dropped."""
    _require_split(split, "ultrafeedback", ULTRABIN_SPLITS)
    rows = load_split("HuggingFaceH4/ultrafeedback_binarized", ULTRABIN_SPLITS[split], name="ultrafeedback",
                      local_path=local_path)
    require_columns(rows, ["chosen", "rejected"], name="ultrafeedback", split=split)
    data = Dataset("UltraFeedback")
    has_scores = {"score_chosen", "score_rejected"} <= set(rows.column_names)
    for row_number, row in enumerate(_rows(rows, data), start=1):
        where = f"split '{split}' row {row_number}"
        pair = _chosen_and_rejected(row, where, data)
        if pair is None:
            continue
        prompt, chosen, rejected = pair
        example = data.conversation(prompt, where)
        example.add_pair(chosen, rejected)
        if has_scores:
            example.scores += [row["score_chosen"], row["score_rejected"]]
        example.sft_index = 0
        example.dataset_name = "ultrafeedback"
    return _finish(data, "ultrafeedback", split, normalise_spaces=False)


def get_ultrafeedback_armorm(split: str, local_path: Optional[str] = None) -> Dataset:
    """UltraFeedback prompts with responses scored by ArmoRM (`princeton-nlp/llama3-ultrafeedback-armorm`), the
    variant the newest HALOs trains on. Every response of `all_generated_responses` is kept with its score from
    `all_rm_scores`; the pair is the best- over the worst-scored response (which is how the dataset's chosen and
    rejected columns were made) and the best one is the SFT target. The prompt comes from `chosen`'s history. Rows
    whose responses all score the same are dropped."""
    _require_split(split, "ultrafeedback_armorm", ALL_SPLITS)
    rows = load_split("princeton-nlp/llama3-ultrafeedback-armorm", split, name="ultrafeedback_armorm",
                      local_path=local_path)
    require_columns(rows, ["chosen", "rejected", "all_generated_responses", "all_rm_scores"],
                    name="ultrafeedback_armorm", split=split)
    data = Dataset("UltraFeedback-ArmoRM")
    for row_number, row in enumerate(_rows(rows, data), start=1):
        where = f"split '{split}' row {row_number}"
        pair = _chosen_and_rejected(row, where, data)
        if pair is None:
            continue
        responses, scores = list(row["all_generated_responses"]), list(row["all_rm_scores"])
        if len(responses) != len(scores) or len(set(scores)) < 2:
            data.drop("responses and scores do not match" if len(responses) != len(scores) else "all scores tied")
            continue
        example = data.conversation(pair[0], where)
        first = example.num_generations()
        best = first + max(range(len(scores)), key=scores.__getitem__)
        worst = first + min(range(len(scores)), key=scores.__getitem__)
        example.generations += responses
        example.scores += scores
        example.pairs.append((best, worst))
        example.sft_index = best
        example.dataset_name = "ultrafeedback_armorm"
    return _finish(data, "ultrafeedback_armorm", split, normalise_spaces=False)


def _chosen_and_rejected(row: dict, where: str, data: Dataset) -> Optional[tuple[list[Message], str, str]]:
    """(prompt, chosen text, rejected text) of a row holding two whole conversations, or None (dropped)."""
    try:
        prompt, chosen = split_conversation(row["chosen"], "chosen", where)
        rejected_prompt, rejected = split_conversation(row["rejected"], "rejected", where)
    except DataError:
        data.drop("malformed conversation")
        return None
    if prompt != rejected_prompt:
        data.drop("chosen and rejected histories differ")
        return None
    return prompt, chosen, rejected


def get_ultrachat(split: str, local_path: Optional[str] = None) -> Dataset:
    """UltraChat 200k (`HuggingFaceH4/ultrachat_200k`, the *_sft splits): multi-turn conversations for SFT. The
    target is the final assistant turn and the prompt everything before it (with `sft_all_assistant_turns=true`
    the SFT loss also covers the earlier assistant turns). Text is kept verbatim; rows without a final assistant
    turn are dropped."""
    _require_split(split, "ultrachat", ULTRACHAT_SPLITS)
    rows = load_split("HuggingFaceH4/ultrachat_200k", ULTRACHAT_SPLITS[split], name="ultrachat",
                      local_path=local_path)
    require_columns(rows, ["messages"], name="ultrachat", split=split)
    data = Dataset("UltraChat")
    for row_number, row in enumerate(_rows(rows, data), start=1):
        where = f"split '{split}' row {row_number}"
        try:
            prompt, target = split_conversation(row["messages"], "messages", where)
        except DataError:
            data.drop("no final assistant turn after a user turn")
            continue
        example = data.conversation(prompt, where)
        example.generations.append(target)
        example.sft_index = 0
        example.dataset_name = "ultrachat"
    return _finish(data, "ultrachat", split, normalise_spaces=False)


def get_alpacaeval(split: str, local_path: Optional[str] = None) -> Dataset:
    """AlpacaEval instructions (`tatsu-lab/alpaca_eval`), for evaluation only (split 'test').

    The generation is the reference output; `dataset_name` is the row's source dataset and `original_prompt` the
    bare instruction. Spaces are not normalised. A local mirror is the repository directory (its
    `alpaca_eval.json` is read) or that file itself.
    """
    if split != "test":
        raise DataError(f"dataset 'alpacaeval' is for evaluation only; expected split 'test', got '{split}'")
    rows = load_split("tatsu-lab/alpaca_eval", "eval", name="alpacaeval", data_file="alpaca_eval.json",
                      local_path=local_path)
    require_columns(rows, ["instruction", "output", "dataset"], name="alpacaeval", split=split)
    data = Dataset("AlpacaEval")
    for row_number, row in enumerate(_rows(rows, data), start=1):
        example = _user_prompt(data, row["instruction"], f"row {row_number}")
        example.generations.append(row["output"])
        example.dataset_name = row["dataset"]
        example.original_prompt = row["instruction"]
    return _finish(data, "alpacaeval", split, normalise_spaces=False)


__all__ = ["DataError", "Dataset", "Example", "get_alpacaeval", "get_hh", "get_hh_harmless", "get_hh_helpful",
           "get_oasst", "get_shp", "get_ultrabin", "get_ultrachat", "get_ultrafeedback", "get_ultrafeedback_armorm"]
