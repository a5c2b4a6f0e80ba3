"""Token ids of rendered Examples, truncation to the length limits, batch elements and collation.

`Encoder.encode` tokenises every Example of a loader once, when the loader is built (in batches, so a fast
tokenizer encodes thousands of rows a second), and checks each one: a chat-templated prompt's tokens must be an
exact prefix of the tokens of prompt + response, every sequence has at most one BOS and each response ends with
exactly one EOS. `Encoder.element` then cuts one prompt and its responses to `max_length` for a batch.

With the prefix format, prompt and response are tokenised separately and concatenated (prompt with the tokenizer's
BOS, response followed by EOS), exactly as before chat templates existed. With a chat template, the whole templated
conversation is tokenised and split after the prompt's tokens, so the training sequence is the tokenisation of the
conversation; the template's end-of-turn EOS ends the response (EOS is appended only when the template has none).

Batch keys: `PROMPT_KEYS` (left-padded) and `response_keys(prefix)` for the prefixes `target`, `chosen`,
`rejected` and `KL` (right-padded); see `collate` for shapes.
"""
from dataclasses import dataclass
from typing import Callable, Dict, List, Mapping, NamedTuple, Optional, Sequence, Tuple

import numpy as np
import torch
from tqdm import tqdm

from feedback.examples import DataError, Example
from feedback.prompt_format import PromptFormat, RenderedExample
from utils import IGNORE_INDEX

CHOSEN, REJECTED, TARGET, KL = "chosen", "rejected", "target", "KL"
TRUNCATION_MODES = ("keep_start", "keep_end")
STATUS_KEY = "status"
TRUNCATION_MODE_KEY = "truncation_mode"
ORIGINAL_PROMPT_KEY = "original_prompt"
TENSOR_KEY_SUFFIXES = ("_input_ids", "_attention_mask", "_labels")
ENCODE_CHUNK = 1024  # texts per tokenizer call


class PromptKeys(NamedTuple):
    """Batch keys of the (shared) prompt."""
    text: str
    input_ids: str
    attention_mask: str
    truncated: str


class ResponseKeys(NamedTuple):
    """Batch keys of one response side: the response alone, and prompt + response."""
    text: str
    input_ids: str
    attention_mask: str
    combined_text: str
    combined_input_ids: str
    combined_attention_mask: str
    labels: str
    truncated: str


def response_keys(prefix: str) -> ResponseKeys:
    """Batch keys for responses tokenised under `prefix` ('target', 'chosen', 'rejected', 'KL')."""
    return ResponseKeys(*(f"{prefix}_{field}" for field in ResponseKeys._fields))


PROMPT_KEYS = PromptKeys(*(f"prompt_{field}" for field in PromptKeys._fields))
TARGET_KEYS, CHOSEN_KEYS, REJECTED_KEYS, KL_KEYS = (response_keys(p) for p in (TARGET, CHOSEN, REJECTED, KL))


@dataclass
class EncodedExample:
    """An Example with the token ids of its prompt and of the generations its loader uses.

    Attributes:
        prompt_ids: (Lp,) int32 prompt ids, untruncated.
        prompt_labels: (Lp,) int32: the ids of the prompt's own assistant turns and IGNORE_INDEX elsewhere (only
            with sft_all_assistant_turns), else None (no prompt token carries a loss).
        responses: generation index -> (Lr,) int32 response ids ending with EOS.
    """
    example: Example
    prompt_ids: np.ndarray
    prompt_labels: Optional[np.ndarray]
    responses: Dict[int, np.ndarray]


def prompt_cut(length: int, truncation_mode: str, max_prompt_length: int, keeps_first: bool) -> Tuple[slice, slice]:
    """The two slices of a prompt of `length` tokens that survive truncation to `max_prompt_length` tokens:
    keep_start keeps its start; keep_end its end, and its first token (BOS) too when `keeps_first`."""
    if truncation_mode == "keep_start":
        return slice(0, max_prompt_length), slice(0, 0)
    if keeps_first:
        # The model always saw BOS first; spend one slot on it and fill the rest with the prompt's end.
        return slice(0, 1), slice(length - max_prompt_length + 1, length)
    return slice(0, 0), slice(length - max_prompt_length, length)


