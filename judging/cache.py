"""The judgments file: an append-only JSONL log of finished judge requests that doubles as their cache.

Each line is one request's transcript, keyed by `judging.engine.request_key` (a hash of the judge model, the
template and the exact messages, which hold both texts in the order shown, and the seed):

    {"key": "3f2a...", "judge": "gpt-4-0613", "template": "halos-binary-v1", "request": {...the request body...},
     "judge_output": "Response 2", "error": null, "attempts": 1, "prompt_tokens": 212, "completion_tokens": 3,
     "index": 4, "shown": ["chosen", "policy"]}

A request whose key has a record without error is never sent again, whatever else changed: a rerun with the same
settings costs nothing, and a re-made sample file gets fresh judgments for exactly the texts that changed.
`index` and `shown` say where the request came from, for reading the file; they are not part of the key.
"""

import json
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

from errors import HalosError
from judging.engine import ChatReply, ChatRequest

RECORD_FIELDS = ("key", "judge", "judge_output", "error", "attempts")


def drop_partial_last_line(path: Path) -> None:
    """Remove a trailing line cut short by a crash, so later appends start on a fresh line."""
    data = path.read_bytes()
    if not data or data.endswith(b"\n"):
        return
    start = data.rfind(b"\n") + 1
    try:
        json.loads(data[start:])
    except ValueError:
        with path.open("r+b") as handle:
            handle.truncate(start)
        return
    with path.open("ab") as handle:  # a complete record that only lacks its newline
        handle.write(b"\n")


def parse_record(line: str, where: str) -> dict:
    """One judgments-file record, checked for the fields the cache and the summary read."""
    try:
        record = json.loads(line)
    except ValueError:
        raise HalosError(f"{where} is not a JSON line; fix or remove the judgments file") from None
    if isinstance(record, dict) and "key" not in record and "verdict" in record:
        raise HalosError(f"{where} is a judgment without a request key, from an earlier compare.py that could "
                         "not tell re-made samples apart; delete the file or pass another --judgments_file")
    if not isinstance(record, dict) or any(name not in record for name in RECORD_FIELDS):
        raise HalosError(f"{where} is not a judgment record (needs {', '.join(RECORD_FIELDS)})")
    if not isinstance(record["key"], str) or not isinstance(record["attempts"], int):
        raise HalosError(f"{where}: 'key' must be a string and 'attempts' an integer")
    if (record["judge_output"] is None) == (record["error"] is None):
        raise HalosError(f"{where}: exactly one of 'judge_output' and 'error' must be set")
    return record


def reply_record(key: str, judge: str, request: ChatRequest, reply: ChatReply, **context) -> dict:
    """The judgments-file line for one finished request; `context` (index, shown) is for readers only."""
    return {"key": key, "judge": judge, "template": request.template, "request": request.body(judge),
            "judge_output": reply.text, "error": reply.error,
            "attempts": reply.attempts, "prompt_tokens": reply.prompt_tokens,
            "completion_tokens": reply.completion_tokens, **context}


class JudgmentCache:
    """The records of a judgments file by key: a successful record wins over errors, the latest over earlier."""

    def __init__(self, path: Path):
        self.path = path
        self.records: dict[str, dict] = {}
        if path.exists():
            drop_partial_last_line(path)
            with path.open(encoding="utf-8") as handle:
                for line_number, line in enumerate(handle, start=1):
                    self._keep(parse_record(line, f"{path}:{line_number}"))

    def _keep(self, record: dict) -> None:
        earlier = self.records.get(record["key"])
        if earlier is None or earlier["error"] is not None or record["error"] is None:
            self.records[record["key"]] = record

    def answered(self, key: str) -> bool:
        """Whether the request with this key has a reply (so it need not be sent again)."""
        record = self.records.get(key)
        return record is not None and record["error"] is None

    @contextmanager
    def appending(self) -> Iterator[Callable[[dict], None]]:
        """A function that appends one record to the file, flushed at once (a crash loses at most that line)."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with self.path.open("a", encoding="utf-8") as handle:

            def append(record: dict) -> None:
                handle.write(json.dumps(record, ensure_ascii=False) + "\n")
                handle.flush()
                self._keep(record)

            yield append
