"""Tokenised, padded batches for every HALOs loss.

A DataLoader loads its feedback datasets once, flattens their Examples into the items its loss needs
(one SFT target per prompt, chosen/rejected responses, preference pairs ...) and yields collated
GLOBAL batches of exactly `batch_size` examples; the trainer slices them per rank.

Add a dataset by defining `get_<name>(split, human_prefix, human_suffix, assistant_prefix,
assistant_suffix) -> Dataset` in this module (the loader looks names up in its globals), or by
pointing `local_datasets[<name>]` at a JSON/JSONL file of your own data.

Batch keys: `PROMPT_KEYS` (left-padded) and `response_keys(prefix)` for the prefixes `target`,
`chosen`, `rejected` and `KL` (right-padded); see `collate` for shapes.

Differences from the original:
- Token ids are concatenated directly (prompt ids + response ids + EOS id) instead of decoding to text
  and re-encoding. So CSFT control tokens stay in the input ids (F-01); there is no ' ' before EOS and
  no double space in KL responses (F-10); the combined length never exceeds `max_length`; and the
  label mask boundary is exact (no token merge across the prompt/response boundary).
- `keep_end` prompt truncation keeps a leading BOS token.
- A response truncated to fit `max_length` has no EOS (it did not end there).
- Truncation is never silent: each epoch logs one warning with the number of truncated prompts and
  responses.
- The paired loader truncates the prompt once for both responses, so chosen and rejected share the
  same prompt ids (F-11).
- Examples from different datasets with the same prompt are all kept (F-28).
- All randomness comes from a private `random.Random(seed)` created per iteration: iterating twice
  gives identical batches, independent of the global RNG (spec 2.4).
- A loader whose items cannot fill one batch raises DataError instead of looping forever (F-09), and
  every batch has exactly `batch_size` examples (`SimpleKTODataLoader` requires an even batch size).
- `max_prompt_count` samples pairs per iteration without mutating the Examples.
- `ScoreUnaryDataLoader` reads the score direction off each example's pairs and rejects examples
  without scores (F-21).
- Binary feedback (`Example.desirable`) feeds the csft, kto-simple and unpaired loaders.
- Unknown loader options raise TypeError; `frac_unique_*` must lie in [0, 1] and the kept counts are
  computed exactly (10 x 0.3 keeps 3, not 4).
"""

import inspect
import logging
import math
import random
from abc import ABC, abstractmethod
from collections import Counter, deque
from fractions import Fraction
from typing import Callable, Dict, Iterator, List, Mapping, NamedTuple, Optional, Sequence, Tuple

import torch

# The get_<name> functions are imported so that dataset_functions() finds them next to users' own ones.
from feedback_datasets import (DataError, Dataset, Example, get_alpacaeval, get_hh, get_hh_harmless,  # noqa: F401
                               get_hh_helpful, get_local, get_oasst, get_shp, get_ultrabin)
from utils import IGNORE_INDEX

logger = logging.getLogger("halos.data")

CHOSEN, REJECTED = "chosen", "rejected"
TRUNCATION_MODES = ("keep_start", "keep_end")
STATUS_KEY = "status"
TRUNCATION_MODE_KEY = "truncation_mode"
ORIGINAL_PROMPT_KEY = "original_prompt"
TENSOR_KEY_SUFFIXES = ("_input_ids", "_attention_mask", "_labels")


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
TARGET, KL = "target", "KL"
TARGET_KEYS, CHOSEN_KEYS, REJECTED_KEYS, KL_KEYS = (response_keys(p) for p in (TARGET, CHOSEN, REJECTED, KL))


# ---------------------------------------------------------------------------------------------------
# Loading datasets


def dataset_functions() -> Dict[str, Callable]:
    """Dataset name -> its `get_<name>` function in this module (get_local takes a path, not a name)."""
    return {attr[len("get_"):]: value for attr, value in globals().items()
            if attr.startswith("get_") and attr != "get_local" and callable(value)}


def accepts_local_path(function: Callable) -> bool:
    parameters = inspect.signature(function).parameters.values()
    return any(p.name == "local_path" or p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters)


