"""Tokenised, padded batches for every HALOs loss.

A DataLoader loads its feedback datasets once (`DataSpec`: names, prompt format, local paths, named sources,
mixing weights and caps), renders and tokenises every Example it can use (feedback/tokenization.py), flattens them
into the items its loss needs (one SFT target per prompt, chosen/rejected responses, preference pairs ...), reports what it
read, dropped and truncated (`loader.report`), and yields collated GLOBAL batches of exactly
`options.batch_size` examples; the trainer slices them per rank.

Add a dataset by defining `get_<name>(split)` (conversational Examples, see feedback_datasets.py) or the original's
`get_<name>(split, human_prefix, human_suffix, assistant_prefix, assistant_suffix)` (formatted Examples) in this
module, or anywhere and name it by dotted path (`datasets=[mypkg.mydata.get_mydata]`); or name a hub dataset or
local file in config (`dataset_sources.<name>`, `local_datasets.<name>`).

Differences from the original:
- Token ids are concatenated directly (prompt ids + response ids + EOS id) instead of decoding to text and
  re-encoding. So CSFT control tokens stay in the input ids (F-01); there is no ' ' before EOS and no double space
  in KL responses (F-10); the combined length never exceeds `max_length`; and the label mask boundary is exact.
- `keep_end` prompt truncation keeps a leading BOS token; a response truncated to fit `max_length` has no EOS.
- Truncation and filtering are never silent: the report at start counts them per dataset.
- The paired loader truncates the prompt once for both responses, so chosen and rejected share the same prompt
  ids (F-11). Examples from different datasets with the same prompt are all kept (F-28).
- All randomness comes from a private `random.Random(seed)` created per iteration: iterating twice gives identical
  batches, independent of the global RNG (spec 2.4).
- A loader whose items cannot fill one batch raises DataError instead of looping forever (F-09), and every batch
  has exactly `batch_size` examples (`SimpleKTODataLoader` requires an even batch size).
- `max_prompt_count` samples pairs per iteration without mutating the Examples.
- `ScoreUnaryDataLoader` reads the score direction off each example's pairs and rejects examples without scores
  (F-21). Binary feedback (`Example.desirable`) feeds the csft, kto-simple and unpaired loaders.
- Unknown options raise TypeError; `frac_unique_*` must lie in [0, 1] and the kept counts are computed exactly
  (10 x 0.3 keeps 3, not 4).
"""
import importlib
import inspect
import math
import random
from abc import ABC, abstractmethod
from collections import Counter, deque
from dataclasses import dataclass, field
from typing import Callable, Dict, Iterator, List, Mapping, Optional, Sequence, Tuple, Union

import numpy as np

from feedback.examples import DataError, Dataset, Example
from feedback.report import DataReport, ItemLengths, SourceCounts, build_report
from feedback.sources import SourceSpec
# The get_<name> functions are imported so that dataset_functions() finds them next to users' own ones.
from feedback.items import (GROUP_KEYS, PROMPT_MESSAGES_KEY, ItemParts, LabelledResponse,  # noqa: F401
                            PreferencePair, ScoredResponse, best_and_worst, binary_labels, checked_index, kept_count,
                            scored_responses)
from feedback.mixing import Mixture
from feedback.prompt_format import PrefixFormat, PromptFormat
from feedback.rows import load_source
from feedback_datasets import (get_alpacaeval, get_hh, get_hh_harmless, get_hh_helpful, get_oasst,  # noqa: F401
                               get_shp, get_ultrabin, get_ultrachat, get_ultrafeedback, get_ultrafeedback_armorm)
# The batch keys and collate are imported from here by trainers, sampling and users' code.
from feedback.tokenization import (CHOSEN, CHOSEN_KEYS, KL, KL_KEYS, ORIGINAL_PROMPT_KEY, PROMPT_KEYS,  # noqa: F401
                          REJECTED, REJECTED_KEYS, STATUS_KEY, TARGET, TARGET_KEYS, TRUNCATION_MODE_KEY,
                          EncodedExample, Encoder, collate)
from utils import IGNORE_INDEX

