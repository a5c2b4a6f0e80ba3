"""Human-feedback datasets, loaded into prompt-keyed `Example`s.

Every `get_<name>(split, human_prefix, human_suffix, assistant_prefix, assistant_suffix,
local_path=None)` returns a `Dataset` mapping each formatted prompt (which ends with
`assistant_prefix`) to an `Example` holding its responses (each ending with `assistant_suffix`) and
the preference pairs among them. `local_path` points at a local mirror of the hub repository (see
`load_split`); `get_local` reads the user's own JSON/JSONL files. Any data problem raises `DataError`.

Differences from the original:

* OASST: `sft_index` is the best-ranked response of the prompt; the original left it at -1, which
  made a dispreferred response the SFT target (F-02).
* HH: a non-empty `human_suffix`/`assistant_suffix` closes each turn; the original put it right
  after the role prefix, at the start of the turn (F-03). Same output with the default empty
  suffixes.
* SHP: the at-most-5-pairs subsampling on train uses its own `random.Random(seed)`, so loading is
  deterministic whatever the global RNG state (the original used the global `random`, F-30). A zero
  score, which crashed the original's ratio, counts as an infinite ratio.
* AlpacaEval is read from the repository's `alpaca_eval.json` file rather than through its
  loading script, which current `datasets` versions no longer run.
* Hub failures are one-line `DataError`s within seconds (the hub is probed first), and every
  dataset can be loaded from a local mirror.
* `Example.desirable` is used: `get_local` fills it for binary (unpaired) feedback.
* A dataset that is empty after filtering is an error rather than an empty training set.
"""
import functools
import gzip
import json
import os
import random
import re
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Iterator, Optional

import datasets
from tqdm import tqdm

import hub
from errors import HalosError

EXTRA_SPACES = re.compile(r"[ \t]{2,}")
HH_RESPONSE_MARKER = "\n\nAssistant: "
HH_TURN_MARKER = re.compile(r"\s*(Human:|Assistant:)\s+")
SHP_MIN_SCORE_RATIO = 2
SHP_MAX_PAIRS_PER_PROMPT = 5
ULTRABIN_SPLITS = {"train": "train_prefs", "test": "test_prefs"}
OFFLINE_HINT = "set local_datasets.{name} to a local mirror (see README: Offline use)"
MESSAGE_ROLES = ("user", "assistant", "system")
LOCAL_SPLIT_EXTENSIONS = (".jsonl", ".json", ".jsonl.gz", ".json.gz")
DATA_FILE_BUILDERS = {".jsonl": "json", ".json": "json", ".jsonl.gz": "json", ".json.gz": "json",
                      ".parquet": "parquet"}


class DataError(HalosError):
    """A dataset could not be loaded or a row does not have the expected shape."""


@dataclass
class Example:
    """All feedback collected for one prompt.

    Attributes:
        prompt: formatted prompt, ending with the assistant prefix.
        generations: responses, each ending with the assistant suffix.
        sft_index: index into `generations` of the SFT target (negative indices count from the
            end); None when the prompt has no acceptable target (binary feedback that is all
            undesirable), which SFT skips.
        scores: one score per generation (SHP upvotes; OASST rank, lower is better), or empty.
        pairs: (i, j) pairs meaning generations[i] is preferred over generations[j].
        desirable: one bool per generation for binary feedback (see `get_local`), else empty.
        truncation_mode: 'keep_end' or 'keep_start': which end of the prompt survives truncation.
        dataset_name: the source dataset tag.
        original_prompt: the unformatted instruction (AlpacaEval only).
    """
    prompt: str = ""
    generations: list[str] = field(default_factory=list)
    sft_index: Optional[int] = -1
    scores: list[float] = field(default_factory=list)
    pairs: list[tuple[int, int]] = field(default_factory=list)
    desirable: list[bool] = field(default_factory=list)
    truncation_mode: str = "keep_end"
    dataset_name: str = ""
    original_prompt: str = ""

    def num_generations(self) -> int:
        return len(self.generations)

    def remove_extra_spaces(self) -> None:
        """Collapses runs of 2+ spaces/tabs to one space in the prompt and generations (newlines kept)."""
        self.prompt = EXTRA_SPACES.sub(" ", self.prompt)
        self.generations = [EXTRA_SPACES.sub(" ", generation) for generation in self.generations]