def load_named_dataset(name: str, split: str, prompt_format: Tuple[str, str, str, str],
                 local_datasets: Mapping[str, str]) -> Dataset:
    """Builds one dataset by name; `prompt_format` is (human_prefix, human_suffix, assistant_prefix, assistant_suffix)."""
    functions = dataset_functions()
    local_path = local_datasets.get(name)
    if name in functions:
        function = functions[name]
        if local_path is None:
            return function(split, *prompt_format)
        if not accepts_local_path(function):
            raise DataError(f"dataset '{name}': local_datasets.{name} is set, but get_{name} takes no local_path argument")
        return function(split, *prompt_format, local_path=local_path)
    if local_path is not None:
        return get_local(local_path, split, *prompt_format, name=name)
    raise DataError(f"unknown dataset '{name}': define get_{name} in dataloader.py or set local_datasets.{name}; "
                    f"available: {', '.join(sorted(set(functions) | set(local_datasets)))}")


def load_examples(dataset_names: Sequence[str], split: str, human_prefix: str, human_suffix: str,
                  assistant_prefix: str, assistant_suffix: str,
                  local_datasets: Optional[Mapping[str, str]] = None) -> List[Example]:
    """All Examples of the named datasets, in dataset order.

    A prompt present in several datasets yields one Example per dataset (the original kept only the last).
    """
    local_datasets = {name: str(path) for name, path in (local_datasets or {}).items() if path is not None}
    prompt_format = (human_prefix, human_suffix, assistant_prefix, assistant_suffix)
    examples = []
    for name in dataset_names:
        dataset = load_named_dataset(name, split, prompt_format, local_datasets)
        if not isinstance(dataset, Dataset):
            raise DataError(f"dataset '{name}': get_{name} must return a Dataset, got {type(dataset).__name__}")
        examples.extend(dataset.data.values())
    return examples


# ---------------------------------------------------------------------------------------------------
# Tokenising one element


def encode_prompt(prompt: str, tokenizer) -> List[int]:
    """Prompt ids with the tokenizer's default special tokens (e.g. a leading BOS), minus a trailing EOS."""
    ids = list(tokenizer(prompt)["input_ids"])
    # Tokenizers that append EOS to every text would otherwise end the sequence before the response.
    if ids and ids[-1] == tokenizer.eos_token_id:
        ids.pop()
    return ids


def encode_response(generation: str, tokenizer) -> List[int]:
    """Response ids without special tokens, terminated by the EOS id."""
    return list(tokenizer(generation, add_special_tokens=False)["input_ids"]) + [tokenizer.eos_token_id]


def truncate_prompt(prompt_ids: List[int], truncation_mode: str, max_prompt_length: int,
                    bos_token_id: Optional[int]) -> List[int]:
    """The `max_prompt_length` prompt tokens that survive truncation; `keep_end` keeps a leading BOS."""
    if truncation_mode == "keep_start":
        return prompt_ids[:max_prompt_length]
    if bos_token_id is not None and prompt_ids[0] == bos_token_id:
        # The model always saw BOS first; spend one slot on it and fill the rest with the prompt's end.
        return prompt_ids[:1] + prompt_ids[len(prompt_ids) - max_prompt_length + 1:]
    return prompt_ids[len(prompt_ids) - max_prompt_length:]


def response_fields(prompt_ids: List[int], prompt_text: str, response_ids: List[int], truncated: bool,
                    prefix: str, tokenizer) -> dict:
    """The `response_keys(prefix)` entries of one element; `response_ids` already fit after the prompt."""
    keys = response_keys(prefix)
    shown_ids = response_ids if truncated else response_ids[:-1]  # EOS is for the model, not for display
    text = tokenizer.decode(shown_ids, skip_special_tokens=True)
    combined_ids = prompt_ids + response_ids
    return {
        keys.text: text,
        keys.input_ids: response_ids,
        keys.attention_mask: [1] * len(response_ids),
        keys.combined_text: prompt_text + text,
        keys.combined_input_ids: combined_ids,
        keys.combined_attention_mask: [1] * len(combined_ids),
        keys.labels: [IGNORE_INDEX] * len(prompt_ids) + response_ids,
        keys.truncated: truncated,
    }