def truncate_prompt(prompt_ids: Sequence[int], truncation_mode: str, max_prompt_length: int,
                    bos_token_id: Optional[int]) -> List[int]:
    """The `max_prompt_length` prompt tokens that survive truncation; `keep_end` keeps a leading BOS."""
    head, tail = prompt_cut(len(prompt_ids), truncation_mode, max_prompt_length,
                            bos_token_id is not None and prompt_ids[0] == bos_token_id)
    return list(prompt_ids[head]) + list(prompt_ids[tail])


class Encoder:
    """Tokenises rendered Examples with one tokenizer and prompt format, and builds length-limited elements."""

    def __init__(self, tokenizer, prompt_format: PromptFormat, max_length: int, max_prompt_length: int):
        self.tokenizer, self.prompt_format = tokenizer, prompt_format
        self.max_length, self.max_prompt_length = max_length, max_prompt_length
        self.bos, self.eos = tokenizer.bos_token_id, tokenizer.eos_token_id
        # Whether the tokenizer starts every text with BOS on its own (Llama does, GPT-2 and Qwen do not).
        self.adds_bos = self.bos is not None and tokenizer("a")["input_ids"][:1] == [self.bos] \
            and tokenizer("a", add_special_tokens=False)["input_ids"][:1] != [self.bos]

    # --- whole loaders, once --------------------------------------------------------------------------------

    def encode(self, examples: Sequence[Example], indices_of: Callable[[Example], Sequence[int]],
               label_prompt_turns: bool = False, desc: str = "tokenising") -> List[EncodedExample]:
        """Encodes every Example's prompt and the generations `indices_of(example)` names.

        `label_prompt_turns` also labels the prompt's assistant turns (every-turn SFT); it needs a fast tokenizer.
        """
        rendered = [self.prompt_format.render(example, indices_of(example), label_prompt_turns) for example in examples]
        n_texts = sum(1 + len(r.responses) for r in rendered)
        with tqdm(total=n_texts, desc=desc, unit="text") as progress:
            templated = self.prompt_format.templated
            prompts, offsets = self.batch_encode([r.prompt for r in rendered], progress, label_prompt_turns,
                                                 special_tokens=not templated, prepend_bos=templated)
            pieces = [(k, index, text) for k, r in enumerate(rendered) for index, text in r.responses.items()]
            texts = [rendered[k].prompt + text if templated else text for k, _, text in pieces]
            sequences, _ = self.batch_encode(texts, progress, special_tokens=False, prepend_bos=templated)
        encoded = []
        for example, r, prompt_ids, prompt_offsets in zip(examples, rendered, prompts, offsets):
            if not self.prompt_format.templated and prompt_ids and prompt_ids[-1] == self.eos:
                prompt_ids.pop()  # tokenizers that append EOS to every text would end the sequence before the response
            labels = self.prompt_turn_labels(prompt_ids, prompt_offsets, r, example) if label_prompt_turns else None
            encoded.append(EncodedExample(example, np.asarray(prompt_ids, dtype=np.int32), labels, {}))
        for (k, index, _), ids in zip(pieces, sequences):
            item = encoded[k]
            response = self.split_templated(item.prompt_ids.tolist(), ids, item.example) if templated \
                else ids + [self.eos]
            item.responses[index] = np.asarray(response, dtype=np.int32)
        return encoded

    def batch_encode(self, texts: List[str], progress: tqdm, with_offsets: bool = False, special_tokens: bool = False,
                     prepend_bos: bool = False) -> Tuple[List[List[int]], List[Optional[list]]]:
        """Ids (and character offsets) of many texts, a chunk per tokenizer call. With `prepend_bos`, a text gets the
        BOS that its tokenizer adds by itself unless it starts with it already (a chat template may write it)."""
        ids, offsets = [], []
        for start in range(0, len(texts), ENCODE_CHUNK):
            chunk = texts[start:start + ENCODE_CHUNK]
            try:
                encoding = self.tokenizer(chunk, add_special_tokens=special_tokens, return_attention_mask=False,
                                          return_offsets_mapping=with_offsets)
            except NotImplementedError as err:
                raise DataError("sft_all_assistant_turns needs a fast tokenizer (one that reports character "
                                "offsets)") from err
            chunk_offsets = encoding["offset_mapping"] if with_offsets else [None] * len(chunk)
            for row_ids, row_offsets in zip(encoding["input_ids"], chunk_offsets):
                row_ids, row_offsets = list(row_ids), row_offsets and list(row_offsets)
                if prepend_bos and self.adds_bos and row_ids[:1] != [self.bos]:
                    row_ids.insert(0, self.bos)
                    row_offsets = row_offsets and [(0, 0)] + row_offsets
                ids.append(row_ids)
                offsets.append(row_offsets)
            progress.update(len(chunk))
        return ids, offsets

    def split_templated(self, prompt_ids: List[int], full_ids: List[int], example: Example) -> List[int]:
        """The response ids of a templated conversation, after checking its prompt ids are their prefix.

        The response ends at its last EOS (the template's end of turn; what the template writes after it, such as
        a newline, is dropped), or gets one appended when the template writes none.
        """
        name = self.prompt_format.name
        if full_ids[:len(prompt_ids)] != prompt_ids:
            k = next((k for k, (a, b) in enumerate(zip(prompt_ids, full_ids)) if a != b), len(full_ids))
            shown = [self.tokenizer.convert_ids_to_tokens(ids[k:k + 3]) for ids in (prompt_ids, full_ids)]
            raise DataError(f"{example.describe()}: with {name}, the prompt's tokens are not a prefix of prompt + "
                            f"response's tokens (they differ at token {k}: {shown[0]} vs {shown[1]}); the "
                            f"response would be tokenised differently in training and in sampling")
        if prompt_ids[:2] == [self.bos, self.bos] and self.bos is not None:
            raise DataError(f"{example.describe()}: {name} starts the prompt with two BOS tokens")
        response = full_ids[len(prompt_ids):]
        if self.eos in response:
            response = response[:len(response) - response[::-1].index(self.eos)]
        else:
            response.append(self.eos)
        if response[-2:] == [self.eos, self.eos]:
            raise DataError(f"{example.describe()}: {name} ends the response with two EOS tokens")
        return response

    def prompt_turn_labels(self, prompt_ids: List[int], offsets: list, rendered: RenderedExample,
                           example: Example) -> np.ndarray:
        """The prompt ids at its assistant turns and IGNORE_INDEX elsewhere; a token straddling a turn's edge is an
        error (its loss would train on part of another turn)."""
        labels = np.full(len(prompt_ids), IGNORE_INDEX, dtype=np.int32)
        for start, end in rendered.assistant_spans:
            for position, (token_start, token_end) in enumerate(offsets[:len(prompt_ids)]):
                if token_end <= start or token_start >= end or token_start == token_end:
                    continue
                if token_start < start or token_end > end:
                    raise DataError(f"{example.describe()}: token {position} of the prompt straddles the edge of an "
                                    f"assistant turn under {self.prompt_format.name}, so that turn cannot be "
                                    f"labelled exactly")
                labels[position] = prompt_ids[position]
        return labels

    # --- one element per batch row ---------------------------------------------------------------------------

    def fit(self, prompt_length: int, response_lengths: Sequence[int], describe: Callable[[], str]) -> Tuple[int, bool]:
        """(prompt tokens kept, whether the prompt is cut). The prompt is cut to max_prompt_length only when prompt +
        longest response exceeds max_length and the prompt is longer than that; responses are then cut to fit."""
        cut = prompt_length + max(response_lengths) > self.max_length and prompt_length > self.max_prompt_length
        kept = self.max_prompt_length if cut else prompt_length
        if kept >= self.max_length:
            raise DataError(f"{describe()}: the prompt has {kept} tokens after truncation, leaving no room for a "
                            f"response within max_length={self.max_length}")
        return kept, cut

    def element(self, prompt_ids: Sequence[int], prompt_labels: Optional[Sequence[int]],
                responses: Mapping[str, Sequence[int]], truncation_mode: str, describe: Callable[[], str]) -> dict:
        """One prompt with one or more responses that share the same (truncated) prompt ids.

        Every combined sequence has at most `max_length` tokens; a response cut to fit loses its EOS.

        Returns:
            `PROMPT_KEYS` and `response_keys(prefix)` for every prefix of `responses`, as Python lists, strings and
            bools; `<prefix>_labels` equals the combined ids with the prompt positions set to IGNORE_INDEX (but
            for the prompt's labelled assistant turns).
        """
        if truncation_mode not in TRUNCATION_MODES:
            raise DataError(f"{describe()}: truncation_mode must be one of {TRUNCATION_MODES}, got {truncation_mode!r}")
        kept, cut = self.fit(len(prompt_ids), [len(ids) for ids in responses.values()], describe)
        labels = [IGNORE_INDEX] * len(prompt_ids) if prompt_labels is None else list(prompt_labels)
        prompt_ids = list(prompt_ids)
        if cut:
            head, tail = prompt_cut(len(prompt_ids), truncation_mode, kept,
                                    self.bos is not None and prompt_ids[0] == self.bos)
            prompt_ids, labels = prompt_ids[head] + prompt_ids[tail], labels[head] + labels[tail]
        room = self.max_length - kept
        prompt_text = self.prompt_text(prompt_ids)
        element = {PROMPT_KEYS.text: prompt_text, PROMPT_KEYS.input_ids: prompt_ids,
                   PROMPT_KEYS.attention_mask: [1] * kept, PROMPT_KEYS.truncated: cut}
        for prefix, ids in responses.items():
            ids = list(ids)
            element.update(self.response_fields(prompt_ids, labels, prompt_text, ids[:room], len(ids) > room, prefix))
        return element

    def prompt_text(self, prompt_ids: List[int]) -> str:
        """The prompt as shown in batches and sample files: a templated prompt keeps its template's special tokens
        (its role markers), but not BOS."""
        if self.prompt_format.templated:
            shown = prompt_ids[1:] if prompt_ids[:1] == [self.bos] else prompt_ids
            return self.tokenizer.decode(shown, skip_special_tokens=False)
        return self.tokenizer.decode(prompt_ids, skip_special_tokens=True)

    def response_fields(self, prompt_ids: List[int], prompt_labels: List[int], prompt_text: str,
                        response_ids: List[int], truncated: bool, prefix: str) -> dict:
        """The `response_keys(prefix)` entries of one element; `response_ids` already fit after the prompt."""
        keys = response_keys(prefix)
        shown_ids = response_ids if truncated else response_ids[:-1]  # EOS is for the model, not for display
        text = self.tokenizer.decode(shown_ids, skip_special_tokens=True)
        combined_ids = prompt_ids + response_ids
        return {
            keys.text: text,
            keys.input_ids: response_ids,
            keys.attention_mask: [1] * len(response_ids),
            keys.combined_text: prompt_text + text,
            keys.combined_input_ids: combined_ids,
            keys.combined_attention_mask: [1] * len(combined_ids),
            keys.labels: prompt_labels + response_ids,
            keys.truncated: truncated,
        }