class Dataset:
    """Examples of one dataset keyed by their raw formatted prompt; a new key creates an empty Example."""

    def __init__(self, name: str):
        self.name = name
        self.data: defaultdict[str, Example] = defaultdict(Example)

    def __setitem__(self, key: str, value: Example) -> None:
        if not isinstance(key, str):
            raise TypeError(f"Dataset keys must be prompt strings, got {type(key).__name__}")
        if not isinstance(value, Example):
            raise TypeError(f"Dataset values must be Example, got {type(value).__name__}")
        self.data[key] = value

    def __getitem__(self, key: str) -> Example:
        return self.data[key]

    def __len__(self) -> int:
        return len(self.data)

    def __iter__(self) -> Iterator[str]:
        return iter(self.data)


# ----------------------------------------------------------------------------------------------
# Loading hub datasets and local mirrors
# ----------------------------------------------------------------------------------------------

def load_split(hub_id: str, split: str, *, name: str, data_dir: Optional[str] = None,
               data_file: Optional[str] = None, local_path: Optional[str] = None) -> datasets.Dataset:
    """Loads one split of a hub dataset, or of a local mirror of it.

    Args:
        hub_id: hub repository, e.g. 'Anthropic/hh-rlhf'.
        split: split name as the repository defines it, e.g. 'train_prefs'.
        name: our dataset name (for messages and the `local_datasets.<name>` hint).
        data_dir: sub-directory of the repository holding the split's files.
        data_file: a single file of the repository that holds the split (for repositories whose
            layout `datasets` cannot infer); `split` and `data_dir` are then unused.
        local_path: None to use the hub (or its local cache when offline). Otherwise either a
            directory laid out like the repository (as `huggingface-cli download --repo-type
            dataset HUB_ID --local-dir DIR` makes it), or one json/jsonl/jsonl.gz/parquet file
            used for whatever split is requested. A literal '{split}' in the path is replaced by
            `split` first.

    Returns:
        The split's rows.
    """
    if local_path is None:
        return _load_from_hub(hub_id, split, name=name, data_dir=data_dir, data_file=data_file)
    return _load_local_mirror(local_path.replace("{split}", split), split, name=name,
                              data_dir=data_dir, data_file=data_file)


def _load_from_hub(hub_id: str, split: str, *, name: str, data_dir: Optional[str],
                   data_file: Optional[str]) -> datasets.Dataset:
    if data_file is None:
        source = hub_id
        load = functools.partial(datasets.load_dataset, hub_id, data_dir=data_dir, split=split)
    else:
        source = f"hf://datasets/{hub_id}/{data_file}"
        load = functools.partial(_load_data_file, source)
    if hub.offline_requested():
        with hub.forced_offline():
            return _load_or_raise(load, f"Couldn't load '{source}' for dataset '{name}' from the local "
                                  f"cache (offline mode is set); {OFFLINE_HINT.format(name=name)}")
    if hub.hub_reachable():
        return _load_or_raise(load, f"Couldn't load '{source}' from the Hugging Face Hub for "
                              f"dataset '{name}' split '{split}'")
    with hub.forced_offline():
        # The cause would only repeat that offline mode is on (which we just forced).
        return _load_or_raise(load, f"Couldn't reach the Hugging Face Hub to load '{hub_id}' for "
                              f"dataset '{name}'; {OFFLINE_HINT.format(name=name)}", show_cause=False)