def tokenize_element(prompt: str, responses: Mapping[str, str], truncation_mode: str, tokenizer,
                     max_length: int, max_prompt_length: int, dataset_name: str = "") -> dict:
    """Tokenises one prompt with one or more responses that share the same (truncated) prompt ids.

    The prompt is truncated to `max_prompt_length` only when prompt + longest response exceeds
    `max_length` and the prompt is longer than `max_prompt_length`; each response is then cut to fit
    `max_length`. So every combined sequence has at most `max_length` tokens.

    Args:
        prompt: formatted prompt text.
        responses: prefix ('target', 'chosen', ...) -> response text.
        truncation_mode: 'keep_start' or 'keep_end': which part of a long prompt survives.
        dataset_name: named in errors.

    Returns:
        `PROMPT_KEYS` and `response_keys(prefix)` for every prefix, as Python lists/strings/bools;
        `<prefix>_labels` equals the combined ids with the prompt positions set to IGNORE_INDEX.
    """
    if truncation_mode not in TRUNCATION_MODES:
        raise DataError(f"dataset '{dataset_name}': truncation_mode must be one of {TRUNCATION_MODES}, "
                        f"got {truncation_mode!r}")
    prompt_ids = encode_prompt(prompt, tokenizer)
    response_ids = {prefix: encode_response(text, tokenizer) for prefix, text in responses.items()}
    longest = max(len(ids) for ids in response_ids.values())
    prompt_truncated = len(prompt_ids) + longest > max_length and len(prompt_ids) > max_prompt_length
    if prompt_truncated:
        prompt_ids = truncate_prompt(prompt_ids, truncation_mode, max_prompt_length, tokenizer.bos_token_id)
    room = max_length - len(prompt_ids)
    if room < 1:
        raise DataError(f"dataset '{dataset_name}': prompt {prompt[:60]!r} has {len(prompt_ids)} tokens after "
                        f"truncation, leaving no room for a response within max_length={max_length}")
    prompt_text = tokenizer.decode(prompt_ids, skip_special_tokens=True)
    element = {PROMPT_KEYS.text: prompt_text, PROMPT_KEYS.input_ids: prompt_ids,
               PROMPT_KEYS.attention_mask: [1] * len(prompt_ids), PROMPT_KEYS.truncated: prompt_truncated}
    for prefix, ids in response_ids.items():
        element.update(response_fields(prompt_ids, prompt_text, ids[:room], len(ids) > room, prefix, tokenizer))
    return element


def tokenize_batch_element(prompt: str, generation: str, truncation_mode: str, tokenizer, max_length: int,
                           max_prompt_length: int, prefix: str = TARGET, dataset_name: str = "") -> dict:
    """Tokenises one prompt/response pair; see `tokenize_element` for truncation and the returned keys."""
    return tokenize_element(prompt, {prefix: generation}, truncation_mode, tokenizer, max_length,
                            max_prompt_length, dataset_name)


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

    Keys ending in `_input_ids`, `_attention_mask` or `_labels` become (B, L) LongTensors padded with
    the pad id, 0 or IGNORE_INDEX respectively; keys containing 'prompt' are left-padded (so a
    generation continues right after the prompt), all others right-padded. Every other key becomes a
    list of length B.
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


# ---------------------------------------------------------------------------------------------------
# Items: what a loader flattens its Examples into


class LabelledResponse(NamedTuple):
    """One response with its feedback label (`CHOSEN` = desirable, `REJECTED` = undesirable)."""
    example: Example
    generation: str
    status: str


class PreferencePair(NamedTuple):
    """A preferred and a dispreferred response to the same prompt."""
    example: Example
    chosen: str
    rejected: str


def generation_at(example: Example, index: int, role: str) -> str:
    """`example.generations[index]`, with an error that names the dataset and prompt."""
    if not -len(example.generations) <= index < len(example.generations):
        raise DataError(f"dataset '{example.dataset_name}': {role} index {index} is out of range for the "
                        f"{len(example.generations)} generations of prompt {example.prompt[:60]!r}")
    return example.generations[index]


def binary_labels(example: Example) -> List[Tuple[str, str]]:
    """(generation, status) of every generation of an example with binary feedback."""
    if len(example.desirable) != len(example.generations):
        raise DataError(f"dataset '{example.dataset_name}': prompt {example.prompt[:60]!r} has "
                        f"{len(example.desirable)} desirable flags for {len(example.generations)} generations")
    return [(g, CHOSEN if d else REJECTED) for g, d in zip(example.generations, example.desirable)]


