"""Shared fixtures. Every test runs offline: the hub is never contacted."""
import os
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parent.parent
os.environ.update(HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", TRANSFORMERS_OFFLINE="1",
                  TOKENIZERS_PARALLELISM="false", WANDB_SILENT="true")
# One intra-op thread in this process and every process a test starts. The tests compare runs bit for bit (a run
# with its resumed copy, a CLI run with an in-process one), and a kernel's float sums are split by thread count,
# which train.py otherwise picks from the machine's load (distributed.choose_cpu_threads).
os.environ.setdefault("OMP_NUM_THREADS", "1")

from hydra import compose, initialize_config_dir  # noqa: E402

from utils import register_resolvers  # noqa: E402

register_resolvers()
TINY_MODEL_DIR = REPO_ROOT / "assets" / "tiny-llama"


@pytest.fixture
def compose_config():
    """Composes the real Hydra config tree with command-line style overrides."""
    def _compose(*overrides: str):
        with initialize_config_dir(config_dir=str(REPO_ROOT / "config"), version_base=None):
            return compose(config_name="config", overrides=list(overrides))
    return _compose


@pytest.fixture
def tiny_tokenizer():
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(TINY_MODEL_DIR)
    tokenizer.pad_token_id = tokenizer.eos_token_id
    return tokenizer