def _load_local_mirror(path: str, split: str, *, name: str, data_dir: Optional[str],
                       data_file: Optional[str]) -> datasets.Dataset:
    where = f"local_datasets.{name} ('{path}')"
    if os.path.isfile(path):
        return _load_or_raise(functools.partial(_load_data_file, path), f"Couldn't load {where}")
    if not os.path.isdir(path):
        raise DataError(f"{where} does not exist; expected a local mirror directory of the hub "
                        f"repository or a json/jsonl/parquet file")
    if data_file is not None:
        return _load_or_raise(functools.partial(_load_data_file, os.path.join(path, data_file)),
                              f"Couldn't load {where}, file '{data_file}'")
    return _load_or_raise(functools.partial(datasets.load_dataset, path, data_dir=data_dir, split=split),
                          f"Couldn't load split '{split}' from {where}")


def _load_data_file(path: str) -> datasets.Dataset:
    builder = next((builder for extension, builder in DATA_FILE_BUILDERS.items()
                    if path.endswith(extension)), None)
    if builder is None:
        raise DataError(f"'{path}': unsupported file type; expected one of {sorted(DATA_FILE_BUILDERS)}")
    return datasets.load_dataset(builder, data_files=path, split="train")


def _load_or_raise(load: Callable[[], datasets.Dataset], message: str, *,
                   show_cause: bool = True) -> datasets.Dataset:
    """Runs `load()`, turning any failure into a one-line DataError: `message` plus the cause's first line."""
    try:
        return load()
    except DataError:
        raise
    # `datasets` raises many unrelated types here (FileNotFoundError, ValueError for unknown splits,
    # ConnectionError, DatasetGenerationError, RuntimeError for script repositories, ...).
    except Exception as err:
        cause = (str(err).strip().splitlines() or [""])[0]
        raise DataError(f"{message} ({type(err).__name__}: {cause})" if show_cause else message) from err


# ----------------------------------------------------------------------------------------------
# Helpers shared by the dataset functions
# ----------------------------------------------------------------------------------------------

def _require_columns(rows: datasets.Dataset, columns: Iterable[str], *, name: str, split: str) -> None:
    missing = [column for column in columns if column not in rows.column_names]
    if missing:
        raise DataError(f"dataset '{name}' split '{split}' lacks column(s) {missing}; "
                        f"found {rows.column_names}")


def _require_examples(data: Dataset, *, name: str, split: str) -> Dataset:
    if len(data) == 0:
        raise DataError(f"dataset '{name}' split '{split}' has no examples after filtering")
    return data


def _progress(rows: Iterable[Any], data: Dataset) -> Iterable[Any]:
    return tqdm(rows, desc=f"Processing {data.name}")


def _add_pair(example: Example, preferred: str, dispreferred: str) -> None:
    """Appends both responses and the pair saying the first is preferred."""
    first = example.num_generations()
    example.generations += [preferred, dispreferred]
    example.pairs.append((first, first + 1))


def _remove_extra_spaces(data: Dataset) -> None:
    for example in data.data.values():
        example.remove_extra_spaces()


# ----------------------------------------------------------------------------------------------
# Stanford Human Preferences
# ----------------------------------------------------------------------------------------------

def get_shp(split: str, human_prefix: str, human_suffix: str, assistant_prefix: str,
            assistant_suffix: str, local_path: Optional[str] = None, seed: int = 0) -> Dataset:
    """Stanford Human Preferences (`stanfordnlp/SHP`): pairs of Reddit comments ranked by upvotes.

    On the train split only, rows whose score ratio is below 2 are dropped and each prompt keeps at
    most 5 randomly chosen pairs (drawn with `random.Random(seed)`); all generations are kept.
    The SFT target is the first response seen for the prompt, preferred or not (as the original).
    Prompts are truncated from the end ('keep_start').
    """
    rows = load_split("stanfordnlp/SHP", split, name="shp", local_path=local_path)
    _require_columns(rows, ["history", "human_ref_A", "human_ref_B", "score_A", "score_B", "labels"],
                     name="shp", split=split)
    data = Dataset("SHP")
    for row in _progress(rows, data):
        if split == "train" and _score_ratio(row["score_A"], row["score_B"]) < SHP_MIN_SCORE_RATIO:
            continue
        prompt = human_prefix + row["history"] + human_suffix + assistant_prefix
        example = data[prompt]
        example.prompt = prompt
        first = example.num_generations()
        example.generations += [row["human_ref_A"] + assistant_suffix, row["human_ref_B"] + assistant_suffix]
        example.scores += [row["score_A"], row["score_B"]]
        example.pairs.append((first, first + 1) if row["labels"] == 1 else (first + 1, first))
        example.sft_index = 0
        example.truncation_mode = "keep_start"
        example.dataset_name = "shp"
    if split == "train":
        _subsample_pairs(data, SHP_MAX_PAIRS_PER_PROMPT, random.Random(seed))
    _remove_extra_spaces(data)
    return _require_examples(data, name="shp", split=split)