def higher_scores_are_better(example: Example) -> bool:
    """Reads the score direction off the example's pairs (SHP upvotes: higher; OASST ranks: lower)."""
    scores = example.scores
    directions = {scores[i] > scores[j] for i, j in example.pairs if scores[i] != scores[j]}
    if len(directions) != 1:
        problem = "disagree on it" if directions else "are missing or tied"
        raise DataError(f"dataset '{example.dataset_name}': cannot tell whether higher scores are better for prompt "
                        f"{example.prompt[:60]!r}: its pairs {problem}")
    return directions.pop()


def best_and_worst(example: Example) -> Tuple[str, str]:
    """The best- and worst-scored generations of an example."""
    if not example.scores or len(example.scores) != len(example.generations):
        raise DataError(f"dataset '{example.dataset_name}': ScoreUnaryDataLoader needs one score per generation, "
                        f"prompt {example.prompt[:60]!r} has {len(example.scores)} scores for "
                        f"{len(example.generations)} generations")
    indices = range(len(example.generations))
    by_score = example.scores.__getitem__
    best, worst = (max, min) if higher_scores_are_better(example) else (min, max)
    return example.generations[best(indices, key=by_score)], example.generations[worst(indices, key=by_score)]


def kept_count(available: int, fraction: float) -> int:
    """How many of `available` items a kept fraction allows, rounded up as in the original.

    Exact arithmetic on the float's value, so 10 x 0.3 gives 3 (float multiplication gives 3.0000000000000004).
    """
    return math.ceil(Fraction(fraction) * available)


# ---------------------------------------------------------------------------------------------------
# Truncation accounting


class TruncationTally:
    """Counts, over one epoch, how many prompts and responses lost tokens."""

    def __init__(self):
        self.prompts = self.truncated_prompts = self.responses = self.truncated_responses = 0
        self.modes = set()

    def add(self, element: dict, response_prefixes: Sequence[str], truncation_mode: str) -> None:
        self.prompts += 1
        self.truncated_prompts += element[PROMPT_KEYS.truncated]
        self.responses += len(response_prefixes)
        self.truncated_responses += sum(element[response_keys(p).truncated] for p in response_prefixes)
        self.modes.add(truncation_mode)

    def report(self, loader_name: str, max_prompt_length: int, max_length: int) -> None:
        """Logs one warning if anything was truncated."""
        if self.truncated_prompts or self.truncated_responses:
            logger.warning(f"{loader_name}: truncated {self.truncated_prompts}/{self.prompts} prompts to "
                           f"max_prompt_length={max_prompt_length} ({', '.join(sorted(self.modes))}) and "
                           f"{self.truncated_responses}/{self.responses} responses to fit max_length={max_length}")


# ---------------------------------------------------------------------------------------------------
# DataLoaders


def require_positive_int(name: str, value, optional: bool = False) -> None:
    if optional and value is None:
        return
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ValueError(f"{name} must be a positive integer{' or None' if optional else ''}, got {value!r}")