ORIGINAL_CONTRACT_ARGUMENTS = 5  # get_<name>(split, human_prefix, human_suffix, assistant_prefix, assistant_suffix)


@dataclass
class DataSpec:
    """Which data a loader reads and how its text is formatted.

    Attributes:
        names: dataset names: a `get_<name>` function of this module, a dotted path to a function, or a name in
            `sources` / `local_paths`.
        prompt_format: the four prefix strings (default) or a chat template (feedback/prompt_format.py).
        local_paths: name -> local mirror passed to its function as `local_path`, or, for a name without one, a
            local file or directory read as a named source.
        sources: name -> SourceSpec of a dataset read without code (hub id or local files, column mapping).
        weights: name -> mixing weight (feedback/mixing.py); empty: every item once per epoch.
        max_examples: name -> at most this many of its items.
    """
    names: Sequence[str]
    prompt_format: PromptFormat = field(default_factory=PrefixFormat)
    local_paths: Mapping[str, str] = field(default_factory=dict)
    sources: Mapping[str, SourceSpec] = field(default_factory=dict)
    weights: Mapping[str, float] = field(default_factory=dict)
    max_examples: Mapping[str, int] = field(default_factory=dict)

    def __post_init__(self):
        self.names = [self.names] if isinstance(self.names, str) else list(self.names)


@dataclass(frozen=True)
class LoaderOptions:
    """How a loader batches: sizes, length limits, when iteration stops, its seed, and loss-specific choices.

    Attributes:
        batch_size: GLOBAL examples per batch (the trainer splits it across ranks).
        max_length: max tokens of prompt + response.
        max_prompt_length: prompt tokens kept when prompt + response exceed `max_length`.
        n_epochs, n_examples: when to stop; at least one is required.
        seed: seed of the private RNG.
        max_prompt_count: if set, at most this many pairs per prompt (sampled per iteration).
        frac_unique_desirable, frac_unique_undesirable: kept fractions of chosen / rejected responses (unpaired
            loaders only).
        chosen_control_token, rejected_control_token: appended to prompts by the SFT loaders.
        sft_all_assistant_turns: the SFT loss also covers the prompt's own assistant turns (SFTDataLoader only).
        kl_group_size: unpaired loaders pair each response's prompt with another response of its group of this many
            consecutive examples (a multiple of batch_size; None: batch_size): the examples of one optimizer step,
            so that KTO's KL rows do not depend on how the step is split into micro-batches.
    """
    batch_size: int = 1
    max_length: int = 512
    max_prompt_length: int = 128
    n_epochs: Optional[int] = None
    n_examples: Optional[int] = None
    seed: int = 0
    max_prompt_count: Optional[int] = None
    frac_unique_desirable: float = 1.0
    frac_unique_undesirable: float = 1.0
    chosen_control_token: Optional[str] = None
    rejected_control_token: Optional[str] = None
    sft_all_assistant_turns: bool = False
    kl_group_size: Optional[int] = None


# ---------------------------------------------------------------------------------------------------
# Loading datasets


def dataset_functions() -> Dict[str, Callable]:
    """Dataset name -> its `get_<name>` function in this module."""
    return {attr[len("get_"):]: value for attr, value in globals().items()
            if attr.startswith("get_") and callable(value)}


def dataset_function(name: str) -> Optional[Callable]:
    """The loader function of a dataset name: `get_<name>` here, or a dotted path `package.module.function`."""
    functions = dataset_functions()
    if name in functions or "." not in name:
        return functions.get(name)
    module_name, _, attribute = name.rpartition(".")
    try:
        module = importlib.import_module(module_name)
    except ImportError as err:
        raise DataError(f"dataset '{name}': cannot import module '{module_name}' ({err})") from None
    function = getattr(module, attribute, None)
    if not callable(function):
        raise DataError(f"dataset '{name}': '{attribute}' is not a function in {module_name}")
    return function


def required_positional(function: Callable) -> int:
    return sum(1 for p in inspect.signature(function).parameters.values()
               if p.default is inspect.Parameter.empty and p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD))