def _score_ratio(score_a: float, score_b: float) -> float:
    """max(a/b, b/a); a zero score makes the ratio infinite unless both are zero (ratio 1)."""
    high, low = max(score_a, score_b), min(score_a, score_b)
    if low <= 0:
        return float("inf") if high > low else 1.0
    return high / low


def _subsample_pairs(data: Dataset, max_pairs: int, rng: random.Random) -> None:
    for example in data.data.values():
        example.pairs = rng.sample(example.pairs, min(max_pairs, len(example.pairs)))


# ----------------------------------------------------------------------------------------------
# Anthropic HH-RLHF
# ----------------------------------------------------------------------------------------------

def get_hh(split: str, human_prefix: str, human_suffix: str, assistant_prefix: str,
           assistant_suffix: str, local_path: Optional[str] = None) -> Dataset:
    """Anthropic HH-RLHF (`Anthropic/hh-rlhf`), all subsets of the default configuration."""
    return _get_hh(split, human_prefix, human_suffix, assistant_prefix, assistant_suffix,
                   name="hh", data_dir=None, local_path=local_path)


def get_hh_helpful(split: str, human_prefix: str, human_suffix: str, assistant_prefix: str,
                   assistant_suffix: str, local_path: Optional[str] = None) -> Dataset:
    """The `helpful-base` subset of Anthropic HH-RLHF."""
    return _get_hh(split, human_prefix, human_suffix, assistant_prefix, assistant_suffix,
                   name="hh_helpful", data_dir="helpful-base", local_path=local_path)


def get_hh_harmless(split: str, human_prefix: str, human_suffix: str, assistant_prefix: str,
                    assistant_suffix: str, local_path: Optional[str] = None) -> Dataset:
    """The `harmless-base` subset of Anthropic HH-RLHF."""
    return _get_hh(split, human_prefix, human_suffix, assistant_prefix, assistant_suffix,
                   name="hh_harmless", data_dir="harmless-base", local_path=local_path)


def _get_hh(split: str, human_prefix: str, human_suffix: str, assistant_prefix: str,
            assistant_suffix: str, *, name: str, data_dir: Optional[str],
            local_path: Optional[str]) -> Dataset:
    """Each row is a dialogue with two alternative last assistant turns: chosen, then rejected.

    Rows with the same prompt are merged; the SFT target is the chosen response of the first one.
    """
    rows = load_split("Anthropic/hh-rlhf", split, name=name, data_dir=data_dir, local_path=local_path)
    _require_columns(rows, ["chosen", "rejected"], name=name, split=split)
    data = Dataset("Anthropic-HH")
    for row_number, row in enumerate(_progress(rows, data), start=1):
        raw_prompt, chosen, rejected = _split_hh_row(row["chosen"], row["rejected"],
                                                     where=f"dataset '{name}' split '{split}' row {row_number}")
        prompt = _format_hh_prompt(raw_prompt, human_prefix, human_suffix, assistant_prefix, assistant_suffix)
        example = data[prompt]
        example.prompt = prompt
        _add_pair(example, chosen + assistant_suffix, rejected + assistant_suffix)
        example.sft_index = 0
        example.dataset_name = name
    _remove_extra_spaces(data)
    return _require_examples(data, name=name, split=split)


