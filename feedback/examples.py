"""The feedback data model shared by every data module: messages, `Example` (all feedback for one prompt) and
`Dataset` (Examples keyed by prompt), plus `DataError`.

An Example holds its prompt in one of two forms:

* **conversational** (`prompt_messages`, what the built-in loaders and the row readers produce): the prompt as
  a list of `Message`s and each generation as the bare text of one assistant turn. The dataloader formats them
  with the run's prompt format (the four prefix strings or a chat template, see feedback/prompt_format.py).
* **formatted** (`prompt`, the original's contract for `get_<name>(split, human_prefix, ...)` functions): the
  prompt already formatted, ending with the assistant prefix, and each generation ending with the assistant
  suffix. Such Examples can only be used with the prefix format.
"""
import json
import re
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from typing import Iterator, NamedTuple, Optional, Sequence

from errors import HalosError

EXTRA_SPACES = re.compile(r"[ \t]{2,}")
ROLES = ("system", "user", "assistant")


class DataError(HalosError):
    """A dataset could not be loaded or a row does not have the expected shape."""


class Message(NamedTuple):
    """One turn of a conversation."""
    role: str  # one of ROLES
    content: str


@dataclass
class Example:
    """All feedback collected for one prompt.

    Attributes:
        prompt: the formatted prompt, ending with the assistant prefix (formatted Examples only).
        prompt_messages: the prompt as messages (conversational Examples only), ending with a user turn.
        generations: responses: bare assistant texts (conversational) or formatted texts ending with the
            assistant suffix (formatted).
        sft_index: index into `generations` of the SFT target (negative indices count from the end); None when
            the prompt has no acceptable target (binary feedback that is all undesirable), which SFT skips.
        scores: one score per generation (SHP upvotes; OASST rank, lower is better; reward-model scores), or empty.
        pairs: (i, j) pairs meaning generations[i] is preferred over generations[j].
        desirable: one bool per generation for binary feedback, else empty.
        truncation_mode: 'keep_end' or 'keep_start': which end of the prompt survives truncation.
        dataset_name: the source dataset tag.
        original_prompt: the unformatted instruction (AlpacaEval only).
        source: the configured dataset name the Example was loaded under (set by the dataloader; mixing weights,
            caps and the data report group by it).
        origin: where the Example was read, e.g. "'mine.jsonl' row 3" (named in errors).
    """
    prompt: str = ""
    prompt_messages: list[Message] = field(default_factory=list)
    generations: list[str] = field(default_factory=list)
    sft_index: Optional[int] = -1
    scores: list[float] = field(default_factory=list)
    pairs: list[tuple[int, int]] = field(default_factory=list)
    desirable: list[bool] = field(default_factory=list)
    truncation_mode: str = "keep_end"
    dataset_name: str = ""
    original_prompt: str = ""
    source: str = ""
    origin: str = ""

    def num_generations(self) -> int:
        return len(self.generations)

    @property
    def is_conversational(self) -> bool:
        return bool(self.prompt_messages)

    def describe(self) -> str:
        """Where the Example came from, for error messages."""
        prompt = self.prompt or (self.prompt_messages[-1].content if self.prompt_messages else "")
        where = f"dataset '{self.dataset_name or self.source}'" + (f" {self.origin}" if self.origin else "")
        return f"{where} (prompt {prompt[:60]!r})"

    def remove_extra_spaces(self) -> None:
        """Collapses runs of 2+ spaces/tabs to one space in the texts (newlines kept); role markers are untouched."""
        self.prompt = EXTRA_SPACES.sub(" ", self.prompt)
        self.prompt_messages = [Message(m.role, EXTRA_SPACES.sub(" ", m.content)) for m in self.prompt_messages]
        self.generations = [EXTRA_SPACES.sub(" ", generation) for generation in self.generations]

    def add_pair(self, preferred: str, dispreferred: str) -> None:
        """Appends both responses and the pair saying the first is preferred."""
        first = self.num_generations()
        self.generations += [preferred, dispreferred]
        self.pairs.append((first, first + 1))


def conversation_key(messages: Sequence[Message]) -> str:
    """The Dataset key of a conversational prompt."""
    return json.dumps([[message.role, message.content] for message in messages])


class Dataset:
    """Examples of one dataset keyed by their raw prompt; a new key creates an empty Example.

    Loaders also count what they read: `rows_read` (None when unknown, as for user functions that do not count)
    and `dropped` (reason -> rows), which the dataloader reports at start.
    """

    def __init__(self, name: str):
        self.name = name
        self.data: defaultdict[str, Example] = defaultdict(Example)
        self.rows_read: Optional[int] = None
        self.dropped: Counter = Counter()

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

    def conversation(self, messages: Sequence[Message], origin: str = "") -> Example:
        """The Example of a conversational prompt, created (with `origin`) the first time it is seen."""
        example = self.data[conversation_key(messages)]
        if not example.prompt_messages:
            example.prompt_messages = list(messages)
            example.origin = origin
        return example

    def count_row(self) -> None:
        self.rows_read = (self.rows_read or 0) + 1

    def drop(self, reason: str) -> None:
        """Counts one row that was read and left out, with the reason shown in the data report."""
        self.dropped[reason] += 1

    def require_examples(self, name: str, split: str) -> "Dataset":
        """Self, or DataError if nothing survived filtering; `name` is the dataset's config name."""
        if len(self) == 0:
            raise DataError(f"dataset '{name}' split '{split}' has no examples after filtering")
        return self
