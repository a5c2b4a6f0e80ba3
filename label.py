"""Turning sampled responses into training data: score every sample, then write pairwise, binary or scored rows.

Reads an eval.py sample file with two or more samples per prompt (`num_samples_per_prompt`), scores each sample
with a reward model (this framework's loss=bradley-terry export, or any Hugging Face sequence-classification model)
or with LLM judges through compare.py's engine (each sample judged against the prompt's dataset response), and
writes `train.jsonl` and `test.jsonl` in one of the local-dataset schemas train.py reads (README: Datasets):

* pairwise: `prompt`, `chosen`, `rejected`: each prompt's best vs worst sample, or `--pairs random` pairs;
* binary: `prompt`, `completion`, `label`: desirable when the score is above the threshold (median, mean, a number);
* scored: `prompt`, `completion`, `score`: every sample with its score (loss=grpo).

Every score is appended to a log in the output directory as it is computed (reward model: scores.jsonl; judge: the
judgments file, which is also compare.py's cache), so a killed run loses at most the sample in progress and a rerun
continues; the data files are written whole (to a temporary name, then renamed) once every sample has its score.
See docs/online.md.

    python label.py -f samples/round1.json -o data/round1 --reward_model .cache/rm/LATEST --format pairwise
"""
import argparse
import hashlib
import json
import os
import random
import statistics
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

from tqdm import tqdm

from errors import HalosError
from judging.cache import JudgmentCache, drop_partial_last_line
from judging.engine import EngineSettings, Endpoint
from judging.judgments import JudgingPlan, collect_verdicts, judge_pending, plan_comparisons
from judging.protocol import shown_orders
from judging.sample_formats import PairSet, prompt_format_of
from reward_scoring import RewardScorer

FORMATS = ("pairwise", "binary", "scored")
PAIRINGS = ("best_worst", "random")
THRESHOLDS = ("median", "mean")
SCORES_FILE, JUDGMENTS_FILE = "scores.jsonl", "judgments.jsonl"
SPLIT_FILES = {"train": "train.jsonl", "test": "test.jsonl"}


class LabelError(HalosError):
    """A sample file, reward model or setting that labelling cannot use."""


@dataclass(frozen=True)
class Sample:
    """One sampled response: `prompt` as the policy saw it, `messages` the prompt as chat messages ([] when the
    sample file has none), `reference` the dataset's response to the prompt."""
    prompt_id: int
    sample_index: int
    prompt: str
    messages: list
    reference: str
    response: str

    @property
    def key(self) -> str:
        return f"{self.prompt_id}/{self.sample_index}"

    @property
    def log_key(self) -> str:
        """The key of its score in scores.jsonl: its position and a hash of its texts, so that a re-made sample
        file is scored again wherever its texts changed."""
        digest = hashlib.blake2b(json.dumps([self.prompt, self.response]).encode(), digest_size=8).hexdigest()
        return f"{self.key}/{digest}"

    def row_prompt(self):
        """The prompt as a training row gives it: its messages (so chat templates apply) or its text."""
        return self.messages or self.prompt


@dataclass(frozen=True)
class LabelSettings:
    samples: Path
    output: Path
    format: str = "pairwise"
    pairs: str = "best_worst"
    threshold: str = "median"
    reward_model: Optional[str] = None
    tokenizer: Optional[str] = None
    judge: Optional[List[str]] = None
    base_url: Optional[str] = None
    concurrency: int = 4
    max_retries: int = 5
    timeout: float = 30.0
    backoff: float = 1.0
    batch_size: int = 8
    test_every: int = 10  # every this-many-th prompt goes to test.jsonl
    seed: int = 0