def _split_hh_row(chosen: str, rejected: str, *, where: str) -> tuple[str, str, str]:
    """Splits a row into (raw prompt, chosen response, rejected response).

    The raw prompt is `chosen` up to and including its last '\\n\\nAssistant: '. As in the original,
    the rejected response is `rejected` minus as many leading characters, assuming both texts share
    the prompt (a handful of real rows do not).
    """
    marker_start = chosen.rfind(HH_RESPONSE_MARKER)
    if marker_start < 0:
        raise DataError(f"{where}: field 'chosen' has no {HH_RESPONSE_MARKER!r} turn; expected an "
                        f"HH dialogue ending with an assistant response")
    cut = marker_start + len(HH_RESPONSE_MARKER)
    return chosen[:cut], chosen[cut:], rejected[cut:]


def _format_hh_prompt(raw_prompt: str, human_prefix: str, human_suffix: str, assistant_prefix: str,
                      assistant_suffix: str) -> str:
    """Rewrites '\\n\\nHuman: a\\n\\nAssistant: b ... \\n\\nAssistant: ' with our role markers.

    Every turn becomes prefix + text + suffix; the prompt ends with a bare `assistant_prefix`
    (the response carries the closing suffix).
    """
    # re.split with a capturing group gives [leading text, role, text, role, text, ...].
    pieces = HH_TURN_MARKER.split(raw_prompt)
    roles, texts = pieces[1::2], pieces[2::2]
    turns = [(human_prefix + text + human_suffix) if role == "Human:" else
             (assistant_prefix + text + assistant_suffix)
             for role, text in zip(roles[:-1], texts[:-1])]
    return pieces[0] + "".join(turns) + assistant_prefix


# ----------------------------------------------------------------------------------------------
# OpenAssistant
# ----------------------------------------------------------------------------------------------

def get_oasst(split: str, human_prefix: str, human_suffix: str, assistant_prefix: str,
              assistant_suffix: str, local_path: Optional[str] = None) -> Dataset:
    """OpenAssistant Conversations (`OpenAssistant/oasst1`), English messages only.

    Every ranked message (rank > 0) is paired with its next-best sibling (rank one lower, preferred);
    the prompt is the conversation from the root to their parent. A ranking r0 > r1 > r2 thus gives
    pairs (r0, r1) and (r1, r2), with r1 stored twice. Messages whose better sibling or any ancestor
    is missing (e.g. not English) are skipped. The SFT target is the best-ranked response. 'test'
    reads the hub's 'validation' split.
    """
    hub_split = "validation" if split == "test" else "train"
    rows = load_split("OpenAssistant/oasst1", hub_split, name="oasst", local_path=local_path)
    _require_columns(rows, ["message_id", "parent_id", "text", "role", "lang", "rank"],
                     name="oasst", split=split)
    messages = [row for row in rows if row["lang"] == "en"]
    by_id = {message["message_id"]: message for message in messages}
    children = defaultdict(list)
    for message in messages:
        children[message["parent_id"]].append(message)
    data = Dataset("OASST")
    for message in _progress(messages, data):
        if not message["rank"]:  # unranked (None) or already the best (0)
            continue
        better = next((sibling for sibling in children[message["parent_id"]]
                       if sibling["rank"] == message["rank"] - 1), None)
        if better is None:
            continue
        history = _oasst_history(better, by_id)
        if history is None:
            continue
        prompt = "".join(_format_oasst_message(turn, human_prefix, human_suffix, assistant_prefix,
                                               assistant_suffix) for turn in history) + assistant_prefix
        example = data[prompt]
        example.prompt = prompt
        _add_pair(example, better["text"] + assistant_suffix, message["text"] + assistant_suffix)
        example.scores += [better["rank"], message["rank"]]
        example.dataset_name = "oasst"
    for example in data.data.values():
        example.sft_index = min(range(example.num_generations()), key=example.scores.__getitem__)
    _remove_extra_spaces(data)
    return _require_examples(data, name="oasst", split=split)


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


