"""Reading raw rows: hub datasets, local mirrors of them, and local parquet/CSV/JSON/JSONL files or directories.

`load_split` serves the built-in loaders (a hub id and the hub's split name, or a local mirror of that repository).
`read_source` serves datasets named in config without code (`dataset_sources.<name>` / `local_datasets.<name>`): it
yields every row of one split with a location string for error messages. JSON and JSONL files are parsed here, not
by `datasets`, so rows may mix schemas (a prompt that is a string in one row and a message list in the next) and
errors can name the line. Hub failures are one-line `DataError`s within seconds (hub.py probes the endpoint first).
"""
import functools
import gzip
import json
import logging
import os
import re
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Iterator, Mapping, Optional

import datasets

import hub
from feedback.examples import DataError

OFFLINE_HINT = "set local_datasets.{name} to a local mirror (see README: Offline use)"
JSON_EXTENSIONS = (".jsonl", ".json", ".jsonl.gz", ".json.gz")
DATA_FILE_BUILDERS = {".jsonl": "json", ".json": "json", ".jsonl.gz": "json", ".json.gz": "json",
                      ".parquet": "parquet", ".csv": "csv"}
HUB_ID = re.compile(r"^[\w.-]+/[\w.-]+$")
SPLIT_PLACEHOLDER = "{split}"


class _WithoutCardWarning(logging.Filter):
    """Drops huggingface_hub's "Repo card metadata block was not found" warning, which every local directory with a
    plain README.md triggers once per split (a mirror's README need not carry hub metadata)."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith("Repo card metadata block was not found")


logging.getLogger("huggingface_hub.repocard").addFilter(_WithoutCardWarning())


# ----------------------------------------------------------------------------------------------
# Hub datasets and local mirrors of them (the built-in loaders)
# ----------------------------------------------------------------------------------------------

def load_split(hub_id: str, split: str, *, name: str, data_dir: Optional[str] = None,
               data_file: Optional[str] = None, subset: Optional[str] = None,
               local_path: Optional[str] = None) -> datasets.Dataset:
    """Loads one split of a hub dataset, or of a local mirror of it.

    Args:
        hub_id: hub repository, e.g. 'Anthropic/hh-rlhf'.
        split: split name as the repository defines it, e.g. 'train_prefs'.
        name: our dataset name (for messages and the `local_datasets.<name>` hint).
        data_dir: sub-directory of the repository holding the split's files.
        data_file: a single file of the repository that holds the split (for repositories whose layout `datasets`
            cannot infer); `split` and `data_dir` are then unused.
        subset: the repository's configuration name, if it has several.
        local_path: None to use the hub (or its local cache when offline). Otherwise either a directory laid out
            like the repository (as `huggingface-cli download --repo-type dataset HUB_ID --local-dir DIR` makes
            it), or one json/jsonl/jsonl.gz/parquet/csv file used for whatever split is requested. A literal
            '{split}' in the path is replaced by `split` first.

    Returns:
        The split's rows.
    """
    if local_path is None:
        return _load_from_hub(hub_id, split, name=name, data_dir=data_dir, data_file=data_file, subset=subset)
    return _load_local_mirror(local_path.replace(SPLIT_PLACEHOLDER, split), split, name=name, data_dir=data_dir,
                              data_file=data_file, subset=subset)


def _load_from_hub(hub_id: str, split: str, *, name: str, data_dir: Optional[str], data_file: Optional[str],
                   subset: Optional[str]) -> datasets.Dataset:
    if data_file is None:
        source = hub_id
        load = functools.partial(datasets.load_dataset, hub_id, subset, data_dir=data_dir, split=split)
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


def _load_local_mirror(path: str, split: str, *, name: str, data_dir: Optional[str], data_file: Optional[str],
                       subset: Optional[str]) -> datasets.Dataset:
    where = f"local_datasets.{name} ('{path}')"
    if os.path.isfile(path):
        return _load_or_raise(functools.partial(_load_data_file, path), f"Couldn't load {where}")
    if not os.path.isdir(path):
        raise DataError(f"{where} does not exist; expected a local mirror directory of the hub "
                        f"repository or a json/jsonl/parquet/csv file")
    if data_file is not None:
        return _load_or_raise(functools.partial(_load_data_file, os.path.join(path, data_file)),
                              f"Couldn't load {where}, file '{data_file}'")
    return _load_or_raise(functools.partial(datasets.load_dataset, path, subset, data_dir=data_dir, split=split),
                          f"Couldn't load split '{split}' from {where}")


def _load_data_file(path: str) -> datasets.Dataset:
    builder = next((builder for extension, builder in DATA_FILE_BUILDERS.items() if path.endswith(extension)), None)
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


def require_columns(rows: datasets.Dataset, columns: Iterable[str], *, name: str, split: str) -> None:
    missing = [column for column in columns if column not in rows.column_names]
    if missing:
        raise DataError(f"dataset '{name}' split '{split}' lacks column(s) {missing}; found {rows.column_names}")


# ----------------------------------------------------------------------------------------------
# Datasets named in config: any hub dataset or local file
# ----------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class SourceSpec:
    """Where a dataset without a loader function comes from (`dataset_sources.<name>` in config).

    Attributes:
        name: the dataset's name in `datasets=[...]`.
        path: a hub dataset id ('org/name'), or a local file (parquet, CSV, JSON, JSONL, optionally .gz) or
            directory; '{split}' in a local path is replaced by the split name.
        subset: the hub dataset's configuration name, if it has several.
        splits: our split ('train'/'test') -> the source's split name (default: the same name).
        columns: our field ('prompt', 'chosen', ...) -> the source's column; None leaves the field out.
        test_fraction: hold out this fraction of the source's train rows (whole prompts, chosen by a hash of the
            prompt, so the same rows every run) as the test split; the train split is the rest.
        key: the config key named in errors.
    """
    name: str
    path: str
    subset: Optional[str] = None
    splits: Mapping[str, str] = field(default_factory=dict)
    columns: Mapping[str, Optional[str]] = field(default_factory=dict)
    test_fraction: Optional[float] = None
    key: str = ""

    def source_split(self, split: str) -> str:
        """The source's split that our `split` reads (its train split for both when test_fraction is set)."""
        return self.splits.get("train", "train") if self.test_fraction else self.splits.get(split, split)

    @property
    def config_key(self) -> str:
        return self.key or f"dataset_sources.{self.name}"