def read_samples(path: Path) -> Tuple[List[List[Sample]], dict]:
    """The samples of an eval.py sample file grouped by prompt, in prompt order (every prompt needs two or more),
    and the file's eval.py config."""
    try:
        content = json.loads(path.read_text(encoding="utf-8"))
        rows, config = content["samples"], content.get("config") or {}
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise LabelError(f"{path}: cannot read an eval.py sample file ({err}); expected JSON with a 'samples' "
                         f"list") from None
    groups: Dict[int, List[Sample]] = {}
    for number, row in enumerate(rows, start=1):
        if not isinstance(row, dict) or not isinstance(row.get("prompt_id"), int) or "policy" not in row:
            raise LabelError(f"{path}: sample {number} has no prompt_id/policy; sample it again with this eval.py")
        groups.setdefault(row["prompt_id"], []).append(
            Sample(row["prompt_id"], row["sample_index"], row["prompt"], row.get("prompt_messages") or [],
                   row["chosen"], row["policy"]))
    small = [prompt_id for prompt_id, group in groups.items() if len(group) < 2]
    if not groups or small:
        raise LabelError(f"{path}: labelling needs two or more samples per prompt (eval.py "
                         f"num_samples_per_prompt=2 or more); {len(small) if groups else 'no'} prompts have fewer")
    return [groups[prompt_id] for prompt_id in sorted(groups)], config


# --- scores ----------------------------------------------------------------------------------------------------


def read_score_log(path: Path) -> Dict[str, float]:
    """log key -> score of a scores.jsonl log; a last line cut short by a crash is dropped."""
    if not path.exists():
        return {}
    drop_partial_last_line(path)
    scores = {}
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        try:
            record = json.loads(line)
            scores[record["key"]] = float(record["score"])
        except (ValueError, KeyError, TypeError):
            raise LabelError(f"{path}:{number} is not a score record; delete the file to score again") from None
    return scores


def reward_model_scores(samples: Sequence[Sample], settings: LabelSettings, sample_config: dict) -> Dict[str, float]:
    """Every sample's reward-model score, appended to scores.jsonl batch by batch; scored samples are skipped."""
    log = settings.output / SCORES_FILE
    scores = read_score_log(log)
    todo = [sample for sample in samples if sample.log_key not in scores]
    if todo:
        scorer = RewardScorer.load(settings.reward_model, settings.tokenizer)
        with open(log, "a", encoding="utf-8") as handle, tqdm(total=len(samples), initial=len(samples) - len(todo),
                                                             unit="sample", desc="label (reward model)") as progress:
            for start in range(0, len(todo), settings.batch_size):
                batch = todo[start:start + settings.batch_size]
                for sample, score in zip(batch, scorer.score([(s.prompt, s.response) for s in batch])):
                    handle.write(json.dumps({"key": sample.log_key, "score": score}) + "\n")
                    scores[sample.log_key] = score
                handle.flush()
                progress.update(len(batch))
    return {sample.key: scores[sample.log_key] for sample in samples}


def judge_scores(samples: Sequence[Sample], settings: LabelSettings, sample_config: dict) -> Dict[str, float]:
    """Every sample's judge score: the candidate margin of each judge (+1 win, 0 tie, -1 loss in the binary
    protocol) of the sample against the dataset's response, averaged over judges. Judgments go to the judgments
    file as they arrive (compare.py's cache), so a rerun sends only what is missing."""
    pairs = PairSet(prompts=[s.prompt for s in samples], instructions=[s.prompt for s in samples],
                    candidate=[s.response for s in samples], baseline=[s.reference for s in samples],
                    candidate_name="policy", baseline_name="chosen", exp_name=settings.samples.stem, config=sample_config,
                    prompt_format=prompt_format_of(sample_config), source=settings.samples)
    endpoints = {endpoint.model: endpoint for endpoint in (Endpoint.parse(j, settings.base_url) for j in settings.judge)}
    plan = JudgingPlan(judges=list(endpoints), labels="12", protocol="binary", seed=settings.seed,
                       orders=[(first,) for first in shown_orders(len(samples), settings.seed)])
    comparisons = plan_comparisons(pairs, plan)
    cache = JudgmentCache(settings.output / JUDGMENTS_FILE)
    pending = [c for c in comparisons if not cache.answered(c.key)]
    if pending:
        engine = EngineSettings(concurrency=settings.concurrency, max_retries=settings.max_retries,
                                timeout=settings.timeout, backoff=settings.backoff, sleep_time=0.0)
        with tqdm(total=len(comparisons), initial=len(comparisons) - len(pending), unit="judgment",
                  desc="label (judge)") as progress:
            judge_pending(pending, endpoints, engine, cache, lambda record: progress.update(1))
    verdicts = collect_verdicts(comparisons, cache, plan, len(samples))
    failed = sum(v.candidate_margin is None for per_judge in verdicts.values() for row in per_judge for v in row)
    if failed:
        raise LabelError(f"{failed} judge requests failed after {settings.max_retries} retries (their errors are in "
                         f"{cache.path}); rerun the same command to retry only those")
    return {sample.key: statistics.fmean(sign(v.candidate_margin) for judge in plan.judges
                                         for v in verdicts[judge][k])
            for k, sample in enumerate(samples)}