# ---------------------------------------------------------------------------------------------------
# Collating


def pad_sequences(sequences: Sequence[Sequence[int]], value: int, left: bool) -> torch.Tensor:
    """Stacks variable-length id lists into a (N, longest) LongTensor padded with `value`."""
    width = max((len(s) for s in sequences), default=0)
    padded = torch.full((len(sequences), width), value, dtype=torch.long)
    for row, sequence in enumerate(sequences):
        if sequence:
            start = width - len(sequence) if left else 0
            padded[row, start:start + len(sequence)] = torch.tensor(sequence, dtype=torch.long)
    return padded


def padding_value(key: str, pad_token_id: int) -> int:
    if key.endswith("_labels"):
        return IGNORE_INDEX
    if key.endswith("_attention_mask"):
        return 0
    return pad_token_id


def collate(batch: Sequence[dict], pad_token_id: Optional[int]) -> dict:
    """Turns element dicts into one batch dict.

    Keys ending in `_input_ids`, `_attention_mask` or `_labels` become (B, L) LongTensors padded with the pad id,
    0 or IGNORE_INDEX respectively; keys containing 'prompt' are left-padded (so a generation continues right after
    the prompt), all others right-padded. Every other key becomes a list of length B.
    """
    if pad_token_id is None:
        raise ValueError("collate needs a pad token id; set tokenizer.pad_token_id (e.g. to eos_token_id)")
    collated = {}
    for key in batch[0]:
        values = [element[key] for element in batch]
        if key.endswith(TENSOR_KEY_SUFFIXES):
            collated[key] = pad_sequences(values, padding_value(key, pad_token_id), left="prompt" in key)
        else:
            collated[key] = values
    return collated