class DataLoader(ABC):
    """Shared batching and epoch logic; subclasses decide what an item is and how it is tokenised.

    Iteration: shuffle the Examples, flatten them into items, then every epoch shuffle the items and
    yield full batches of `batch_size` (a final incomplete batch is dropped), until `n_epochs` epochs
    or `n_examples` examples (rounded up to whole batches), whichever comes first. All randomness
    comes from `random.Random(seed)` created at the start of each iteration.

    Args:
        dataset_names: names with a `get_<name>` function here or an entry in `local_datasets`.
        tokenizer: a Hugging Face tokenizer with `eos_token_id` and `pad_token_id` set.
        split: 'train' or 'test'.
        batch_size: GLOBAL examples per batch (the trainer splits it across ranks).
        max_length: max tokens of prompt + response.
        max_prompt_length: prompt tokens kept when prompt + response exceed `max_length`.
        max_prompt_count: if set, at most this many pairs per prompt (sampled per iteration).
        n_epochs, n_examples: when to stop; at least one is required.
        human_prefix, human_suffix, assistant_prefix, assistant_suffix: prompt formatting.
        seed: seed of the private RNG.
        local_datasets: dataset name -> local path (passed to `get_<name>` as `local_path`, or read by `get_local`).
        frac_unique_desirable, frac_unique_undesirable: kept fractions of chosen / rejected responses
            (unpaired loaders only).
        kl_group_size: unpaired loaders pair each response's prompt with another response of its group of this many
            consecutive examples (a multiple of batch_size; default batch_size): the examples of one optimizer step,
            so that KTO's KL rows do not depend on how the step is split into micro-batches.
        chosen_control_token, rejected_control_token: appended to prompts by the SFT loaders.
    """

    response_prefixes: Tuple[str, ...] = (TARGET,)

    def __init__(self, dataset_names: Sequence[str], tokenizer, split: str = "train", batch_size: int = 1,
                 max_length: int = 512, max_prompt_length: int = 128, max_prompt_count: Optional[int] = None,
                 n_epochs: Optional[int] = None, n_examples: Optional[int] = None,
                 human_prefix: str = "\n<|user|>\n", human_suffix: str = "",
                 assistant_prefix: str = "\n<|assistant|>\n", assistant_suffix: str = "", seed: int = 0,
                 local_datasets: Optional[Mapping[str, str]] = None, *, frac_unique_desirable: float = 1.0,
                 frac_unique_undesirable: float = 1.0, chosen_control_token: Optional[str] = None,
                 rejected_control_token: Optional[str] = None, kl_group_size: Optional[int] = None):
        self.dataset_names = [dataset_names] if isinstance(dataset_names, str) else list(dataset_names)
        self.name = f"{'+'.join(self.dataset_names)}/{split}"
        self.tokenizer = tokenizer
        self.split = split
        self.batch_size = batch_size
        self.max_length = max_length
        self.max_prompt_length = max_prompt_length
        self.max_prompt_count = max_prompt_count
        self.n_epochs = n_epochs
        self.n_examples = n_examples
        self.seed = seed
        self.frac_unique_desirable = frac_unique_desirable
        self.frac_unique_undesirable = frac_unique_undesirable
        self.chosen_control_token = chosen_control_token
        self.rejected_control_token = rejected_control_token
        self.kl_group_size = batch_size if kl_group_size is None else kl_group_size
        self.check_arguments()
        self.examples = load_examples(self.dataset_names, split, human_prefix, human_suffix, assistant_prefix,
                                      assistant_suffix, local_datasets)
        self.batches_per_epoch = self.count_batches_per_epoch()

    def check_arguments(self) -> None:
        """Raises ValueError on arguments that cannot work; subclasses add their own checks."""
        if self.n_epochs is None and self.n_examples is None:
            raise ValueError(f"{self.name}: set n_epochs or n_examples (or both) to say when iteration stops")
        for name in ("batch_size", "max_length", "max_prompt_length"):
            require_positive_int(f"{self.name}: {name}", getattr(self, name))
        for name in ("n_epochs", "n_examples", "max_prompt_count"):
            require_positive_int(f"{self.name}: {name}", getattr(self, name), optional=True)
        if self.max_prompt_length >= self.max_length:
            raise ValueError(f"{self.name}: max_prompt_length={self.max_prompt_length} must be below "
                             f"max_length={self.max_length} so every response keeps at least one token")
        if self.tokenizer.eos_token_id is None or self.tokenizer.pad_token_id is None:
            raise ValueError(f"{self.name}: the tokenizer needs eos_token_id and pad_token_id "
                             f"(set tokenizer.pad_token_id = tokenizer.eos_token_id if it has no pad token)")
        require_positive_int(f"{self.name}: kl_group_size", self.kl_group_size)
        if self.kl_group_size % self.batch_size:
            raise ValueError(f"{self.name}: kl_group_size={self.kl_group_size} must be a multiple of "
                             f"batch_size={self.batch_size}")
        for name in ("frac_unique_desirable", "frac_unique_undesirable"):
            if not 0 <= getattr(self, name) <= 1:
                raise ValueError(f"{self.name}: {name} must lie in [0, 1], got {getattr(self, name)!r}")

    @abstractmethod
    def build_items(self, examples: List[Example], rng: random.Random) -> list:
        """Flattens shuffled Examples into this loader's items (each with an `.example`)."""

    @abstractmethod
    def tokenize_item(self, item) -> dict:
        """One element dict of the batch."""

    def group_batches(self, items: list) -> Iterator[list]:
        """Full batches of consecutive items; a remainder shorter than `batch_size` is dropped."""
        for start in range(0, len(items) - self.batch_size + 1, self.batch_size):
            yield items[start:start + self.batch_size]

    def tokenize_batch(self, items: list, tally: TruncationTally) -> List[dict]:
        """Element dicts of one batch, counting their truncation in `tally`."""
        elements = [self.tokenize_item(item) for item in items]
        for item, element in zip(items, elements):
            tally.add(element, self.response_prefixes, item.example.truncation_mode)
        return elements

    def tokenize(self, prompt: str, responses: Mapping[str, str], example: Example) -> dict:
        return tokenize_element(prompt, responses, example.truncation_mode, self.tokenizer, self.max_length,
                                self.max_prompt_length, example.dataset_name)

    def sampled_pairs(self, example: Example, rng: random.Random) -> list:
        """The example's pairs, at most `max_prompt_count` of them (a random subset)."""
        if self.max_prompt_count and len(example.pairs) > self.max_prompt_count:
            return rng.sample(example.pairs, self.max_prompt_count)
        return example.pairs

    def labelled_responses(self, examples: List[Example], rng: random.Random) -> List[LabelledResponse]:
        """Chosen and rejected responses, example by example.

        An example with binary feedback (`desirable`, which then labels every generation) gives each
        generation once, by its flag; otherwise both sides of every pair give an item (chosen first).
        """
        items = []
        for example in examples:
            if example.desirable:
                items.extend(LabelledResponse(example, g, status) for g, status in binary_labels(example))
                continue
            for i, j in self.sampled_pairs(example, rng):
                items.append(LabelledResponse(example, generation_at(example, i, "pair"), CHOSEN))
                items.append(LabelledResponse(example, generation_at(example, j, "pair"), REJECTED))
        return items

    def examples_with_pairs(self, examples: List[Example]) -> List[Example]:
        """Examples that have pairs (binary-only ones are skipped); DataError if there are none."""
        paired = [example for example in examples if example.pairs]
        if not paired:
            raise DataError(f"{self.name}: paired losses need paired feedback (Example.pairs), but these datasets "
                            f"have none (binary feedback only?); use an unpaired loss such as kto")
        return paired

    def epoch_items(self, rng: random.Random) -> list:
        examples = list(self.examples)
        rng.shuffle(examples)
        return self.build_items(examples, rng)

    def count_batches_per_epoch(self) -> int:
        """Full batches per epoch; the same every epoch, since item counts do not depend on the order."""
        items = self.epoch_items(random.Random(self.seed))
        n_batches = sum(1 for _ in self.group_batches(items))
        if n_batches == 0:
            raise DataError(f"{self.name}: the {len(items)} items built by {type(self).__name__} cannot fill one "
                            f"batch of batch_size={self.batch_size}")
        return n_batches

    @property
    def examples_per_epoch(self) -> int:
        """Examples yielded per full epoch (whole batches only)."""
        return self.batches_per_epoch * self.batch_size

    @property
    def total_examples(self) -> int:
        """Examples the whole iteration yields: the smaller of the n_epochs and n_examples limits."""
        limits = []
        if self.n_epochs is not None:
            limits.append(self.n_epochs * self.examples_per_epoch)
        if self.n_examples is not None:
            limits.append(math.ceil(self.n_examples / self.batch_size) * self.batch_size)
        return min(limits)

    def __iter__(self) -> Iterator[dict]:
        return self.iter_from(0)

    def iter_from(self, start: int) -> Iterator[dict]:
        """The batches of one iteration from batch index `start` on (a resumed run's position).

        The batches before `start` are drawn exactly as in a full iteration, so the RNG stays in step, but never
        tokenised: skipping costs a shuffle per epoch, not a pass over the data.
        """
        rng = random.Random(self.seed)
        items = self.epoch_items(rng)
        batches_left = self.total_examples // self.batch_size
        index = 0
        while batches_left > 0:
            rng.shuffle(items)
            tally = TruncationTally()
            epoch_batches = min(batches_left, self.batches_per_epoch)
            for _, batch_items in zip(range(epoch_batches), self.group_batches(items)):
                if index >= start:
                    yield collate(self.tokenize_batch(batch_items, tally), self.tokenizer.pad_token_id)
                index += 1
            tally.report(self.name, self.max_prompt_length, self.max_length)
            batches_left -= epoch_batches