def _format_oasst_message(message: dict, human_prefix: str, human_suffix: str, assistant_prefix: str,
                          assistant_suffix: str) -> str:
    if message["role"] == "assistant":
        return assistant_prefix + message["text"] + assistant_suffix
    return human_prefix + message["text"] + human_suffix


# ----------------------------------------------------------------------------------------------
# UltraFeedback binarized and AlpacaEval
# ----------------------------------------------------------------------------------------------

def get_ultrabin(split: str, human_prefix: str, human_suffix: str, assistant_prefix: str,
                 assistant_suffix: str, local_path: Optional[str] = None) -> Dataset:
    """UltraFeedback binarized (`HuggingFaceH4/ultrafeedback_binarized`, the *_prefs splits).

    One pair per prompt: the last message of `chosen` over that of `rejected`. Prompts are
    truncated from the end ('keep_start').
    """
    if split not in ULTRABIN_SPLITS:
        raise DataError(f"dataset 'ultrabin' has no split '{split}'; expected one of {sorted(ULTRABIN_SPLITS)}")
    rows = load_split("HuggingFaceH4/ultrafeedback_binarized", ULTRABIN_SPLITS[split], name="ultrabin",
                      local_path=local_path)
    _require_columns(rows, ["prompt", "chosen", "rejected"], name="ultrabin", split=split)
    data = Dataset("Ultrabin")
    for row in _progress(rows, data):
        prompt = human_prefix + row["prompt"] + human_suffix + assistant_prefix
        example = data[prompt]
        example.prompt = prompt
        _add_pair(example, row["chosen"][-1]["content"] + assistant_suffix,
                  row["rejected"][-1]["content"] + assistant_suffix)
        example.sft_index = 0
        example.truncation_mode = "keep_start"
        example.dataset_name = "ultrabin"
    _remove_extra_spaces(data)
    return _require_examples(data, name="ultrabin", split=split)


def get_alpacaeval(split: str, human_prefix: str, human_suffix: str, assistant_prefix: str,
                   assistant_suffix: str, local_path: Optional[str] = None) -> Dataset:
    """AlpacaEval instructions (`tatsu-lab/alpaca_eval`), for evaluation only (split 'test').

    The generation is the reference output; `dataset_name` is the row's source dataset and
    `original_prompt` the bare instruction. Spaces are not normalised. A local mirror is the
    repository directory (its `alpaca_eval.json` is read) or that file itself.
    """
    if split != "test":
        raise DataError(f"dataset 'alpacaeval' is for evaluation only; expected split 'test', got '{split}'")
    rows = load_split("tatsu-lab/alpaca_eval", "eval", name="alpacaeval", data_file="alpaca_eval.json",
                      local_path=local_path)
    _require_columns(rows, ["instruction", "output", "dataset"], name="alpacaeval", split=split)
    data = Dataset("AlpacaEval")
    for row in _progress(rows, data):
        prompt = human_prefix + row["instruction"] + human_suffix + assistant_prefix
        example = data[prompt]
        example.prompt = prompt
        example.generations.append(row["output"] + assistant_suffix)
        example.dataset_name = row["dataset"]
        example.original_prompt = row["instruction"]
    return _require_examples(data, name="alpacaeval", split=split)


# ----------------------------------------------------------------------------------------------
# The user's own data
# ----------------------------------------------------------------------------------------------