def accepts_local_path(function: Callable) -> bool:
    parameters = inspect.signature(function).parameters.values()
    return any(p.name == "local_path" or p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters)


def call_dataset_function(name: str, function: Callable, split: str, spec: DataSpec) -> Dataset:
    """Calls a loader function in whichever contract it follows: `(split)` or the original's five arguments."""
    arguments = [split]
    if required_positional(function) == ORIGINAL_CONTRACT_ARGUMENTS:
        if not isinstance(spec.prompt_format, PrefixFormat):
            raise DataError(f"dataset '{name}': its function formats prompts itself with the four prefix strings, "
                            f"so it cannot use {spec.prompt_format.name}; make it return conversational Examples "
                            f"(README: Adding a dataset) or set ++model.chat_template=null")
        arguments += spec.prompt_format.strings
    elif required_positional(function) != 1:
        raise DataError(f"dataset '{name}': its function must take (split) or the original's (split, human_prefix, "
                        f"human_suffix, assistant_prefix, assistant_suffix)")
    local_path = spec.local_paths.get(name)
    if local_path is None:
        return function(*arguments)
    if not accepts_local_path(function):
        raise DataError(f"dataset '{name}': local_datasets.{name} is set, but its function takes no local_path "
                        f"argument")
    return function(*arguments, local_path=local_path)


def load_dataset(name: str, split: str, spec: DataSpec) -> Dataset:
    """One dataset of a DataSpec, its Examples tagged with `source = name`."""
    function = dataset_function(name)
    if function is not None:
        dataset = call_dataset_function(name, function, split, spec)
        if not isinstance(dataset, Dataset):
            raise DataError(f"dataset '{name}': its function must return a Dataset, got {type(dataset).__name__}")
    elif name in spec.sources:
        dataset = load_source(spec.sources[name], split)
    elif spec.local_paths.get(name) is not None:
        dataset = load_source(SourceSpec(name, str(spec.local_paths[name]), key=f"local_datasets.{name}"), split)
    else:
        known = set(dataset_functions()) | set(spec.sources) | set(spec.local_paths)
        raise DataError(f"unknown dataset '{name}': define get_{name} in dataloader.py, name a function by dotted "
                        f"path, or set dataset_sources.{name} or local_datasets.{name}; available: "
                        f"{', '.join(sorted(known))}")
    for example in dataset.data.values():
        example.source = name
    return dataset


def load_examples(spec: DataSpec, split: str) -> List[Example]:
    """All Examples of a DataSpec's datasets, in dataset order (a prompt in several datasets is kept in each)."""
    return [example for name in spec.names for example in load_dataset(name, split, spec).data.values()]


# ---------------------------------------------------------------------------------------------------
# DataLoaders


def require_positive_int(name: str, value, optional: bool = False) -> None:
    if optional and value is None:
        return
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ValueError(f"{name} must be a positive integer{' or None' if optional else ''}, got {value!r}")


