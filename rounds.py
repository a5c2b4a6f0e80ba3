"""Semi-online alignment: N rounds of sample -> label -> train, each round starting from the previous round's policy.

    python rounds.py --dir .cache/online --rounds 2 --loss dpo --reward_model .cache/tiny_rm/LATEST \\
        --prompts hh --n_prompts 16 --num_samples_per_prompt 4 -- model=tiny wandb.enabled=false n_examples=32

Round r (1..N), in <dir>/round-<r>/:
1. sample: eval.py's sample mode on `--prompts`' train split (`sample_split=train`) with the previous round's
   policy (round 1: the initial model), num_samples_per_prompt responses per prompt -> samples.json;
2. label: label.py with the reward model or judges -> labels/ (train.jsonl, test.jsonl and the score log);
3. train: train.py with `--loss` on labels/ from the previous round's policy -> policy/ (a run directory).
After the last round the final policy is sampled and scored once more (<dir>/final/) for the summary.

Every step resumes after a kill: sampling from its partial file, labelling from its score log or judgments cache,
training from its resumable checkpoint (resume_from=auto); a finished step is skipped. Rerunning the same command
continues where it stopped. The summary table (<dir>/summary.md, also printed) gives per policy the mean reward of
its samples, the win rate against the dataset's responses when judges label, and the KL to the initial model;
<dir>/timings.json the seconds spent sampling, labelling and training (docs/online.md).
"""
import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Dict, List, Optional, Sequence

from hydra import compose, initialize_config_dir
from hydra.errors import HydraException

import eval as eval_py
import round_summary
from configuration import CONFIG_DIR
from errors import ConfigError, HalosError
from label import LabelSettings, label
from models import load_tokenizer
from train import train
from utils import register_resolvers

register_resolvers()

PHASES = ("sample", "label", "train")
SAMPLES_NAME, LABELS_DIR, POLICY_NAME, FINAL_DIR = "samples", "labels", "policy", "final"
RESERVED_KEYS = ("mode", "exp_name", "cache_dir", "datasets", "saved_policy", "samples_dir", "local_run_dir",
                 "resume_from", "model.load_from", "loss", "n_samples", "num_samples_per_prompt", "sample_split")


class Timings:
    """Seconds spent in each phase of each round, kept in <dir>/timings.json across interrupted invocations."""

    def __init__(self, path: Path):
        self.path = path
        self.seconds: Dict[str, Dict[str, float]] = json.loads(path.read_text()) if path.exists() else {}

    def add(self, step: str, phase: str, seconds: float) -> None:
        per_step = self.seconds.setdefault(step, {})
        per_step[phase] = per_step.get(phase, 0.0) + seconds
        temporary = self.path.with_name(self.path.name + ".tmp")
        temporary.write_text(json.dumps(self.seconds, indent=1))
        os.replace(temporary, self.path)

    def totals(self) -> Dict[str, float]:
        return {phase: sum(step.get(phase, 0.0) for step in self.seconds.values()) for phase in PHASES}