class SFTDataLoader(DataLoader):
    """sft: one item per prompt, its SFT target `generations[sft_index]` (prompts with sft_index None are skipped).

    With `chosen_control_token` set (sampling from a csft model) the token is appended to every prompt.
    Batch keys: PROMPT_KEYS, TARGET_KEYS, original_prompt.
    """

    def build_items(self, examples: List[Example], rng: random.Random) -> List[LabelledResponse]:
        return [LabelledResponse(example, generation_at(example, example.sft_index, "sft"), CHOSEN)
                for example in examples if example.sft_index is not None]

    def tokenize_item(self, item: LabelledResponse) -> dict:
        prompt = item.example.prompt + (self.chosen_control_token or "")
        element = self.tokenize(prompt, {TARGET: item.generation}, item.example)
        element[ORIGINAL_PROMPT_KEY] = item.example.original_prompt
        return element


class ConditionalSFTDataLoader(DataLoader):
    """csft: every chosen and rejected response, with the matching control token appended to the prompt.

    The token stays in `prompt_input_ids` and `target_combined_input_ids` (masked in `target_labels`).
    Batch keys: PROMPT_KEYS, TARGET_KEYS, status.
    """

    def check_arguments(self) -> None:
        super().check_arguments()
        if not (self.chosen_control_token and self.rejected_control_token):
            raise ValueError(f"{self.name}: ConditionalSFTDataLoader needs chosen_control_token and "
                             f"rejected_control_token (set them in the csft loss config)")

    def build_items(self, examples: List[Example], rng: random.Random) -> List[LabelledResponse]:
        return self.labelled_responses(examples, rng)

    def tokenize_item(self, item: LabelledResponse) -> dict:
        token = self.chosen_control_token if item.status == CHOSEN else self.rejected_control_token
        element = self.tokenize(item.example.prompt + token, {TARGET: item.generation}, item.example)
        element[STATUS_KEY] = item.status
        return element