def is_hub_id(path: str) -> bool:
    """Whether a source path names a hub dataset rather than a local file or directory."""
    return not os.path.exists(path) and SPLIT_PLACEHOLDER not in path and bool(HUB_ID.match(path))


def read_source(spec: SourceSpec, split: str) -> Iterator[tuple[str, Any]]:
    """(location, row) for every row of one split of a named source; rows are dicts unless the file is malformed.

    A single local file serves whatever split is asked for (the config check refuses a training run that would
    read one file as both its train and test split); test_fraction partitions it.
    """
    source_split = spec.source_split(split)
    if is_hub_id(spec.path):
        rows = _load_from_hub(spec.path, source_split, name=spec.name, data_dir=None, data_file=None,
                              subset=spec.subset)
        return _numbered(rows, f"'{spec.path}' split '{source_split}'")
    path = spec.path.replace(SPLIT_PLACEHOLDER, source_split)
    if os.path.isdir(path):
        json_file = _json_split_file(path, source_split)
        if json_file is None:
            rows = _load_or_raise(functools.partial(datasets.load_dataset, path, spec.subset, split=source_split),
                                  f"{spec.config_key}: directory '{path}' holds no {source_split}.jsonl or "
                                  f"{source_split}.json, and `datasets` could not read its split '{source_split}'")
            return _numbered(rows, f"'{path}' split '{source_split}'")
        path = json_file
    if not os.path.isfile(path):
        raise DataError(f"{spec.config_key}: '{path}' does not exist; expected a hub dataset id, a file "
                        f"(parquet, CSV, JSON, JSONL), a directory, or a path containing '{SPLIT_PLACEHOLDER}'")
    if path.endswith(JSON_EXTENSIONS):
        return ((f"'{path}' row {number}", row) for number, row in read_json_rows(path))
    rows = _load_or_raise(functools.partial(_load_data_file, path), f"{spec.config_key}: couldn't read '{path}'")
    return _numbered(rows, f"'{path}'")


def _numbered(rows: datasets.Dataset, where: str) -> Iterator[tuple[str, Any]]:
    return ((f"{where} row {number}", row) for number, row in enumerate(rows, start=1))


def _json_split_file(directory: str, split: str) -> Optional[str]:
    """The directory's `{split}.jsonl` (or .json, .jsonl.gz, .json.gz), None if it has none; several is an error."""
    existing = [os.path.join(directory, split + extension) for extension in JSON_EXTENSIONS
                if os.path.isfile(os.path.join(directory, split + extension))]
    if len(existing) > 1:
        names = ", ".join(os.path.basename(file) for file in existing)
        raise DataError(f"directory '{directory}' holds more than one of {names}; expected exactly one")
    return existing[0] if existing else None


def read_json_rows(file: str) -> list[tuple[int, Any]]:
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


def split_file(path: str, split: str) -> Optional[str]:
    """The local file a split would read from `path` (None for a hub id or a directory without JSON split files):
    the config check uses it to refuse one file serving as both train and test split."""
    candidate = path.replace(SPLIT_PLACEHOLDER, split)
    if os.path.isdir(candidate):
        candidate = _json_split_file(candidate, split)
    return os.path.realpath(candidate) if candidate and os.path.isfile(candidate) else None