def get_local(path: str, split: str, human_prefix: str, human_suffix: str, assistant_prefix: str,
              assistant_suffix: str, name: str = "local") -> Dataset:
    """Loads the user's own feedback from a JSON or JSONL file (optionally gzipped).

    `path` is a file (used for every split), a directory holding `{split}.jsonl`, `{split}.json`,
    `{split}.jsonl.gz` or `{split}.json.gz`, or a path containing the literal '{split}'. A JSON
    file holds a list of rows; a JSONL file one row per line. Each row is either

    * paired feedback: `{"prompt": ..., "chosen": str, "rejected": str}`, or
    * binary feedback: `{"prompt": ..., "completion": str, "label": true/false or 1/0}`
      (true/1 = desirable).

    `prompt` is a string (one user turn) or a list of messages `{"role": "user" | "assistant" |
    "system", "content": str}` ending with a user turn; user and system turns get the human
    prefix/suffix, assistant turns the assistant ones, and the prompt ends with `assistant_prefix`.
    Rows with the same prompt are merged into one Example; a file may mix both schemas.

    Paired rows add a pair (chosen first). Binary rows add their completion and fill `desirable`;
    once an example has binary feedback, `desirable` covers all its generations (chosen ones count
    as desirable, rejected ones as undesirable). The SFT target is the first chosen response, else
    the first desirable completion, else None (SFT skips the prompt). Text is kept verbatim
    (no space normalisation, so code indentation survives) and prompts are truncated from the start.
    Row numbers in errors are 1-based list positions (JSON) or line numbers (JSONL).
    """
    file = _local_split_file(path, split)
    rows = _read_json_rows(file)
    if not rows:
        raise DataError(f"'{file}' has no rows for split '{split}'; expected at least one feedback row")
    data = Dataset(name)
    for row_number, row in _progress(rows, data):
        where = f"'{file}' row {row_number}"
        _add_local_row(data, _require_object(row, where), where, human_prefix, human_suffix,
                       assistant_prefix, assistant_suffix)
    for example in data.data.values():
        example.dataset_name = name
        example.sft_index = _local_sft_index(example)
    return data


def _local_split_file(path: str, split: str) -> str:
    if "{split}" in path:
        file = path.replace("{split}", split)
        if not os.path.isfile(file):
            raise DataError(f"'{file}' (from '{path}' with split '{split}') does not exist")
        return file
    if os.path.isfile(path):
        return path
    if os.path.isdir(path):
        candidates = [os.path.join(path, split + extension) for extension in LOCAL_SPLIT_EXTENSIONS]
        existing = [candidate for candidate in candidates if os.path.isfile(candidate)]
        if len(existing) != 1:
            names = ", ".join(split + extension for extension in LOCAL_SPLIT_EXTENSIONS)
            problem = "holds none of" if not existing else "holds more than one of"
            raise DataError(f"directory '{path}' {problem} {names}; expected exactly one")
        return existing[0]
    raise DataError(f"'{path}' does not exist; expected a JSON/JSONL file, a directory holding "
                    f"{split}.jsonl or {split}.json, or a path containing '{{split}}'")


def _read_json_rows(file: str) -> list[tuple[int, Any]]:
    """(1-based row number, parsed row) for a JSON list file or a JSONL file (either may be .gz)."""
    try:
        opener = gzip.open if file.endswith(".gz") else open
        with opener(file, "rt", encoding="utf-8") as handle:
            text = handle.read()
    except (OSError, UnicodeDecodeError) as err:
        raise DataError(f"'{file}': cannot read ({err}); expected UTF-8 JSON or JSONL text") from err
    if text.lstrip().startswith("["):
        try:
            rows = json.loads(text)
        except json.JSONDecodeError as err:
            raise DataError(f"'{file}': invalid JSON at line {err.lineno}: {err.msg}") from err
        return list(enumerate(rows, start=1))
    parsed = []
    for line_number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            parsed.append((line_number, json.loads(line)))
        except json.JSONDecodeError as err:
            raise DataError(f"'{file}' row {line_number}: invalid JSON ({err.msg}); expected one "
                            f"JSON object per line") from err
    return parsed


