"""Response lengths for the results line and the length-controlled win rate: tokens of the run's tokenizer, or
characters.

The run's tokenizer is the one training saved in `config.local_run_dir`. That path is usually relative to the
directory train.py ran in, so it is looked up from the working directory and then from each directory above the
sample file (samples/<run>.json sits in the directory train.py ran in): compare.py works from anywhere without
`--tokenizer`. It is never looked up on the hub.
"""

from pathlib import Path

from errors import HalosError

LENGTH_UNITS = ("tokens", "characters")


def run_directory(local_run_dir: str | None, sample_file: Path) -> Path | None:
    """The existing directory `local_run_dir` names: as given, else below a directory above the sample file."""
    if not local_run_dir:
        return None
    given = Path(local_run_dir)
    candidates = [given] if given.is_absolute() else [given, *(parent / given for parent in
                                                              sample_file.resolve().parents)]
    return next((path for path in candidates if path.is_dir()), None)


def load_tokenizer(name_or_path: str | None, config: dict, sample_file: Path):
    """The tokenizer that counts response lengths: `--tokenizer`, else the run's own."""
    if name_or_path is None:
        found = run_directory(config.get("local_run_dir"), sample_file)
        if found is None:
            raise HalosError(f"sample config.local_run_dir {config.get('local_run_dir')!r} is not a directory "
                             f"(looked in the working directory and above {str(sample_file)!r}); pass "
                             "--tokenizer, or --length_unit characters")
        name_or_path = str(found)
    from transformers import AutoTokenizer  # slow import, only needed once the inputs are valid

    try:
        return AutoTokenizer.from_pretrained(name_or_path)
    except (OSError, ValueError) as error:
        raise HalosError(f"cannot load tokenizer {name_or_path!r}: {' '.join(str(error).split())}") from None


def response_lengths(texts_by_side: dict[str, list[str]], unit: str, tokenizer_name: str | None, config: dict,
                     sample_file: Path) -> dict[str, list[int]]:
    """Length of every text, per side: `tokenizer.encode` (with special tokens, as the original) or characters."""
    if unit == "characters":
        return {side: [len(text) for text in texts] for side, texts in texts_by_side.items()}
    tokenizer = load_tokenizer(tokenizer_name, config, sample_file)
    return {side: [len(tokenizer.encode(text)) for text in texts] for side, texts in texts_by_side.items()}