def sign(margin: int) -> float:
    return float((margin > 0) - (margin < 0))


# --- rows ------------------------------------------------------------------------------------------------------


def threshold_of(choice: str, scores: Sequence[float]) -> float:
    if choice == "median":
        return statistics.median(scores)
    if choice == "mean":
        return statistics.fmean(scores)
    return float(choice)


def group_rows(group: Sequence[Sample], scores: Dict[str, float], settings: LabelSettings, threshold: float,
               rng: random.Random) -> List[dict]:
    """The training rows of one prompt's samples."""
    if settings.format == "scored":
        return [{"prompt": s.row_prompt(), "completion": s.response, "score": scores[s.key]} for s in group]
    if settings.format == "binary":
        return [{"prompt": s.row_prompt(), "completion": s.response, "label": scores[s.key] > threshold}
                for s in group]
    if settings.pairs == "best_worst":
        ranked = sorted(group, key=lambda s: scores[s.key], reverse=True)
        candidates = [(ranked[0], ranked[-1])]
    else:
        shuffled = rng.sample(list(group), len(group))
        candidates = [sorted(pair, key=lambda s: scores[s.key], reverse=True)
                      for pair in zip(shuffled[0::2], shuffled[1::2])]
    # A pair of equal scores says nothing about which response is better.
    return [{"prompt": best.row_prompt(), "chosen": best.response, "rejected": worst.response}
            for best, worst in candidates if scores[best.key] > scores[worst.key]]


def write_atomically(path: Path, rows: Sequence[dict]) -> None:
    temporary = path.with_name(path.name + ".tmp")
    with open(temporary, "w", encoding="utf-8") as handle:
        handle.writelines(json.dumps(row, ensure_ascii=False) + "\n" for row in rows)
    os.replace(temporary, path)


def write_dataset(groups: Sequence[Sequence[Sample]], scores: Dict[str, float], settings: LabelSettings) -> dict:
    """train.jsonl and test.jsonl (every test_every-th prompt, at least one) of the labelled groups; returns counts."""
    all_scores = [scores[s.key] for group in groups for s in group]
    threshold = threshold_of(settings.threshold, all_scores) if settings.format == "binary" else 0.0
    rng = random.Random(settings.seed)
    splits: Dict[str, List[dict]] = {"train": [], "test": []}
    for position, group in enumerate(groups):
        split = "test" if position % settings.test_every == settings.test_every - 1 or len(groups) == 1 else "train"
        splits[split] += group_rows(group, scores, settings, threshold, rng)
    if not splits["test"]:  # fewer prompts than test_every: hold out the last one's rows
        splits["test"] = group_rows(groups[-1], scores, settings, threshold, random.Random(settings.seed))
    empty = [split for split, rows in splits.items() if not rows]
    if empty:
        raise LabelError(f"no {settings.format} rows for the {' and '.join(empty)} split: every prompt's samples "
                         f"scored alike; sample more responses per prompt or use --format scored")
    for split, rows in splits.items():
        write_atomically(settings.output / SPLIT_FILES[split], rows)
    return {"train_rows": len(splits["train"]), "test_rows": len(splits["test"]),
            "score_mean": statistics.fmean(all_scores), "threshold": threshold}


