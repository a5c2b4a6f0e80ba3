"""The data part of the config: its checks (run before anything loads) and what the dataloaders are built from.

Keys (config/config.yaml, config/model/base_model.yaml): `datasets`, `local_datasets`, `dataset_sources`,
`dataset_weights`, `dataset_max_examples`, `sft_all_assistant_turns`, the four prefix strings and
`model.chat_template`. `config_problems` returns one `key: problem` line per problem, as configuration.py's other
checks do.
"""
import os
from typing import Dict, List, Mapping, Optional, Sequence

from omegaconf import DictConfig, ListConfig, OmegaConf

import dataloader
from errors import ConfigError
from feedback.examples import DataError
from feedback.mixing import Mixture
from feedback.prompt_format import chat_template_problem, prompt_format_from_config
from feedback.rows import FIELDS
from feedback.sources import SourceSpec, is_hub_id, split_file
from resolve import resolve_class

SOURCE_KEYS = ("path", "subset", "splits", "columns", "test_fraction")
SPLITS = ("train", "test")


def plain(node) -> object:
    """A config node as plain Python containers (an absent node as an empty dict)."""
    return OmegaConf.to_container(node, resolve=True) if OmegaConf.is_config(node) else (node or {})


def source_specs(config: DictConfig) -> Dict[str, SourceSpec]:
    """dataset_sources entries as SourceSpecs (a missing path taken from local_datasets.<name>)."""
    local = plain(config.get("local_datasets"))
    specs = {}
    for name, entry in plain(config.get("dataset_sources")).items():
        entry = dict(entry or {})
        path = entry.pop("path", None) or local.get(name)
        specs[name] = SourceSpec(name, str(path), entry.get("subset"), entry.get("splits") or {},
                                 entry.get("columns") or {}, entry.get("test_fraction"))
    return specs


def data_spec(config: DictConfig, tokenizer, split: str) -> dataloader.DataSpec:
    """The DataSpec of config.datasets for one split, with the run's prompt format. Mixing weights and caps shape the
    train split only: evaluation and sampling see every test example once."""
    local = {name: str(path) for name, path in plain(config.get("local_datasets")).items() if path is not None}
    mixing = split == "train"
    return dataloader.DataSpec(list(config.datasets), prompt_format_from_config(config, tokenizer), local,
                               source_specs(config), plain(config.get("dataset_weights")) if mixing else {},
                               plain(config.get("dataset_max_examples")) if mixing else {})


def loader_options(config: DictConfig, batch_size: int, n_epochs: Optional[int], n_examples: Optional[int],
                   kl_group_size: Optional[int] = None) -> dataloader.LoaderOptions:
    return dataloader.LoaderOptions(
        batch_size=batch_size, max_length=config.model.max_length, max_prompt_length=config.model.max_prompt_length,
        n_epochs=n_epochs, n_examples=n_examples, seed=config.seed,
        frac_unique_desirable=config.frac_unique_desirable, frac_unique_undesirable=config.frac_unique_undesirable,
        chosen_control_token=config.loss.get("chosen_control_token"),
        rejected_control_token=config.loss.get("rejected_control_token"),
        sft_all_assistant_turns=config.sft_all_assistant_turns, kl_group_size=kl_group_size)


# ---------------------------------------------------------------------------------------------------
# Checks


def config_problems(config: DictConfig, splits: Sequence[str] = SPLITS) -> List[str]:
    """Every problem of the data config, as `key: problem` lines; `splits` are the splits the run reads."""
    names = None if OmegaConf.is_missing(config, "datasets") else config.datasets
    if names is None:
        return []  # reported by the schema check
    if not isinstance(names, ListConfig) or not names:
        return [f"datasets: expected a non-empty list like [hh,shp], got {names!r}"]
    names = [str(name) for name in names]
    local = plain(config.get("local_datasets"))
    sources = plain(config.get("dataset_sources"))
    problems = [problem for name in names for problem in dataset_problems(name, local, sources)]
    for name, path in local.items():
        if path is not None and not os.path.exists(str(path).replace("{split}", "train")):
            problems.append(f"local_datasets.{name}: {path} does not exist")
    for name, entry in sources.items():
        problems += source_problems(name, entry, local)
    try:
        Mixture(names, plain(config.get("dataset_weights")), plain(config.get("dataset_max_examples")))
    except DataError as err:
        problems.append(str(err))
    problems += list(filter(None, [chat_template_problem(config.model.get("chat_template"))]))
    problems += turn_labelling_problems(config)
    if set(SPLITS) <= set(splits):
        problems += [problem for name in names for problem in shared_file_problems(name, local, sources)]
    return problems


