"""The command line before Hydra sees it: `--help`, and overrides that Hydra would reject with a multi-line error.

Hydra refuses a plain `key=value` whose key the composed config lacks ("Could not override 'n_exampels' ... Key
'n_exampels' is not in struct"), and a missing or misspelt config group choice (`loss=dpoo`) with a list of options.
Here a plain override becomes `++key=value` (set the key, or add it), so that an unknown key reaches the config check
(configuration.py), which reports it on one line with a "did you mean", together with every other problem; group
choices are checked against the files in config/.
"""
import difflib
import sys
from pathlib import Path
from typing import Callable, Dict, Iterable, List, Optional, Sequence

from errors import ConfigError, HalosError
from utils import REPO_ROOT

CONFIG_DIR = REPO_ROOT / "config"
REQUIRED_GROUPS = ("loss", "model")  # the `???` entries of config/config.yaml's defaults list
HELP_FLAGS = ("-h", "--help")


def override_key(override: str) -> str:
    """The dotted key of a Hydra override: `++model.batch_size=4` -> `model.batch_size`."""
    return override.lstrip("+~").split("=", 1)[0]


def is_override(arg: str) -> bool:
    """Hydra overrides are the `key=value` arguments that are not flags (`--config-path=DIR`, `-m`)."""
    return "=" in arg and not arg.startswith("-")


def search_dirs(args: Iterable[str]) -> List[Path]:
    """The directories of a `hydra.searchpath=[file://DIR,...]` override (users' own config trees)."""
    found = []
    for arg in filter(is_override, args):
        if override_key(arg) == "hydra.searchpath":
            value = arg.split("=", 1)[1].strip("[]")
            found += [Path(item.strip().removeprefix("file://")) for item in value.split(",") if item.strip()]
    return found


def group_options(config_dirs: Sequence[Path]) -> Dict[str, List[str]]:
    """Config group name -> its option names (YAML files), over config/ and the search directories."""
    options: Dict[str, set] = {}
    for config_dir in config_dirs:
        for group in (p for p in config_dir.iterdir() if p.is_dir()) if config_dir.is_dir() else ():
            options.setdefault(group.name, set()).update(p.stem for p in group.glob("*.yaml"))
    return {group: sorted(names) for group, names in options.items()}


def widen_overrides(args: Sequence[str], groups: Iterable[str]) -> List[str]:
    """`args` with each plain `key=value` override turned into `++key=value`, except config group choices
    (`loss=dpo`, `hydra/job_logging=...`) and Hydra's own `hydra.*` keys. `++` sets an existing key exactly as a
    plain override does."""
    groups = set(groups)

    def widened(arg: str) -> str:
        if not is_override(arg) or arg[0] in "+~":
            return arg
        key = override_key(arg)
        if key in groups or "/" in key or key.split(".")[0] == "hydra":
            return arg
        return "++" + arg

    return [widened(arg) for arg in args]


def group_choice_problems(args: Sequence[str], options: Dict[str, List[str]]) -> List[str]:
    """One line for each required group without a choice and each choice without a YAML file."""
    chosen = {override_key(arg): arg.split("=", 1)[1] for arg in args if is_override(arg) and arg[0] not in "+~"}
    problems = []
    for group in REQUIRED_GROUPS:
        if group not in chosen:
            problems.append(f"{group}: required (pass {group}=NAME, one of: {', '.join(options.get(group, []))})")
    sweep = any(arg in ("-m", "--multirun") for arg in args)
    for group, value in chosen.items():
        if group not in options or (sweep and "(" in value):  # a sweep function (glob(...), choice(...)): Hydra's
            continue
        for choice in value.split(",") if sweep else [value]:  # -m loss=dpo,kto sweeps over both
            if choice not in options[group]:
                close = difflib.get_close_matches(choice, options[group], n=1)
                hint = f"did you mean {close[0]}? " if close else ""
                problems.append(f"{group}: no config/{group}/{choice}.yaml ({hint}available: "
                                f"{', '.join(options[group])})")
    return problems


def prepare_train_argv(argv: Sequence[str]) -> List[str]:
    """train.py's argv for Hydra (see the module docstring); raises ConfigError for missing or unknown group
    choices. `--help` is handled by the caller before this."""
    args = list(argv[1:])
    options = group_options([CONFIG_DIR, *search_dirs(args)])
    problems = group_choice_problems(args, options)
    if problems:
        raise ConfigError.listing(problems)
    return [argv[0], *widen_overrides(args, options)]


def start(main: Callable[[], None], prepare_argv: Callable[[List[str]], List[str]],
          help_text: Optional[str] = None) -> None:
    """An entry point's `__main__`: `--help` prints `help_text` (when given), else sys.argv goes through
    `prepare_argv` (a HalosError is one line on stderr and exit status 1) and on to the Hydra `main`."""
    if help_text is not None and set(HELP_FLAGS) & set(sys.argv[1:]):
        print(help_text)
        sys.exit(0)
    try:
        sys.argv = prepare_argv(sys.argv)
    except HalosError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)
    main()


def train_help(usage: str) -> str:
    """train.py --help: its docstring and the losses and model presets to choose from."""
    options = group_options([CONFIG_DIR])
    presets = [name for name in options["model"] if name != "base_model"]  # what every preset inherits
    return (f"{usage.strip()}\n\nloss=   {' '.join(options['loss'])}\nmodel=  {' '.join(presets)}\n\n"
            "Every other key is listed, with its default and a comment, in config/config.yaml and\n"
            "config/model/base_model.yaml (README: Configuration reference). Hydra's own options: --hydra-help.")