class DataLoader(ABC):
    """Shared loading, batching and epoch logic; subclasses decide what an item is and what its element holds.

    Iteration: shuffle the Examples, flatten them into items, then every epoch shuffle the items (or, with mixing
    weights or caps, draw the epoch's mix, feedback/mixing.py) and yield full batches of `batch_size` (a final incomplete
    batch is dropped), until `n_epochs` epochs or `n_examples` examples (rounded up to whole batches), whichever
    comes first. All randomness comes from `random.Random(seed)` created at the start of each iteration.

    Args:
        data: a DataSpec, or just dataset names (prefix format, no local paths).
        tokenizer: a Hugging Face tokenizer with `eos_token_id` and `pad_token_id` set.
        split: 'train' or 'test'.
        options: LoaderOptions.
    """

    labels_prompt_turns = False  # whether sft_all_assistant_turns applies to this loader

    def __init__(self, data: Union[DataSpec, Sequence[str]], tokenizer, split: str = "train",
                 options: LoaderOptions = LoaderOptions()):
        self.data = data if isinstance(data, DataSpec) else DataSpec(data)
        self.tokenizer, self.split, self.options = tokenizer, split, options
        self.name = f"{'+'.join(self.data.names)}/{split}"
        self.mixture = Mixture(self.data.names, self.data.weights, self.data.max_examples)
        self.check_arguments()
        datasets = [(name, load_dataset(name, split, self.data)) for name in self.data.names]
        self.examples = [example for _, dataset in datasets for example in dataset.data.values()]
        self.encoder = Encoder(tokenizer, self.data.prompt_format, options.max_length, options.max_prompt_length)
        self.encoded = self.encoder.encode(self.examples, self.generation_indices,
                                           options.sft_all_assistant_turns and self.labels_prompt_turns,
                                           desc=f"tokenising {self.name}")
        self.batches_per_epoch = self.count_batches_per_epoch()
        self.report = self.build_report(datasets)

    def check_arguments(self) -> None:
        """Raises ValueError on options that cannot work; subclasses add their own checks."""
        options = self.options
        if options.n_epochs is None and options.n_examples is None:
            raise ValueError(f"{self.name}: set n_epochs or n_examples (or both) to say when iteration stops")
        for name in ("batch_size", "max_length", "max_prompt_length"):
            require_positive_int(f"{self.name}: {name}", getattr(options, name))
        for name in ("n_epochs", "n_examples", "max_prompt_count", "kl_group_size"):
            require_positive_int(f"{self.name}: {name}", getattr(options, name), optional=True)
        if options.kl_group_size is not None and options.kl_group_size % options.batch_size:
            raise ValueError(f"{self.name}: kl_group_size={options.kl_group_size} must be a multiple of "
                             f"batch_size={options.batch_size}")
        if options.max_prompt_length >= options.max_length:
            raise ValueError(f"{self.name}: max_prompt_length={options.max_prompt_length} must be below "
                             f"max_length={options.max_length} so every response keeps at least one token")
        if self.tokenizer.eos_token_id is None or self.tokenizer.pad_token_id is None:
            raise ValueError(f"{self.name}: the tokenizer needs eos_token_id and pad_token_id "
                             f"(set tokenizer.pad_token_id = tokenizer.eos_token_id if it has no pad token)")
        for name in ("frac_unique_desirable", "frac_unique_undesirable"):
            if not 0 <= getattr(options, name) <= 1:
                raise ValueError(f"{self.name}: {name} must lie in [0, 1], got {getattr(options, name)!r}")
        if options.sft_all_assistant_turns and not self.labels_prompt_turns:
            raise ValueError(f"{self.name}: sft_all_assistant_turns applies to SFTDataLoader only, not "
                             f"{type(self).__name__}")

    def generation_indices(self, example: Example) -> Sequence[int]:
        """The generations of an Example this loader may use (and so tokenises): all of them by default."""
        return range(example.num_generations())

    @abstractmethod
    def build_items(self, encoded: List[EncodedExample], rng: random.Random) -> list:
        """Flattens shuffled Examples into this loader's items (each with an `.example`)."""

    @abstractmethod
    def item_parts(self, item) -> ItemParts:
        """The token ids of an item's element: its prompt (+ control token) and responses by prefix."""

    def extra_fields(self, item) -> dict:
        """Non-tensor keys an item adds to its element (status, ...)."""
        return {}

    def element(self, parts: ItemParts) -> dict:
        encoded = parts.encoded
        labels = None if encoded.prompt_labels is None \
            else encoded.prompt_labels.tolist() + [IGNORE_INDEX] * len(parts.control_ids)
        return self.encoder.element(encoded.prompt_ids.tolist() + list(parts.control_ids), labels,
                                    {prefix: ids.tolist() for prefix, ids in parts.responses.items()},
                                    encoded.example.truncation_mode, encoded.example.describe)

    def batch_elements(self, items: list) -> List[dict]:
        """The element dicts of one batch."""
        return [{**self.element(self.item_parts(item)), **self.extra_fields(item)} for item in items]

    def group_batches(self, items: list) -> Iterator[list]:
        """Full batches of consecutive items; a remainder shorter than `batch_size` is dropped."""
        size = self.options.batch_size
        for start in range(0, len(items) - size + 1, size):
            yield items[start:start + size]

    def control_ids(self, token: Optional[str]) -> Tuple[int, ...]:
        return tuple(self.tokenizer(token, add_special_tokens=False)["input_ids"]) if token else ()

    def sampled_pairs(self, example: Example, rng: random.Random) -> list:
        """The example's pairs, at most `max_prompt_count` of them (a random subset)."""
        limit = self.options.max_prompt_count
        if limit and len(example.pairs) > limit:
            return rng.sample(example.pairs, limit)
        return example.pairs

    def labelled_responses(self, encoded: List[EncodedExample], rng: random.Random) -> List[LabelledResponse]:
        """Chosen and rejected responses, example by example.

        An example with binary feedback (`desirable`, which then labels every generation) gives each generation
        once, by its flag; otherwise both sides of every pair give an item (chosen first).
        """
        items = []
        for item in encoded:
            example = item.example
            if example.desirable:
                items.extend(LabelledResponse(item, index, status) for index, status in binary_labels(example))
                continue
            for i, j in self.sampled_pairs(example, rng):
                items.append(LabelledResponse(item, checked_index(example, i, "pair"), CHOSEN))
                items.append(LabelledResponse(item, checked_index(example, j, "pair"), REJECTED))
        return items

    def with_pairs(self, encoded: List[EncodedExample]) -> List[EncodedExample]:
        """Examples that have pairs (binary-only ones are skipped); DataError if there are none."""
        paired = [item for item in encoded if item.example.pairs]
        if not paired:
            raise DataError(f"{self.name}: paired losses need paired feedback (Example.pairs), but these datasets "
                            f"have none (binary feedback only?); use an unpaired loss such as kto")
        return paired

    def epoch_items(self, rng: random.Random) -> list:
        encoded = list(self.encoded)
        rng.shuffle(encoded)
        return self.build_items(encoded, rng)

    def first_epoch(self) -> Tuple[list, Optional[Dict[str, list]]]:
        """The items of an iteration's start and, when mixing, each dataset's pool (after its cap)."""
        items = self.epoch_items(random.Random(self.options.seed))
        return items, self.mixture.pools(items) if self.mixture.active else None

    def count_batches_per_epoch(self) -> int:
        """Full batches per epoch; the same every epoch, since item counts do not depend on the order."""
        items, pools = self.first_epoch()
        if pools is not None:
            items = self.mixture.draw(pools, random.Random(self.options.seed))
        n_batches = sum(1 for _ in self.group_batches(items))
        if n_batches == 0:
            raise DataError(f"{self.name}: the {len(items)} items built by {type(self).__name__} cannot fill one "
                            f"batch of batch_size={self.options.batch_size}")
        return n_batches

    def build_report(self, datasets: List[Tuple[str, Dataset]]) -> DataReport:
        """The start-of-run table (feedback/report.py); also checks every item fits max_length (DataError if not)."""
        items, pools = self.first_epoch()
        lengths = [self.item_lengths(item) for item in items]
        counts = [SourceCounts(name, dataset.rows_read, dataset.dropped, len(dataset)) for name, dataset in datasets]
        pool_sizes = {name: len(pool) for name, pool in (pools or {}).items()}
        title = (f"data {self.name}: {type(self).__name__}, prompts formatted with {self.data.prompt_format.name}; "
                 f"{self.examples_per_epoch} items per epoch = {self.batches_per_epoch} batches of "
                 f"{self.options.batch_size}")
        return build_report(title, counts, lengths, pool_sizes, self.mixture.shares(pool_sizes) if pools else {},
                            self.options.max_length, self.options.max_prompt_length)

    def item_lengths(self, item) -> ItemLengths:
        parts = self.item_parts(item)
        prompt = len(parts.encoded.prompt_ids) + len(parts.control_ids)
        responses = tuple(len(ids) for ids in parts.responses.values())
        kept, cut = self.encoder.fit(prompt, responses, parts.encoded.example.describe)
        identical = CHOSEN in parts.responses and REJECTED in parts.responses \
            and np.array_equal(parts.responses[CHOSEN], parts.responses[REJECTED])
        return ItemLengths(item.example.source, prompt, responses, cut,
                           sum(length > self.options.max_length - kept for length in responses), identical)

    @property
    def examples_per_epoch(self) -> int:
        """Examples yielded per full epoch (whole batches only)."""
        return self.batches_per_epoch * self.options.batch_size

    @property
    def total_examples(self) -> int:
        """Examples the whole iteration yields: the smaller of the n_epochs and n_examples limits."""
        limits = []
        if self.options.n_epochs is not None:
            limits.append(self.options.n_epochs * self.examples_per_epoch)
        if self.options.n_examples is not None:
            limits.append(math.ceil(self.options.n_examples / self.options.batch_size) * self.options.batch_size)
        return min(limits)

    def __iter__(self) -> Iterator[dict]:
        return self.iter_from(0)

    def iter_from(self, start: int) -> Iterator[dict]:
        """The batches of one iteration from batch index `start` on (a resumed run's position).

        The batches before `start` are drawn exactly as in a full iteration, so the RNG stays in step, but never
        built: skipping costs a shuffle (or a mix) per epoch, not a pass over the data.
        """
        rng = random.Random(self.options.seed)
        items = self.epoch_items(rng)
        pools = self.mixture.pools(items) if self.mixture.active else None
        batches_left = self.total_examples // self.options.batch_size
        index = 0
        while batches_left > 0:
            if pools is None:
                rng.shuffle(items)
            else:
                items = self.mixture.draw(pools, rng)
            epoch_batches = min(batches_left, self.batches_per_epoch)
            for _, batch_items in zip(range(epoch_batches), self.group_batches(items)):
                if index >= start:
                    yield collate(self.batch_elements(batch_items), self.tokenizer.pad_token_id)
                index += 1
            batches_left -= epoch_batches


