"""Step time of every loss on the tiny model (`model=tiny` defaults: batch 8, max_length 256, float32, CPU).

    .venv/bin/python bench/loss_step_time.py          # about 1 minute on 2 cores

Each loss is built as train.py builds it (config, tokenizer, dataloaders, models, trainer) and runs the training
loop's per-batch work on the bundled HH sample: the trainer's passes over the batch (get_batch_metrics + backward;
PPO adds its rollout) and the optimizer step. One warm-up batch, then `--batches` timed ones; the median is
reported, in CPU milliseconds of this process with one intra-op thread, so that other processes on a shared machine
do not inflate it (bench/train_throughput.py explains why). Losses with a reference model are also timed with
cache_reference_logprobs=true (the cache is filled during the warm-up batch, which replays every batch of the run).
"""
import argparse
import os
import statistics
import sys
import tempfile
import time
import warnings
from collections import defaultdict
from pathlib import Path
from typing import List, Optional

REPO_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO_ROOT))
os.environ.update(HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", TRANSFORMERS_OFFLINE="1", TOKENIZERS_PARALLELISM="false")

import torch  # noqa: E402
from hydra import compose, initialize_config_dir  # noqa: E402

import distributed  # noqa: E402
from builders import build_dataloader, build_models  # noqa: E402
from configuration import validate_train_config  # noqa: E402
from models import control_tokens, load_tokenizer  # noqa: E402
from resolve import resolve_class  # noqa: E402
from utils import register_resolvers  # noqa: E402

LOSSES = tuple(sorted(path.stem for path in (REPO_ROOT / "config" / "loss").glob("*.yaml")))


def build_trainer(loss: str, n_batches: int, cached: bool, cache_dir: str):
    """The trainer train.py would build for `loss` on the tiny model, over n_batches training batches."""
    with initialize_config_dir(config_dir=str(REPO_ROOT / "config"), version_base=None):
        config = compose(config_name="config", overrides=[
            f"loss={loss}", "model=tiny", "datasets=[hh]", "exp_name=bench", "mode=train", "wandb.enabled=false",
            f"cache_dir={cache_dir}", f"cache_reference_logprobs={str(cached).lower()}"])
    validate_train_config(config, loss)
    batch_size = config.model.batch_size
    tokenizer = load_tokenizer(config.model, control_tokens(config.loss))
    train_loader = build_dataloader(config, tokenizer, "train", batch_size, None, n_batches * batch_size)
    trainer_cls = resolve_class(config.loss.trainer, "trainers")
    policy, reference = build_models(config, torch.device("cpu"), len(tokenizer), trainer_cls.wrap_policy)
    return trainer_cls(tokenizer, config, train_loader, None, policy, reference)


def step_times(trainer) -> List[float]:
    """CPU seconds of each batch after the first: the train loop's work on it (prepare_step, the trainer's passes,
    backward, metric gathering, clipping, the optimizer step and any loss state), without logging or evaluation."""
    config = trainer.config
    trainer.optimizer = getattr(torch.optim, config.optimizer)(trainer.policy.parameters(), lr=config.lr)
    trainer.scheduler = torch.optim.lr_scheduler.LambdaLR(trainer.optimizer, lambda step: 1.0)
    times = []
    for batch in trainer.train_iterator:
        start = time.process_time()
        local_batch = distributed.slice_batch_for_rank(batch, 0, 1, trainer.device)
        trainer.prepare_step([local_batch])
        trainer.train_on_batch(local_batch, defaultdict(list), pending=0)
        times.append(time.process_time() - start)
    return times[1:]


def parse_args(argv: Optional[List[str]] = None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--losses", nargs="+", default=list(LOSSES), choices=LOSSES)
    parser.add_argument("--batches", type=int, default=8, help="timed batches per loss (the median is reported)")
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    return parser.parse_args(argv)


def main(argv: Optional[List[str]] = None) -> None:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore")
    register_resolvers()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} thread(s), load average at start "
          f"{os.getloadavg()[0]:.2f}")
    rows = []
    with tempfile.TemporaryDirectory() as cache_dir:
        for loss in args.losses:
            trainer = build_trainer(loss, args.batches + 1, False, cache_dir)
            live = statistics.median(step_times(trainer))
            cacheable = trainer.reference_model is not None and trainer.caches_reference_logps()
            cached = statistics.median(step_times(build_trainer(loss, args.batches + 1, True, cache_dir))) \
                if cacheable else None
            rows.append((loss, live, cached))
    print(f"load average at end {os.getloadavg()[0]:.2f}\n")
    print("| loss | ms/step | ms/step, cached reference log-probs |")
    print("|---|---:|---:|")
    for loss, live, cached in rows:
        print(f"| {loss} | {1000 * live:.0f} | {f'{1000 * cached:.0f}' if cached is not None else '-'} |")


if __name__ == "__main__":
    main()