class SimpleKTODataLoader(DataLoader):
    """kto-simple: chosen and rejected responses interleaved [c, r, c, r, ...] in every batch.

    Batch keys: PROMPT_KEYS, TARGET_KEYS, status.
    """

    def check_arguments(self) -> None:
        super().check_arguments()
        if self.batch_size % 2:
            raise ValueError(f"{self.name}: SimpleKTODataLoader needs an even batch_size (half chosen, half "
                             f"rejected), got {self.batch_size}")

    def build_items(self, examples: List[Example], rng: random.Random) -> List[LabelledResponse]:
        return self.labelled_responses(examples, rng)

    def group_batches(self, items: List[LabelledResponse]) -> Iterator[List[LabelledResponse]]:
        """Fills a batch as soon as batch_size/2 chosen and batch_size/2 rejected items have been seen."""
        half = self.batch_size // 2
        queues = {CHOSEN: deque(), REJECTED: deque()}
        for item in items:
            queues[item.status].append(item)
            if all(len(queue) >= half for queue in queues.values()):
                yield [queues[status].popleft() for _ in range(half) for status in (CHOSEN, REJECTED)]

    def tokenize_item(self, item: LabelledResponse) -> dict:
        element = self.tokenize(item.example.prompt, {TARGET: item.generation}, item.example)
        element[STATUS_KEY] = item.status
        return element