def dataset_problems(name: str, local: Mapping, sources: Mapping) -> List[str]:
    """A dataset name needs a loader function (here or by dotted path), a dataset_sources entry or a local path."""
    try:
        function = dataloader.dataset_function(name)
    except DataError as err:
        return [f"datasets: {err}"]
    if function is not None or name in sources or local.get(name) is not None:
        return []
    builtin = sorted(dataloader.dataset_functions())
    return [f"datasets: unknown dataset '{name}' (available: {', '.join(builtin)}; or set dataset_sources.{name} "
            f"or local_datasets.{name} to a hub dataset or a local file, or name a function as package.module.get_x)"]


def source_problems(name: str, entry, local: Mapping) -> List[str]:
    key = f"dataset_sources.{name}"
    if not isinstance(entry, dict):
        return [f"{key}: expected a mapping with keys {', '.join(SOURCE_KEYS)}, got {entry!r}"]
    problems = [f"{key}.{k}: unknown key (expected one of {', '.join(SOURCE_KEYS)})" for k in entry
                if k not in SOURCE_KEYS]
    if name in dataloader.dataset_functions():
        problems.append(f"{key}: '{name}' is a built-in dataset (get_{name}); point local_datasets.{name} at a "
                        f"mirror of it, or give this source another name")
    path = entry.get("path")
    if path is not None and local.get(name) is not None:
        problems.append(f"{key}.path: local_datasets.{name} is set too; give the path in one place")
    path = path if path is not None else local.get(name)
    if path is None:
        problems.append(f"{key}.path: required: a hub dataset id or a local file or directory")
    elif not (is_hub_id(str(path)) or os.path.exists(str(path).replace("{split}", "train"))):
        problems.append(f"{key}.path: {path} is neither an existing local path nor a hub dataset id (org/name)")
    splits = entry.get("splits") or {}
    if not isinstance(splits, dict) or not all(k in SPLITS and isinstance(v, str) for k, v in splits.items()):
        problems.append(f"{key}.splits: expected a mapping from train/test to the source's split names, got {splits!r}")
    columns = entry.get("columns") or {}
    if not isinstance(columns, dict):
        problems.append(f"{key}.columns: expected a mapping from our fields to the source's columns, got {columns!r}")
    else:
        problems += [f"{key}.columns.{field}: unknown field (expected one of {', '.join(FIELDS)})"
                     for field in columns if field not in FIELDS]
        problems += [f"{key}.columns.{field}: expected a column name or null, got {column!r}"
                     for field, column in columns.items() if column is not None and not isinstance(column, str)]
    fraction = entry.get("test_fraction")
    if fraction is not None and not (isinstance(fraction, float) and 0 < fraction < 1):
        problems.append(f"{key}.test_fraction: expected a fraction strictly between 0 and 1, got {fraction!r}")
    if entry.get("subset") is not None and not isinstance(entry.get("subset"), str):
        problems.append(f"{key}.subset: expected a configuration name, got {entry.get('subset')!r}")
    return problems


def turn_labelling_problems(config: DictConfig) -> List[str]:
    value = config.get("sft_all_assistant_turns")
    if not isinstance(value, bool):
        return [f"sft_all_assistant_turns: expected true or false, got {value!r}"]
    if not value or "dataloader" not in config.loss:
        return []
    try:
        loader = resolve_class(str(config.loss.dataloader), "dataloader")
    except ConfigError:
        return []  # reported by the class check
    if getattr(loader, "labels_prompt_turns", False):
        return []
    return [f"sft_all_assistant_turns: applies to SFT (SFTDataLoader), not to loss.dataloader={config.loss.dataloader}"]


def shared_file_problems(name: str, local: Mapping, sources: Mapping) -> List[str]:
    """A training run must not read one local file as both its train and its test split."""
    entry = sources.get(name) if isinstance(sources.get(name), dict) else {}
    path = entry.get("path") or local.get(name)
    if path is None or entry.get("test_fraction") or is_hub_id(str(path)):
        return []
    splits = entry.get("splits") or {}
    files = {split: split_file(str(path), splits.get(split, split)) for split in SPLITS}
    if files["train"] is None or files["train"] != files["test"]:
        return []
    key = f"dataset_sources.{name}" if name in sources else f"local_datasets.{name}"
    hint = (f"hold part of it out with ++dataset_sources.{name}.test_fraction=0.1, or " if
            name not in dataloader.dataset_functions() else "")
    return [f"{key}: the one file {path} would be both the train and the test split, so evaluation would measure "
            f"training data; {hint}give a directory or a '{{split}}' path with a file per split"]
