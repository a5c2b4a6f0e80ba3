"""Feedback rows of any named source (`dataset_sources.<name>`, `local_datasets.<name>`) turned into Examples.

A row (after the source's column mapping) has one of four schemas, each in TRL's standard form (strings) or
conversational form (lists of `{"role", "content"}` messages, roles system/user/assistant):

* paired feedback: `prompt`, `chosen`, `rejected`;
* binary feedback: `prompt`, `completion`, `label` (true/1 = desirable);
* scored feedback: `prompt`, `completion`, `score` (a number, higher is better); the rows of one prompt form its
  group of scored responses (GRPO's group, label.py's output);
* a demonstration (SFT): `prompt` and `completion` without a label, or `messages`, a whole conversation.

`prompt` is a string (one user turn) or messages ending with a user turn; a response is a string or a list holding
the one assistant message. With message lists the prompt may be implicit: without `prompt`, each response (and
`messages`) is a whole conversation whose last message is the assistant's response and whose earlier messages,
the same in `chosen` and `rejected`, are the prompt. Rows with the same prompt are merged into one Example.

Paired rows add a pair (chosen first). Binary rows and demonstrations add their completion and fill `desirable`;
once an Example has binary feedback, `desirable` covers all its generations (chosen ones count as desirable,
rejected ones as undesirable). A prompt's scored rows give every one of its generations a score, so they cannot be
mixed with other kinds of feedback for the same prompt. The SFT target is the first chosen response, else the first
desirable completion, else the best-scored one, else None (SFT skips the prompt). Text is kept verbatim (no space normalisation, so code indentation survives).
"""
import hashlib
import math
from typing import Any, Optional

from tqdm import tqdm

from feedback.examples import ROLES, DataError, Dataset, Example, Message, conversation_key
from feedback.sources import SourceSpec, read_source

FIELDS = ("prompt", "chosen", "rejected", "completion", "label", "score", "messages")
PAIRED, BINARY, SCORED, DEMONSTRATION = "paired", "binary", "scored", "demonstration"


def load_source(spec: SourceSpec, split: str) -> Dataset:
    """The Examples of one split of a named source; any malformed row is a DataError naming its file and row."""
    data = Dataset(spec.name)
    for where, row in tqdm(read_source(spec, split), desc=f"Reading {spec.name}/{split}"):
        data.count_row()
        add_row(data, mapped_fields(row, spec, where), where, split, spec.test_fraction)
    if data.rows_read is None:
        raise DataError(f"{spec.config_key}: '{spec.path}' has no rows for split '{split}'; expected at least one "
                        f"feedback row")
    for example in data.data.values():
        example.dataset_name = spec.name
        example.sft_index = sft_index(example)
    return data.require_examples(spec.name, split)


def mapped_fields(row: Any, spec: SourceSpec, where: str) -> dict:
    """Our field -> value for the fields a row has, read through the source's column mapping (None values count
    as absent, as columnar files fill a row's missing fields with nulls)."""
    if not isinstance(row, dict):
        raise DataError(f"{where}: row is a {type(row).__name__}; expected a JSON object")
    fields = {}
    for name in FIELDS:
        column = spec.columns.get(name, name)
        if column is None:
            continue
        if column not in row and name in spec.columns:
            raise DataError(f"{where}: no column '{column}' ({spec.config_key}.columns.{name}); the row has "
                            f"{', '.join(map(str, row)) or 'no columns'}")
        if row.get(column) is not None:
            fields[name] = row[column]
    return fields


def add_row(data: Dataset, fields: dict, where: str, split: str, test_fraction: Optional[float]) -> None:
    """Adds one row's feedback to the Example of its prompt (rows outside a test_fraction split are dropped)."""
    kind = row_kind(fields, where)
    if kind == PAIRED:
        prompt, (chosen, rejected) = prompt_and_responses(fields, ("chosen", "rejected"), where)
    elif kind == BINARY:
        prompt, (completion,) = prompt_and_responses(fields, ("completion",), where)
        label = require_label(fields["label"], where)
    elif kind == SCORED:
        prompt, (completion,) = prompt_and_responses(fields, ("completion",), where)
        score = require_score(fields["score"], where)
    else:
        prompt, (completion,) = prompt_and_responses(fields, ("messages" if "messages" in fields else "completion",),
                                                     where)
        label = True
    if test_fraction and is_held_out(prompt, test_fraction) != (split == "test"):
        data.drop("in the held-out test split" if split == "train" else "not in the held-out test fraction")
        return
    example = data.conversation(prompt, where)
    if example.num_generations() and (kind == SCORED) != bool(example.scores):
        raise DataError(f"{where}: this prompt has both scored and other feedback rows; a prompt's scored rows must "
                        f"score every one of its responses")
    if kind == PAIRED:
        example.add_pair(chosen, rejected)
        if example.desirable:
            example.desirable += [True, False]
    elif kind == SCORED:
        example.generations.append(completion)
        example.scores.append(score)
    else:
        add_labelled_completion(example, completion, label)


def row_kind(fields: dict, where: str) -> str:
    paired = "chosen" in fields or "rejected" in fields
    binary = "label" in fields
    scored = "score" in fields
    demonstration = "messages" in fields or ("completion" in fields and not binary and not scored)
    if paired + binary + scored + demonstration != 1:
        problem = "has none" if not (paired or binary or scored or demonstration) else "mixes more than one"
        raise DataError(f"{where}: row {problem} of the schemas paired ('chosen', 'rejected'), binary "
                        f"('completion', 'label'), scored ('completion', 'score') and demonstration ('completion' "
                        f"without 'label' or 'score', or 'messages'); expected exactly one")
    return PAIRED if paired else BINARY if binary else SCORED if scored else DEMONSTRATION