class UnpairedPreferenceDataLoader(DataLoader):
    """kto, kto-zero, ppo: chosen and rejected responses in random order, each with a mismatched KL pair.

    Items come from `labelled_responses` (pair sides, or binary-feedback flags). Only the first
    ceil(frac_unique_desirable x #chosen) chosen and ceil(frac_unique_undesirable x #rejected)
    rejected responses in shuffled-prompt order are kept, as in the original: so a prompt may keep its
    chosen response but lose its rejected one (F-20).

    Element k of a group of `kl_group_size` consecutive elements (the global batch, or all batches of
    one optimizer step) also gets `KL_*` keys: prompt k with the response of element (k+1) mod G, the
    mismatched pairs of KTO's reference point. Their truncation is not counted in the epoch warning
    (they recombine the same prompts and responses).
    Batch keys: PROMPT_KEYS, TARGET_KEYS, KL_KEYS, status, truncation_mode.
    """

    def build_items(self, examples: List[Example], rng: random.Random) -> List[LabelledResponse]:
        candidates = self.labelled_responses(examples, rng)
        available = Counter(item.status for item in candidates)
        allowed = {CHOSEN: kept_count(available[CHOSEN], self.frac_unique_desirable),
                   REJECTED: kept_count(available[REJECTED], self.frac_unique_undesirable)}
        taken = Counter()
        kept = []
        for item in candidates:
            if taken[item.status] < allowed[item.status]:
                taken[item.status] += 1
                kept.append(item)
        return kept

    def tokenize_item(self, item: LabelledResponse) -> dict:
        element = self.tokenize(item.example.prompt, {TARGET: item.generation}, item.example)
        element[STATUS_KEY] = item.status
        element[TRUNCATION_MODE_KEY] = item.example.truncation_mode
        return element

    def group_batches(self, items: List[LabelledResponse]) -> Iterator[List[Tuple[LabelledResponse, str]]]:
        """Full batches of (item, mismatched response) pairs, the response taken from the item's KL group."""
        usable = items[:len(items) - len(items) % self.batch_size]
        mismatched = []
        for start in range(0, len(usable), self.kl_group_size):
            group = usable[start:start + self.kl_group_size]
            mismatched += [group[(k + 1) % len(group)].generation for k in range(len(group))]
        paired = list(zip(usable, mismatched))
        for start in range(0, len(paired), self.batch_size):
            yield paired[start:start + self.batch_size]

    def tokenize_batch(self, items: List[Tuple[LabelledResponse, str]], tally: TruncationTally) -> List[dict]:
        elements = super().tokenize_batch([item for item, _ in items], tally)
        for (item, kl_response), element in zip(items, elements):
            kl_element = self.tokenize(item.example.prompt, {KL: kl_response}, item.example)
            element.update({key: kl_element[key] for key in KL_KEYS})
        return elements


class ScoreUnaryDataLoader(UnpairedPreferenceDataLoader):
    """One response per prompt, alternating the best-scored (chosen) and worst-scored (rejected) response.

    Whether higher scores are better is read off each example's pairs, so SHP upvotes and OASST ranks
    both work; examples without scores or pairs raise DataError (the original assumed "lower is
    better" and crashed without scores, F-21).
    """

    def build_items(self, examples: List[Example], rng: random.Random) -> List[LabelledResponse]:
        items = []
        for k, example in enumerate(examples):
            best, worst = best_and_worst(example)
            items.append(LabelledResponse(example, best, CHOSEN) if k % 2 == 0
                         else LabelledResponse(example, worst, REJECTED))
        return items


class PrefUnaryDataLoader(UnpairedPreferenceDataLoader):
    """One response per prompt from its first pair, alternating its chosen and its rejected side."""

    def build_items(self, examples: List[Example], rng: random.Random) -> List[LabelledResponse]:
        items = []
        for k, example in enumerate(self.examples_with_pairs(examples)):
            i, j = example.pairs[0]
            items.append(LabelledResponse(example, generation_at(example, i, "pair"), CHOSEN) if k % 2 == 0
                         else LabelledResponse(example, generation_at(example, j, "pair"), REJECTED))
        return items


class PairedPreferenceDataLoader(DataLoader):
    """dpo, cdpo, slic: one item per preference pair; chosen and rejected share the same prompt ids.

    Examples with binary feedback only are skipped. Batch keys: PROMPT_KEYS, CHOSEN_KEYS, REJECTED_KEYS.
    """

    response_prefixes = (CHOSEN, REJECTED)

    def build_items(self, examples: List[Example], rng: random.Random) -> List[PreferencePair]:
        return [PreferencePair(example, generation_at(example, i, "pair"), generation_at(example, j, "pair"))
                for example in self.examples_with_pairs(examples) for i, j in self.sampled_pairs(example, rng)]

    def tokenize_item(self, item: PreferencePair) -> dict:
        return self.tokenize(item.example.prompt, {CHOSEN: item.chosen, REJECTED: item.rejected}, item.example)