class SFTDataLoader(DataLoader):
    """sft: one item per prompt, its SFT target `generations[sft_index]` (prompts with sft_index None are skipped).

    With `chosen_control_token` set (sampling from a csft model) the token is appended to every prompt. With
    `sft_all_assistant_turns`, the prompt's own assistant turns are labelled too.
    Batch keys: PROMPT_KEYS, TARGET_KEYS, original_prompt, prompt_messages (empty for formatted Examples).
    """

    labels_prompt_turns = True

    def generation_indices(self, example: Example) -> Sequence[int]:
        return [] if example.sft_index is None else [checked_index(example, example.sft_index, "sft")]

    def build_items(self, encoded: List[EncodedExample], rng: random.Random) -> List[LabelledResponse]:
        return [LabelledResponse(item, checked_index(item.example, item.example.sft_index, "sft"), CHOSEN)
                for item in encoded if item.example.sft_index is not None]

    def item_parts(self, item: LabelledResponse) -> ItemParts:
        return ItemParts(item.encoded, self.control_ids(self.options.chosen_control_token),
                         {TARGET: item.encoded.responses[item.index]})

    def extra_fields(self, item: LabelledResponse) -> dict:
        return {ORIGINAL_PROMPT_KEY: item.example.original_prompt,
                PROMPT_MESSAGES_KEY: [message._asdict() for message in item.example.prompt_messages]}


