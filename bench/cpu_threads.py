"""Wall-clock training speed of the tiny model on the CPU by intra-op thread count, on an idle and on a busy machine:
the measurement behind distributed.choose_cpu_threads (docs/performance.md).

    .venv/bin/python bench/cpu_threads.py                 # about 1 minute on 2 cores
    .venv/bin/python bench/cpu_threads.py --busy 1 --steps 20

A step is the quick start's: SFT of the tiny Llama on one batch of 8 bundled HH examples (max_length 256): forward,
loss, backward and an RMSprop step. For each condition (the machine as found, then with `--busy` processes that spin
on a core each, as other users' jobs would) the thread counts take steps round-robin, so that changes in the
machine's own load fall on all of them alike; the median and the spread (min-max) of the wall time per step are
reported, with the examples per second of the median and the count `choose_cpu_threads` picks under that load.
"""
import argparse
import multiprocessing
import os
import statistics
import sys
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO_ROOT))
os.environ.update(HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", TRANSFORMERS_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
os.environ.pop("OMP_NUM_THREADS", None)  # the thread count is what this measures

import torch  # noqa: E402
from hydra import compose, initialize_config_dir  # noqa: E402

import distributed  # noqa: E402
import trainers  # noqa: E402
from builders import build_dataloader  # noqa: E402
from configuration import validate_train_config  # noqa: E402
from models import load_causal_lm, load_tokenizer  # noqa: E402
from utils import register_resolvers  # noqa: E402


def spin() -> None:
    while True:
        pass


def sft_step_runner():
    """A function taking one quick-start SFT step on a fixed batch."""
    register_resolvers()
    with initialize_config_dir(config_dir=str(REPO_ROOT / "config"), version_base=None):
        config = compose(config_name="config", overrides=[
            "loss=sft", "model=tiny", "datasets=[hh]", "exp_name=bench", "mode=train", "wandb.enabled=false",
            "n_epochs=null", "n_examples=8", "lr=1e-3"])
    validate_train_config(config, "sft")
    tokenizer = load_tokenizer(config.model)
    batch = next(iter(build_dataloader(config, tokenizer, "train", 8, None, 8)))
    policy = load_causal_lm(config.model, "float32", config.seed)
    trainer = trainers.SFTTrainer(tokenizer, config, None, None, policy)
    optimizer = torch.optim.RMSprop(policy.parameters(), lr=config.lr)

    def step() -> None:
        loss, _ = trainer.get_batch_metrics(batch, "train")
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return step


def measure(step, thread_counts, n_steps: int) -> dict:
    """Wall seconds of each step, per thread count, taken round-robin after one warm-up step each."""
    times = {n: [] for n in thread_counts}
    for n in thread_counts:
        torch.set_num_threads(n)
        step()
    for _ in range(n_steps):
        for n in thread_counts:
            torch.set_num_threads(n)
            start = time.perf_counter()
            step()
            times[n].append(time.perf_counter() - start)
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=15, help="timed steps per thread count and condition")
    parser.add_argument("--busy", type=int, default=1, help="background processes spinning in the busy condition")
    args = parser.parse_args()
    cores = len(os.sched_getaffinity(0))
    thread_counts = sorted({1, cores})
    step = sft_step_runner()
    print(f"{cores} cores, torch {torch.__version__}; {args.steps} steps per cell; batch of 8, tiny Llama")
    print("| condition | load (1 min) | threads | median step (ms) | min-max (ms) | examples/s | auto picks |")
    print("|---|---|---|---|---|---|---|")
    for busy in (0, args.busy):
        spinners = [multiprocessing.Process(target=spin, daemon=True) for _ in range(busy)]
        for process in spinners:
            process.start()
        try:
            time.sleep(2 if busy else 0)
            times = measure(step, thread_counts, args.steps)
            load = os.getloadavg()[0]
        finally:
            for process in spinners:
                process.terminate()
        picked = distributed.cpu_thread_count(cores, load, 1)
        for n in thread_counts:
            median = statistics.median(times[n])
            condition = f"+{busy} spinning process{'es' * (busy > 1)}" if busy else "as found"
            print(f"| {condition} | {load:.1f} | {n} | {1000 * median:.0f} | "
                  f"{1000 * min(times[n]):.0f}-{1000 * max(times[n]):.0f} | {8 / median:.0f} | {picked} |")


if __name__ == "__main__":
    main()