def label(settings: LabelSettings) -> dict:
    """Scores every sample of `settings.samples` (resuming any earlier run) and writes the dataset; returns a
    summary: rows per split, the mean score, and the scores by sample key."""
    check_settings(settings)
    groups, sample_config = read_samples(settings.samples)
    settings.output.mkdir(parents=True, exist_ok=True)
    samples = [sample for group in groups for sample in group]
    scores = (reward_model_scores if settings.reward_model else judge_scores)(samples, settings, sample_config)
    return {**write_dataset(groups, scores, settings), "scores": scores}


def check_settings(settings: LabelSettings) -> None:
    problems = []
    if bool(settings.reward_model) == bool(settings.judge):
        problems.append("give exactly one of --reward_model and --judge")
    if settings.format not in FORMATS:
        problems.append(f"--format: expected one of {', '.join(FORMATS)}, got {settings.format!r}")
    if settings.pairs not in PAIRINGS:
        problems.append(f"--pairs: expected one of {', '.join(PAIRINGS)}, got {settings.pairs!r}")
    if settings.threshold not in THRESHOLDS:
        try:
            float(settings.threshold)
        except ValueError:
            problems.append(f"--threshold: expected median, mean or a number, got {settings.threshold!r}")
    if settings.test_every < 2:
        problems.append(f"--test_every: expected an integer >= 2, got {settings.test_every}")
    if problems:
        raise LabelError("; ".join(problems))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description="Label eval.py samples with a reward model or LLM judges.")
    parser.add_argument("--file", "-f", required=True, help="eval.py sample JSON (num_samples_per_prompt >= 2)")
    parser.add_argument("--output", "-o", required=True, help="directory for train.jsonl, test.jsonl and the log")
    parser.add_argument("--format", default="pairwise", help=f"which rows to write: {', '.join(FORMATS)}")
    parser.add_argument("--pairs", default="best_worst", help=f"pairwise: which pairs, {' or '.join(PAIRINGS)}")
    parser.add_argument("--threshold", default="median", help="binary: median, mean or a number")
    parser.add_argument("--reward_model", default=None, help="Hugging Face sequence-classification directory")
    parser.add_argument("--tokenizer", default=None, help="its tokenizer (default: the directory, then its parent)")
    parser.add_argument("--judge", "-j", action="extend", nargs="+", default=None,
                        help="judge chat model(s), MODEL or MODEL@BASE_URL (key from OPENAI_API_KEY)")
    parser.add_argument("--base_url", default=os.environ.get("OPENAI_BASE_URL"), help="endpoint of judges")
    parser.add_argument("--concurrency", type=int, default=4, help="judge requests in flight at once")
    parser.add_argument("--max_retries", type=int, default=5, help="retries on 429/5xx/timeouts/bad replies")
    parser.add_argument("--timeout", type=float, default=30.0, help="per-request timeout in seconds")
    parser.add_argument("--batch_size", type=int, default=8, help="reward model: samples per forward pass")
    parser.add_argument("--test_every", type=int, default=10, help="every N-th prompt goes to test.jsonl")
    parser.add_argument("--seed", type=int, default=0, help="random pairs, judge order and request seed")
    return parser


def main(argv: Optional[Sequence[str]] = None) -> None:
    args = build_parser().parse_args(argv)
    settings = LabelSettings(samples=Path(args.file), output=Path(args.output),
                             **{key: value for key, value in vars(args).items() if key not in ("file", "output")})
    try:
        summary = label(settings)
    except HalosError as err:
        sys.exit(f"error: {err}")
    print(f"wrote {summary['train_rows']} train and {summary['test_rows']} test {settings.format} rows to "
          f"{settings.output} (mean score {summary['score_mean']:.4f})")


if __name__ == "__main__":
    main()
