"""How far each loss's training moves when the same global batches are split differently: 1 vs 2 processes (FSDP over
gloo) and 4 x 1 vs 1 x 4 gradient accumulation (2 x 2 for KTO, whose KL rows need batches of at least 2).

    .venv/bin/python bench/invariance.py                      # every paired/unpaired loss, float64 and float32
    .venv/bin/python bench/invariance.py --losses dpo kto --dtypes float32

Each run is the test suite's recorded run (tests/distributed_worker.py: tiny model, 4 optimizer steps of 4 examples
for processes, 2 steps for accumulation, lr 1e-4, RMSprop); the table gives the largest absolute difference of the
per-step train loss and of the final weights. tests/test_distributed.py asserts the float64 runs within 1e-5.
"""
import argparse
import sys
import tempfile
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(REPO_ROOT), str(REPO_ROOT / "tests")]

import distributed  # noqa: E402
import distributed_worker as worker  # noqa: E402
from utils import register_resolvers  # noqa: E402

LOSSES = ("dpo", "cdpo", "rdpo", "ipo", "simpo", "orpo", "slic", "hinge", "nca", "apo-zero", "apo-down", "sppo-hard",
          "dpo-norm", "bco-pair", "kto", "kto-zero", "bco")


def dtype_overrides(dtype: str):
    return (f"model.policy_dtype={dtype}", f"model.reference_dtype={dtype}")


def two_process_runs(cache_dir: Path, losses, dtypes) -> None:
    """Rank 0 and 1 of one process group train every (loss, dtype) run."""
    register_resolvers()
    for dtype in dtypes:
        for loss in losses:
            worker.run_recorded(loss, f"{loss}-{dtype}-2", cache_dir, dtype_overrides(dtype))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--losses", nargs="+", default=list(LOSSES), choices=LOSSES)
    parser.add_argument("--dtypes", nargs="+", default=["float64", "float32"], choices=["float64", "float32"])
    args = parser.parse_args()
    register_resolvers()
    rows = []
    with tempfile.TemporaryDirectory() as directory:
        cache_dir = Path(directory)
        distributed.spawn(two_process_runs, (cache_dir, args.losses, args.dtypes), n_processes=2)
        for dtype in args.dtypes:
            for loss in args.losses:
                one = worker.run_recorded(loss, f"{loss}-{dtype}-1", cache_dir, dtype_overrides(dtype)).parent
                processes = worker.compare_runs(one, cache_dir / f"{loss}-{dtype}-2")
                shapes = [(4, 1), (2, 2)] if loss == "kto" else [(4, 1), (1, 4)]
                split = [worker.run_recorded(loss, f"{loss}-{dtype}-{b}x{a}", cache_dir, (
                    *dtype_overrides(dtype), "n_examples=8", f"model.batch_size={b}",
                    f"model.gradient_accumulation_steps={a}", "do_first_eval=false")).parent for b, a in shapes]
                accumulation = worker.compare_runs(*split)
                rows.append((loss, dtype, processes, accumulation, f"{shapes[1][0]}x{shapes[1][1]}"))
    print("| loss | dtype | 1 vs 2 processes: loss | weights | 4x1 vs split: loss | weights |")
    print("|---|---|---:|---:|---:|---:|")
    for loss, dtype, processes, accumulation, split in rows:
        print(f"| {loss} | {dtype} | {processes['max |diff| loss/train']:.1e} | {processes['max |diff| weights']:.1e} "
              f"| {accumulation['max |diff| loss/train']:.1e} ({split}) | {accumulation['max |diff| weights']:.1e} |")


if __name__ == "__main__":
    main()