def prompt_and_responses(fields: dict, names: tuple[str, ...], where: str) -> tuple[list[Message], list[str]]:
    """The prompt messages and the text of each named response field, from an explicit or implicit prompt."""
    for name in names:
        if name not in fields:
            raise DataError(f"{where}: missing field '{name}'; expected a string or a list of messages")
    if "prompt" in fields:
        if "messages" in names:
            raise DataError(f"{where}: field 'messages' holds a whole conversation; drop 'prompt' or use "
                            f"'completion' for the response")
        return parse_prompt(fields["prompt"], where), [parse_response(fields[name], name, where) for name in names]
    conversations = [split_conversation(fields[name], name, where) for name in names]
    prompt = conversations[0][0]
    for name, (other, _) in zip(names[1:], conversations[1:]):
        if other != prompt:
            raise DataError(f"{where}: fields '{names[0]}' and '{name}' differ before their final assistant turn; "
                            f"with an implicit prompt they must share every earlier message")
    return prompt, [response for _, response in conversations]


def parse_prompt(value: Any, where: str) -> list[Message]:
    if isinstance(value, str):
        if not value.strip():
            raise DataError(f"{where}: field 'prompt' is empty; expected the user's text")
        return [Message("user", value)]
    messages = parse_messages(value, "prompt", where)
    if messages[-1].role != "user":
        raise DataError(f"{where}: the last prompt message has role '{messages[-1].role}'; expected 'user'")
    return messages


def parse_response(value: Any, name: str, where: str) -> str:
    """A response given as a string, or as a list holding exactly one assistant message."""
    if isinstance(value, str):
        return value
    messages = parse_messages(value, name, where)
    if len(messages) != 1 or messages[0].role != "assistant":
        roles = ", ".join(message.role for message in messages)
        raise DataError(f"{where}: field '{name}' holds messages with roles [{roles}]; with an explicit prompt a "
                        f"response is one assistant message (or leave 'prompt' out for whole conversations)")
    return messages[0].content


def split_conversation(value: Any, name: str, where: str) -> tuple[list[Message], str]:
    """(prompt messages, final assistant text) of a whole conversation."""
    if isinstance(value, str):
        raise DataError(f"{where}: missing field 'prompt'; field '{name}' is a string, so the prompt cannot be "
                        f"implicit (that needs lists of messages)")
    messages = parse_messages(value, name, where)
    if messages[-1].role != "assistant":
        raise DataError(f"{where}: field '{name}' has no final assistant turn (its last message has role "
                        f"'{messages[-1].role}'); expected a conversation ending with the assistant's response")
    prompt = messages[:-1]
    if not prompt or prompt[-1].role != "user":
        before = f"role '{prompt[-1].role}'" if prompt else "nothing"
        raise DataError(f"{where}: field '{name}': the final assistant turn follows {before}; expected a user turn")
    return prompt, messages[-1].content


def parse_messages(value: Any, name: str, where: str) -> list[Message]:
    if not isinstance(value, list):
        raise DataError(f"{where}: field '{name}' is a {type(value).__name__}; expected a string or a list of "
                        f"messages")
    if not value:
        raise DataError(f"{where}: field '{name}' is an empty list; expected messages")
    return [parse_message(message, f"{where}: {name} message {number}")
            for number, message in enumerate(value, start=1)]


def parse_message(message: Any, where: str) -> Message:
    if not isinstance(message, dict):
        raise DataError(f"{where} is a {type(message).__name__}; expected an object with 'role' and 'content'")
    role = message.get("role")
    if role not in ROLES:
        raise DataError(f"{where}: unknown role {role!r}; expected one of {', '.join(ROLES)}")
    content = message.get("content")
    if not isinstance(content, str):
        problem = "missing field 'content'" if content is None else f"field 'content' is a {type(content).__name__}"
        raise DataError(f"{where}: {problem}; expected a string")
    return Message(role, content)


def require_label(label: Any, where: str) -> bool:
    if isinstance(label, bool) or (type(label) is int and label in (0, 1)):
        return bool(label)
    raise DataError(f"{where}: field 'label' is {label!r}; expected true/false or 1/0")


def require_score(score: Any, where: str) -> float:
    if isinstance(score, (int, float)) and not isinstance(score, bool) and math.isfinite(score):
        return float(score)
    raise DataError(f"{where}: field 'score' is {score!r}; expected a finite number")


def is_held_out(prompt: list[Message], fraction: float) -> bool:
    """Whether a prompt belongs to the held-out test fraction: a hash of its text, so every run agrees."""
    digest = hashlib.blake2b(conversation_key(prompt).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") < fraction * 2 ** 64


def add_labelled_completion(example: Example, completion: str, desirable: bool) -> None:
    if not example.desirable:
        # Earlier generations came from pairs: their desirability follows from the pairs.
        chosen = {preferred for preferred, _ in example.pairs}
        example.desirable = [index in chosen for index in range(example.num_generations())]
    example.generations.append(completion)
    example.desirable.append(desirable)


def sft_index(example: Example) -> Optional[int]:
    if example.pairs:
        return example.pairs[0][0]
    if example.scores:
        return max(range(example.num_generations()), key=example.scores.__getitem__)
    return next((index for index, desirable in enumerate(example.desirable) if desirable), None)