class ConditionalSFTDataLoader(DataLoader):
    """csft: every chosen and rejected response, with the matching control token appended to the prompt.

    The token stays in `prompt_input_ids` and `target_combined_input_ids` (masked in `target_labels`).
    Batch keys: PROMPT_KEYS, TARGET_KEYS, status.
    """

    def check_arguments(self) -> None:
        super().check_arguments()
        if not (self.options.chosen_control_token and self.options.rejected_control_token):
            raise ValueError(f"{self.name}: ConditionalSFTDataLoader needs chosen_control_token and "
                             f"rejected_control_token (set them in the csft loss config)")

    def build_items(self, encoded: List[EncodedExample], rng: random.Random) -> List[LabelledResponse]:
        return self.labelled_responses(encoded, rng)

    def item_parts(self, item: LabelledResponse) -> ItemParts:
        token = self.options.chosen_control_token if item.status == CHOSEN else self.options.rejected_control_token
        return ItemParts(item.encoded, self.control_ids(token), {TARGET: item.encoded.responses[item.index]})

    def extra_fields(self, item: LabelledResponse) -> dict:
        return {STATUS_KEY: item.status}


class SimpleKTODataLoader(DataLoader):
    """kto-simple: chosen and rejected responses interleaved [c, r, c, r, ...] in every batch.

    Batch keys: PROMPT_KEYS, TARGET_KEYS, status.
    """

    def check_arguments(self) -> None:
        super().check_arguments()
        if self.options.batch_size % 2:
            raise ValueError(f"{self.name}: SimpleKTODataLoader needs an even batch_size (half chosen, half "
                             f"rejected), got {self.options.batch_size}")
        if self.mixture.weights:
            raise ValueError(f"{self.name}: SimpleKTODataLoader pairs chosen and rejected items one for one, and "
                             f"mixing weights would change their counts from epoch to epoch; use dataset_max_examples")

    def build_items(self, encoded: List[EncodedExample], rng: random.Random) -> List[LabelledResponse]:
        return self.labelled_responses(encoded, rng)

    def group_batches(self, items: List[LabelledResponse]) -> Iterator[List[LabelledResponse]]:
        """Fills a batch as soon as batch_size/2 chosen and batch_size/2 rejected items have been seen."""
        half = self.options.batch_size // 2
        queues = {CHOSEN: deque(), REJECTED: deque()}
        for item in items:
            queues[item.status].append(item)
            if all(len(queue) >= half for queue in queues.values()):
                yield [queues[status].popleft() for _ in range(half) for status in (CHOSEN, REJECTED)]

    def item_parts(self, item: LabelledResponse) -> ItemParts:
        return ItemParts(item.encoded, (), {TARGET: item.encoded.responses[item.index]})

    def extra_fields(self, item: LabelledResponse) -> dict:
        return {STATUS_KEY: item.status}