def _add_local_row(data: Dataset, row: dict, where: str, human_prefix: str, human_suffix: str,
                   assistant_prefix: str, assistant_suffix: str) -> None:
    prompt = _format_local_prompt(row.get("prompt"), where, human_prefix, human_suffix, assistant_prefix,
                                  assistant_suffix)
    is_paired = "chosen" in row or "rejected" in row
    is_binary = "completion" in row or "label" in row
    if is_paired == is_binary:
        problem = "mixes" if is_paired else "has neither"
        raise DataError(f"{where}: row {problem} paired fields ('chosen', 'rejected') and binary fields "
                        f"('completion', 'label'); expected exactly one of the two schemas")
    example = data[prompt]
    example.prompt = prompt
    if is_paired:
        _add_paired_feedback(example, _require_string(row, "chosen", where) + assistant_suffix,
                             _require_string(row, "rejected", where) + assistant_suffix)
    else:
        _add_binary_feedback(example, _require_string(row, "completion", where) + assistant_suffix,
                             _require_label(row, where))


def _format_local_prompt(prompt: Any, where: str, human_prefix: str, human_suffix: str,
                         assistant_prefix: str, assistant_suffix: str) -> str:
    if prompt is None:
        raise DataError(f"{where}: missing field 'prompt'; expected a string or a list of messages")
    if isinstance(prompt, str):
        if not prompt.strip():
            raise DataError(f"{where}: field 'prompt' is empty; expected the user's text")
        return human_prefix + prompt + human_suffix + assistant_prefix
    if not isinstance(prompt, list):
        raise DataError(f"{where}: field 'prompt' is a {type(prompt).__name__}; expected a string or a "
                        f"list of messages")
    if not prompt:
        raise DataError(f"{where}: field 'prompt' is an empty list; expected messages ending with a user turn")
    turns = []
    for message_number, message in enumerate(prompt, start=1):
        role, content = _require_message(message, f"{where}: prompt message {message_number}")
        if role == "assistant":
            turns.append(assistant_prefix + content + assistant_suffix)
        else:
            turns.append(human_prefix + content + human_suffix)
    if role != "user":
        raise DataError(f"{where}: the last prompt message has role '{role}'; expected 'user'")
    return "".join(turns) + assistant_prefix


def _require_message(message: Any, where: str) -> tuple[str, str]:
    """(role, content) of one prompt message."""
    if not isinstance(message, dict):
        raise DataError(f"{where} is a {type(message).__name__}; expected an object with 'role' and 'content'")
    role = message.get("role")
    if role not in MESSAGE_ROLES:
        raise DataError(f"{where}: unknown role {role!r}; expected one of {', '.join(MESSAGE_ROLES)}")
    return role, _require_string(message, "content", where)


def _require_object(row: Any, where: str) -> dict:
    if not isinstance(row, dict):
        raise DataError(f"{where}: row is a {type(row).__name__}; expected a JSON object")
    return row


def _require_string(row: dict, key: str, where: str) -> str:
    if key not in row:
        raise DataError(f"{where}: missing field '{key}'; expected a string")
    if not isinstance(row[key], str):
        raise DataError(f"{where}: field '{key}' is a {type(row[key]).__name__}; expected a string")
    return row[key]


def _require_label(row: dict, where: str) -> bool:
    if "label" not in row:
        raise DataError(f"{where}: missing field 'label'; expected true/false or 1/0")
    label = row["label"]
    if isinstance(label, bool) or (type(label) is int and label in (0, 1)):
        return bool(label)
    raise DataError(f"{where}: field 'label' is {label!r}; expected true/false or 1/0")


def _add_paired_feedback(example: Example, chosen: str, rejected: str) -> None:
    _add_pair(example, chosen, rejected)
    if example.desirable:
        example.desirable += [True, False]


def _add_binary_feedback(example: Example, completion: str, desirable: bool) -> None:
    if not example.desirable:
        # Earlier generations came from pairs: their desirability follows from the pairs.
        chosen = {preferred for preferred, _ in example.pairs}
        example.desirable = [index in chosen for index in range(example.num_generations())]
    example.generations.append(completion)
    example.desirable.append(desirable)


def _local_sft_index(example: Example) -> Optional[int]:
    if example.pairs:
        return example.pairs[0][0]
    return next((index for index, desirable in enumerate(example.desirable) if desirable), None)