class Rounds:
    """One rounds.py invocation: its settings and the paths of every round's steps."""

    def __init__(self, args: argparse.Namespace):
        self.args = args
        self.root = Path(args.dir).resolve()
        self.timings = Timings(self.root / "timings.json")

    def round_dir(self, r: int) -> Path:
        return self.root / (f"round-{r}" if r <= self.args.rounds else FINAL_DIR)

    def policy_after(self, r: int) -> Optional[str]:
        """The policy round r trained (None for round 0: the initial model)."""
        return None if r == 0 else str(self.round_dir(r) / POLICY_NAME / "LATEST")

    def compose(self, overrides: Sequence[str]):
        with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base=None):
            try:
                return compose(config_name="config", overrides=[f"loss={self.args.loss}", *self.args.overrides,
                                                                *overrides])
            except HydraException as err:
                raise ConfigError(f"rounds.py overrides: {str(err).splitlines()[0]}") from None

    def default_format(self) -> str:
        """The row schema the loss's data loader reads."""
        loader = str(self.compose([]).loss.dataloader)
        return {"ScoredGroupDataLoader": "scored", "UnpairedPreferenceDataLoader": "binary"}.get(loader, "pairwise")

    def timed(self, r: int, phase: str, work):
        start = time.perf_counter()
        result = work()
        self.timings.add(self.round_dir(r).name, phase, time.perf_counter() - start)
        return result

    # --- the steps ---------------------------------------------------------------------------------------------

    def sample(self, r: int) -> Path:
        """Samples the policy entering round r (round N + 1: the final policy)."""
        directory = self.round_dir(r)
        output = directory / f"{SAMPLES_NAME}.json"
        if output.exists():
            return output
        policy = self.policy_after(r - 1)
        run_dir = str(Path(policy).parent) if policy else str(directory / SAMPLES_NAME)
        config = self.compose(["mode=sample", f"exp_name={SAMPLES_NAME}", f"cache_dir={directory}",
                               f"datasets=[{self.args.prompts}]", f"n_samples={self.args.n_prompts}",
                               f"num_samples_per_prompt={self.args.num_samples_per_prompt}", "sample_split=train",
                               f"samples_dir={directory}", f"local_run_dir={run_dir}",
                               f"saved_policy={policy if policy else 'null'}"])
        return self.timed(r, "sample", lambda: eval_py.run(config))

    def label(self, r: int, samples: Path, output_format: str) -> dict:
        settings = LabelSettings(samples=samples, output=self.round_dir(r) / LABELS_DIR, format=output_format,
                                 pairs=self.args.pairs, threshold=self.args.threshold,
                                 reward_model=self.args.reward_model, judge=self.args.judge,
                                 base_url=self.args.base_url, concurrency=self.args.concurrency,
                                 test_every=self.args.test_every, seed=r)
        return self.timed(r, "label", lambda: label(settings))

    def train(self, r: int) -> None:
        directory = self.round_dir(r)
        previous = self.policy_after(r - 1)
        config = self.compose(["mode=train", f"exp_name={POLICY_NAME}", f"cache_dir={directory}",
                               "datasets=[labelled]", f"++local_datasets.labelled={directory / LABELS_DIR}",
                               "resume_from=auto", f"model.load_from={previous if previous else 'null'}"])
        self.timed(r, "train", lambda: train(config, self.args.loss))

    # --- the loop ----------------------------------------------------------------------------------------------

    def run(self) -> str:
        """Runs (or continues) every round and returns the summary table."""
        self.root.mkdir(parents=True, exist_ok=True)
        scored: List[dict] = []
        for r in range(1, self.args.rounds + 2):
            print(f"=== {self.round_dir(r).name}: sample" + (", label, train" if r <= self.args.rounds else ""))
            samples = self.sample(r)
            # The final policy's samples are only scored, for the summary.
            scored.append({"samples": samples,
                           **self.label(r, samples, self.args.format if r <= self.args.rounds else "scored")})
            if r <= self.args.rounds:
                self.train(r)
        rows = self.summary_rows(scored)
        summary = round_summary.table(rows)
        totals = self.timings.totals()
        summary += "\n\nseconds: " + ", ".join(f"{phase} {seconds:.1f}" for phase, seconds in totals.items())
        (self.root / "summary.md").write_text(summary + "\n")
        return summary

    def summary_rows(self, scored: Sequence[dict]) -> List[dict]:
        """One row per policy: the initial model (0) and the policy after each round."""
        config = self.compose(["mode=sample", f"exp_name={SAMPLES_NAME}", f"cache_dir={self.root}",
                               f"datasets=[{self.args.prompts}]"])
        tokenizer = load_tokenizer(config.model)
        rows = []
        for r, labelled in enumerate(scored):
            samples = json.loads(Path(labelled["samples"]).read_text())["samples"]
            texts = [(s["prompt"], s["policy"]) for s in samples]
            row = {"policy": "initial" if r == 0 else f"round {r}",
                   "reward_mean" if self.args.reward_model else "judge_score_mean": labelled["score_mean"]}
            if self.args.judge:
                row["win_rate"] = round_summary.win_rate(list(labelled["scores"].values()))
            row["kl_to_initial"] = round_summary.kl_to_initial(config, tokenizer, self.policy_after(r), texts)
            rows.append(row)
        return rows


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description="Semi-online alignment: rounds of sample -> label -> train.",
                                     epilog="Arguments after -- are Hydra overrides for sampling and training "
                                            "(model=..., n_examples=..., lr=...).")
    parser.add_argument("--dir", required=True, help="directory of the rounds (rerun to continue)")
    parser.add_argument("--rounds", type=int, default=2, help="number of rounds")
    parser.add_argument("--loss", default="dpo", help="loss config trained each round (dpo, kto, grpo, ...)")
    parser.add_argument("--prompts", default="hh", help="dataset whose train-split prompts are sampled")
    parser.add_argument("--n_prompts", type=int, default=64, help="prompts sampled per round")
    parser.add_argument("--num_samples_per_prompt", type=int, default=4, help="responses per prompt (>= 2)")
    parser.add_argument("--format", choices=("pairwise", "binary", "scored"), default=None,
                        help="labelled rows (default: what the loss reads: scored for grpo, binary for kto-like "
                             "losses, pairwise otherwise)")
    parser.add_argument("--pairs", default="best_worst", help="pairwise: best_worst or random")
    parser.add_argument("--threshold", default="median", help="binary: median, mean or a number")
    parser.add_argument("--test_every", type=int, default=4, help="every N-th prompt's rows are held out (test)")
    parser.add_argument("--reward_model", default=None, help="Hugging Face sequence-classification directory")
    parser.add_argument("--judge", "-j", action="extend", nargs="+", default=None,
                        help="judge chat model(s), MODEL or MODEL@BASE_URL (key from OPENAI_API_KEY)")
    parser.add_argument("--base_url", default=os.environ.get("OPENAI_BASE_URL"), help="endpoint of judges")
    parser.add_argument("--concurrency", type=int, default=4, help="judge requests in flight at once")
    parser.add_argument("overrides", nargs="*", help="Hydra overrides for sampling and training")
    return parser


def check_args(args: argparse.Namespace) -> None:
    problems = []
    if args.rounds < 1:
        problems.append(f"--rounds: expected a positive integer, got {args.rounds}")
    if args.num_samples_per_prompt < 2:
        problems.append(f"--num_samples_per_prompt: labelling needs 2 or more, got {args.num_samples_per_prompt}")
    if args.n_prompts < 2:
        problems.append(f"--n_prompts: expected 2 or more, got {args.n_prompts}")
    reserved = [o for o in args.overrides if o.lstrip("+").split("=")[0] in RESERVED_KEYS]
    if reserved:
        problems.append(f"overrides {', '.join(reserved)}: rounds.py sets these keys itself")
    if problems:
        raise ConfigError.listing(problems)


def main(argv: Optional[Sequence[str]] = None) -> None:
    args = build_parser().parse_args(argv)
    try:
        check_args(args)
        rounds = Rounds(args)
        args.format = args.format or rounds.default_format()
        print(rounds.run())
    except HalosError as err:
        sys.exit(f"error: {err}")


if __name__ == "__main__":
    main()