class UnpairedPreferenceDataLoader(DataLoader):
    """kto, kto-zero, ppo: chosen and rejected responses in random order, each with a mismatched KL pair.

    Items come from `labelled_responses` (pair sides, or binary-feedback flags). Only the first
    ceil(frac_unique_desirable x #chosen) chosen and ceil(frac_unique_undesirable x #rejected) rejected responses in
    shuffled-prompt order are kept, as in the original: so a prompt may keep its chosen response but lose its
    rejected one (F-20).

    Element k of a group of `kl_group_size` consecutive elements (the GLOBAL batch, or all batches of one optimizer
    step) also gets `KL_*` keys: prompt k with the response of element (k+1) mod G, the mismatched pairs of KTO's
    reference point. Their truncation is not counted in the report (they recombine the same prompts and responses).
    Batch keys: PROMPT_KEYS, TARGET_KEYS, KL_KEYS, status, truncation_mode.
    """

    def build_items(self, encoded: List[EncodedExample], rng: random.Random) -> List[LabelledResponse]:
        candidates = self.labelled_responses(encoded, rng)
        available = Counter(item.status for item in candidates)
        allowed = {CHOSEN: kept_count(available[CHOSEN], self.options.frac_unique_desirable),
                   REJECTED: kept_count(available[REJECTED], self.options.frac_unique_undesirable)}
        taken = Counter()
        kept = []
        for item in candidates:
            if taken[item.status] < allowed[item.status]:
                taken[item.status] += 1
                kept.append(item)
        return kept

    def item_parts(self, item: LabelledResponse) -> ItemParts:
        return ItemParts(item.encoded, (), {TARGET: item.encoded.responses[item.index]})

    def extra_fields(self, item: LabelledResponse) -> dict:
        return {STATUS_KEY: item.status, TRUNCATION_MODE_KEY: item.example.truncation_mode}

    def group_batches(self, items: List[LabelledResponse]) -> Iterator[List[Tuple[LabelledResponse, LabelledResponse]]]:
        """Full batches of (item, item whose response makes its KL row) pairs, the second from the first's KL group."""
        size = self.options.batch_size
        usable = items[:len(items) - len(items) % size]
        group_size = self.options.kl_group_size or size
        mismatched = []
        for start in range(0, len(usable), group_size):
            group = usable[start:start + group_size]
            mismatched += [group[(k + 1) % len(group)] for k in range(len(group))]
        paired = list(zip(usable, mismatched))
        for start in range(0, len(paired), size):
            yield paired[start:start + size]

    def batch_elements(self, pairs: List[Tuple[LabelledResponse, LabelledResponse]]) -> List[dict]:
        elements = super().batch_elements([item for item, _ in pairs])
        for (item, mismatched), element in zip(pairs, elements):
            kl_element = self.element(ItemParts(item.encoded, (), {KL: mismatched.encoded.responses[mismatched.index]}))
            element.update({key: kl_element[key] for key in KL_KEYS})
        return elements


