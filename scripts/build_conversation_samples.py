"""Rebuild the bundled conversational samples from the bundled HH data (data/hh-rlhf); deterministic.

    python scripts/build_conversation_samples.py

It writes real Anthropic HH pairs (MIT, see data/hh-rlhf/LICENSE) in two modern schemas:
  data/hh-rlhf-chat/{train,test}.jsonl             TRL's conversational preference format with an implicit prompt:
                                                   {"chosen": [messages], "rejected": [messages]}; 256/64 pairs
  data/hh-rlhf-ultrafeedback/                      the layout and columns of HuggingFaceH4/ultrafeedback_binarized
                                                   (prompt, prompt_id, chosen, rejected, messages; splits
                                                   train_prefs/test_prefs), from single-turn dialogues; 384/64 pairs.
                                                   HH has no scores, so the score columns are left out.
"""
import gzip
import hashlib
import json
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from feedback_datasets import get_hh_harmless  # noqa: E402

CHAT_DIR = REPO / "data" / "hh-rlhf-chat"
ULTRAFEEDBACK_DIR = REPO / "data" / "hh-rlhf-ultrafeedback"
CHAT_ROWS = {"train": 256, "test": 64}
ULTRAFEEDBACK_ROWS = {"train": 384, "test": 64}
ULTRAFEEDBACK_CARD = """---
configs:
- config_name: default
  data_files:
  - split: train_prefs
    path: data/train_prefs-*
  - split: test_prefs
    path: data/test_prefs-*
---

# Anthropic HH pairs in UltraFeedback-binarized's layout

Single-turn dialogues of the bundled Anthropic HH sample (`data/hh-rlhf`, MIT licence, Copyright (c) 2022
Anthropic) with the columns and splits of `HuggingFaceH4/ultrafeedback_binarized` (no score columns: HH has no
scores), so that `datasets=[ultrafeedback]` can be tried offline (`scripts/build_conversation_samples.py`).
"""
CHAT_CARD = """# Anthropic HH pairs as conversations

Pairs of the bundled Anthropic HH sample (`data/hh-rlhf`, MIT licence, Copyright (c) 2022 Anthropic) in TRL's
conversational preference format with an implicit prompt: each row's `chosen` and `rejected` are whole
conversations that differ only in their final assistant turn (`scripts/build_conversation_samples.py`).
"""


def pairs(split: str):
    """(prompt messages, chosen, rejected) of every pair of the bundled HH split, in file order."""
    for example in get_hh_harmless(split, local_path=str(REPO / "data" / "hh-rlhf")).data.values():
        if example.prompt_messages[-1].role != "user":
            continue  # a few dialogues have two assistant turns in a row
        messages = [{"role": m.role, "content": m.content} for m in example.prompt_messages]
        for i, j in example.pairs:
            yield messages, example.generations[i], example.generations[j]


def conversation(messages: list, response: str) -> list:
    return messages + [{"role": "assistant", "content": response}]


def write_lines(path: Path, rows: list) -> None:
    text = "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows).encode("utf-8")
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.suffix == ".gz":
        # mtime=0 keeps the gzip bytes identical across rebuilds.
        with open(path, "wb") as raw, gzip.GzipFile(fileobj=raw, mode="wb", mtime=0) as handle:
            handle.write(text)
    else:
        path.write_bytes(text)


def main() -> None:
    for split in ("train", "test"):
        all_pairs = list(pairs(split))
        chat = [{"chosen": conversation(m, c), "rejected": conversation(m, r)}
                for m, c, r in all_pairs[:CHAT_ROWS[split]]]
        write_lines(CHAT_DIR / f"{split}.jsonl", chat)
        single_turn = [(m, c, r) for m, c, r in all_pairs if len(m) == 1][:ULTRAFEEDBACK_ROWS[split]]
        ultrafeedback = [{"prompt": m[0]["content"], "prompt_id": hashlib.sha256(m[0]["content"].encode()).hexdigest(),
                          "chosen": conversation(m, c), "rejected": conversation(m, r), "messages": conversation(m, c)}
                         for m, c, r in single_turn]
        write_lines(ULTRAFEEDBACK_DIR / "data" / f"{split}_prefs-00000-of-00001.jsonl.gz", ultrafeedback)
    (CHAT_DIR / "README.md").write_text(CHAT_CARD)
    (ULTRAFEEDBACK_DIR / "README.md").write_text(ULTRAFEEDBACK_CARD)
    print(f"wrote {CHAT_DIR} and {ULTRAFEEDBACK_DIR}")


if __name__ == "__main__":
    main()
