"""The README's semi-online example, timed: a tiny reward model, then two rounds of sample -> label -> train of DPO on
the tiny model, in a temporary directory; prints the per-round table and the seconds of each phase
(docs/benchmarks.md).

    .venv/bin/python bench/semi_online.py              # about a minute on 2 cores
    .venv/bin/python bench/semi_online.py --loss grpo --rounds 3
"""
import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
REWARD_MODEL = ["loss=bradley-terry", "model=tiny", "datasets=[hh]", "mode=train", "exp_name=tiny_rm",
                "wandb.enabled=false", "n_epochs=null", "n_examples=1024", "lr=1e-3", "warmup_steps=0"]
ROUND_OVERRIDES = ["model=tiny", "wandb.enabled=false", "n_epochs=null", "n_examples=64", "n_eval_examples=8",
                   "warmup_steps=0", "lr=1e-3"]


def timed(command, **kwargs) -> float:
    """Runs `command` from the repository root (its output hidden unless it fails); returns its wall seconds."""
    start = time.perf_counter()
    result = subprocess.run(command, cwd=REPO_ROOT, capture_output=True, text=True, **kwargs)
    if result.returncode != 0:
        sys.exit(result.stderr[-3000:])
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--loss", default="dpo")
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    with tempfile.TemporaryDirectory() as scratch:
        reward_seconds = timed([sys.executable, "train.py", *REWARD_MODEL, f"cache_dir={scratch}"], env=env)
        rounds_dir = Path(scratch) / "semi_online"
        rounds_seconds = timed([sys.executable, "rounds.py", "--dir", str(rounds_dir), "--rounds", str(args.rounds),
                                "--loss", args.loss, "--reward_model", f"{scratch}/tiny_rm/LATEST", "--n_prompts",
                                "32", "--num_samples_per_prompt", "4", "--", *ROUND_OVERRIDES], env=env)
        print((rounds_dir / "summary.md").read_text())
    print(f"wall seconds: reward model {reward_seconds:.1f}, rounds.py {rounds_seconds:.1f}")


if __name__ == "__main__":
    main()