class ScoreUnaryDataLoader(UnpairedPreferenceDataLoader):
    """One response per prompt, alternating the best-scored (chosen) and worst-scored (rejected) response.

    Whether higher scores are better is read off each example's pairs, so SHP upvotes and OASST ranks both work;
    examples without scores or pairs raise DataError (the original assumed "lower is better" and crashed without
    scores, F-21).
    """

    def build_items(self, encoded: List[EncodedExample], rng: random.Random) -> List[LabelledResponse]:
        items = []
        for k, item in enumerate(encoded):
            best, worst = best_and_worst(item.example)
            items.append(LabelledResponse(item, best, CHOSEN) if k % 2 == 0 else LabelledResponse(item, worst, REJECTED))
        return items


class PrefUnaryDataLoader(UnpairedPreferenceDataLoader):
    """One response per prompt from its first pair, alternating its chosen and its rejected side."""

    def build_items(self, encoded: List[EncodedExample], rng: random.Random) -> List[LabelledResponse]:
        items = []
        for k, item in enumerate(self.with_pairs(encoded)):
            i, j = item.example.pairs[0]
            items.append(LabelledResponse(item, checked_index(item.example, i, "pair"), CHOSEN) if k % 2 == 0
                         else LabelledResponse(item, checked_index(item.example, j, "pair"), REJECTED))
        return items


class PairedPreferenceDataLoader(DataLoader):
    """dpo, cdpo, slic: one item per preference pair; chosen and rejected share the same prompt ids.

    Examples with binary feedback only are skipped. Batch keys: PROMPT_KEYS, CHOSEN_KEYS, REJECTED_KEYS.
    """

    def build_items(self, encoded: List[EncodedExample], rng: random.Random) -> List[PreferencePair]:
        return [PreferencePair(item, checked_index(item.example, i, "pair"), checked_index(item.example, j, "pair"))
                for item in self.with_pairs(encoded) for i, j in self.sampled_pairs(item.example, rng)]

    def item_parts(self, item: PreferencePair) -> ItemParts:
        return ItemParts(item.encoded, (), {CHOSEN: item.encoded.responses[item.chosen],
                                            REJECTED: item.encoded.responses[item.rejected]})


class ScoredGroupDataLoader(DataLoader):
    """grpo: every scored response of every prompt with at least two (its group), in random order, with the score and
    its group's mean and standard deviation (over the whole group, however the batches split it).

    Batch keys: PROMPT_KEYS, TARGET_KEYS and GROUP_KEYS (score, group_mean, group_std: lists of floats).
    """

    def build_items(self, encoded: List[EncodedExample], rng: random.Random) -> List[ScoredResponse]:
        groups = [item for item in encoded if item.example.num_generations() >= 2]
        if not groups:
            raise DataError(f"{self.name}: group losses need prompts with two or more scored responses (scored "
                            f"feedback rows, README: Datasets), but these datasets have none")
        return [response for item in groups for response in scored_responses(item)]

    def item_parts(self, item: ScoredResponse) -> ItemParts:
        return ItemParts(item.encoded, (), {TARGET: item.encoded.responses[item.index]})

    def extra_fields(self, item: ScoredResponse) -> dict:
        return dict(zip(GROUP_KEYS, (item.score, item.group_mean, item.group_std)))
