"""Scored-feedback files for tests: groups of responses to real HH prompts, each response scored, in the scored row
schema (`prompt`, `completion`, `score`) that train.py reads as a local dataset; and a tiny reward model."""
import gzip
import json
import random
from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

from models import RewardModel
from utils import REPO_ROOT

TINY_MODEL_DIR = REPO_ROOT / "assets" / "tiny-llama"
HH_TRAIN = REPO_ROOT / "data" / "hh-rlhf" / "harmless-base" / "train.jsonl.gz"


def hh_conversations(count: int):
    """The first `count` HH (chosen, rejected) texts of the bundled sample whose first turn is a human one."""
    with gzip.open(HH_TRAIN, "rt") as handle:
        for line, _ in zip(handle, range(count)):
            yield json.loads(line)


def scored_rows(row: dict, rng: random.Random):
    """Three scored responses to the row's first human turn: its chosen and rejected replies and a shortened
    chosen one, scored with some noise so that no two groups are alike."""
    def first_reply(text: str) -> tuple:
        human, _, rest = text.partition("\n\nAssistant:")
        return human.replace("\n\nHuman:", "").strip(), rest.split("\n\nHuman:")[0].strip()

    prompt, chosen = first_reply(row["chosen"])
    _, rejected = first_reply(row["rejected"])
    responses = [(chosen, 2.0), (rejected, 0.0), (" ".join(chosen.split()[:6]), 1.0)]
    return [{"prompt": prompt, "completion": text or "...", "score": round(score + rng.random(), 3)}
            for text, score in responses]


def write_scored_dataset(directory: Path, n_train: int = 40, n_test: int = 8, seed: int = 0) -> Path:
    """`directory` with train.jsonl and test.jsonl of scored groups (3 responses per prompt)."""
    rng = random.Random(seed)
    directory.mkdir(parents=True, exist_ok=True)
    rows = list(hh_conversations(n_train + n_test))
    for split, part in (("train", rows[:n_train]), ("test", rows[n_train:])):
        with open(directory / f"{split}.jsonl", "w") as handle:
            for row in part:
                for scored in scored_rows(row, rng):
                    handle.write(json.dumps(scored) + "\n")
    return directory


def write_tiny_reward_model(directory: Path) -> Path:
    """`directory` holding a sequence classifier around the tiny LM (seeded random weights and head) and its
    tokenizer: a reward model label.py can load."""
    tokenizer = AutoTokenizer.from_pretrained(TINY_MODEL_DIR)
    torch.manual_seed(0)
    reward_model = RewardModel(AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(TINY_MODEL_DIR)))
    reward_model.classifier.config.pad_token_id = tokenizer.eos_token_id
    reward_model.classifier.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory
