"""Pairwise LLM-as-judge comparison of two responses per prompt: win rates, length control, intervals.

Reads an eval.py sample file (or AlpacaEval outputs, or Arena-Hard answers; a second file gives the baseline),
shows one or several OpenAI-compatible chat models the conversation and the two responses, in a seeded random
order or in both orders, reads which response each judge prefers, and appends one summary line to a results JSONL
file. Every judgment is logged as it completes and keyed by its content, so an interrupted run resumes where it
stopped and a rerun costs nothing. See docs/compare.md.

    OPENAI_API_KEY=... python compare.py -f samples/my_run.json -r results.jsonl
"""

import argparse
import importlib.util
import json
import os
import re
import sys
from datetime import datetime
from pathlib import Path

import numpy as np
from tqdm import tqdm

from errors import HalosError
from judging.cache import JudgmentCache
from judging.engine import EngineSettings, Endpoint, JudgeRejectedError, JudgeUnreachableError, api_key_for
from judging.judgments import Comparison, JudgingPlan, collect_verdicts, judge_pending, plan_comparisons
from judging.lengths import LENGTH_UNITS, response_lengths
from judging.outputs import append_results_line, summary_lines, write_judgments_csv, write_plot
from judging.protocol import PROTOCOLS, first_margin, shown_orders
from judging.sample_formats import PairKeys, PairSet, load_pairs, write_alpaca_eval
from judging.stats import length_feature
from judging.summary import (StatsSettings, agreement, ensemble_outcomes, judge_outcomes, judge_summary, tally,
                             usage_summary, win_rates)

DEFAULT_JUDGE = "gpt-4-0613"
# AlpacaEval's preference for the candidate (its output_2): 2 won, 1.5 tie, 1 lost.
ALPACA_PREFERENCE = {1: 2.0, 0: 1.5, -1: 1.0}


def build_parser() -> argparse.ArgumentParser:
    """The command-line interface (original flags first, then the additions)."""
    parser = argparse.ArgumentParser(description="Judge candidate vs baseline responses with LLMs.")
    parser.add_argument("--file", "-f", required=True,
                        help="eval.py sample JSON, AlpacaEval outputs JSON or Arena-Hard answers JSONL")
    parser.add_argument("--candidate_key", "-ck", default=None, help="row key of the candidate (default: policy)")
    parser.add_argument("--baseline_key", "-bk", default=None, help="row key of the baseline (default: chosen)")
    parser.add_argument("--history_key", "-hk", default=None, help="row key of the prompt (default: prompt)")
    parser.add_argument("--labels", "-l", default="12", help="labels of the 1st and 2nd shown response")
    parser.add_argument("--seed", "-s", type=int, default=0, help="shuffle seed, also sent to the API")
    parser.add_argument("--sleep_time", "-st", type=float, default=0.5,
                        help="minimum seconds between request starts, per judge")
    parser.add_argument("--max_comp", "-mc", type=int, default=None, help="judge only the first N samples")
    parser.add_argument("--verbose", "-v", action=argparse.BooleanOptionalAction, default=True,
                        help="print each judge output and running tallies")
    parser.add_argument("--results_file", "-r", default=None,
                        help="JSONL file to append to (default: results.jsonl beside the sample file)")
    parser.add_argument("--judge", "-j", action="extend", nargs="+", default=None,
                        help=f"judge chat model(s), MODEL or MODEL@BASE_URL (default: {DEFAULT_JUDGE})")
    parser.add_argument("--save_csv", "-csv", default="", help="CSV of individual judgments (optional)")
    parser.add_argument("--base_url", default=os.environ.get("OPENAI_BASE_URL"),
                        help="OpenAI-compatible endpoint of judges without @URL (default: env OPENAI_BASE_URL)")
    parser.add_argument("--concurrency", type=int, default=4, help="requests in flight at once, per judge")
    parser.add_argument("--max_retries", type=int, default=5, help="retries on 429/5xx/timeouts/bad replies")
    parser.add_argument("--timeout", type=float, default=30.0, help="per-request timeout in seconds")
    parser.add_argument("--backoff", type=float, default=1.0, help="first retry delay in seconds")
    parser.add_argument("--judgments_file", default=None, help="per-request judgment log and cache")
    parser.add_argument("--confidence", type=float, default=0.9, help="confidence of the intervals")
    parser.add_argument("--tokenizer", default=None, help="tokenizer for lengths (default: local_run_dir)")
    parser.add_argument("--plot", default=None, help="PNG chart of the win rates (needs matplotlib)")
    parser.add_argument("--both_orders", action="store_true", help="judge each prompt in both orders")
    parser.add_argument("--protocol", choices=PROTOCOLS, default="binary", help="verdicts the judge gives")
    parser.add_argument("--strong_weight", type=float, default=3.0,
                        help="games a 'much better' graded verdict counts as")
    parser.add_argument("--bootstrap", type=int, default=1000, help="bootstrap resamples (0: none)")
    parser.add_argument("--bootstrap_seed", type=int, default=0, help="seed of the bootstrap resamples")
    parser.add_argument("--length_unit", choices=LENGTH_UNITS, default="tokens", help="unit of response lengths")
    parser.add_argument("--baseline_file", "-bf", default=None, help="file of the baseline model's responses")
    parser.add_argument("--questions", default=None, help="Arena-Hard questions JSONL (for Arena-Hard answers)")
    parser.add_argument("--prices", default=None,
                        help='JSON price table {"MODEL": {"input": USD, "output": USD}} per million tokens')
    parser.add_argument("--alpaca_eval_dir", default=None, help="write AlpacaEval outputs and annotations here")
    return parser


def validate_args(args: argparse.Namespace) -> None:
    """Reject flag values that would fail later, before any request is made."""
    if len(args.labels) != 2 or args.labels[0] == args.labels[1]:
        raise HalosError(f"--labels must be exactly 2 distinct characters, got {args.labels!r}")
    checks = [
        (args.max_comp is None or args.max_comp >= 1, "--max_comp must be at least 1"),
        (args.sleep_time >= 0, "--sleep_time must be >= 0"),
        (args.concurrency >= 1, "--concurrency must be at least 1"),
        (args.max_retries >= 0, "--max_retries must be >= 0"),
        (args.timeout > 0, "--timeout must be > 0"),
        (args.backoff >= 0, "--backoff must be >= 0"),
        (0 < args.confidence < 1, "--confidence must be strictly between 0 and 1"),
        (args.strong_weight > 0, "--strong_weight must be > 0"),
        (args.bootstrap >= 0, "--bootstrap must be >= 0"),
    ]
    for ok, message in checks:
        if not ok:
            raise HalosError(message)
    if args.plot and importlib.util.find_spec("matplotlib") is None:
        raise HalosError("--plot needs matplotlib, which is not installed (pip install matplotlib)")


def parse_judges(specs: list[str] | None, base_url: str | None) -> dict[str, Endpoint]:
    """Judge name (its model) -> endpoint; every judge needs an API key (or a custom endpoint)."""
    endpoints = {}
    for spec in specs or [DEFAULT_JUDGE]:
        endpoint = Endpoint.parse(spec, base_url)
        if endpoint.model in endpoints:
            raise HalosError(f"--judge names model {endpoint.model!r} twice; judges are told apart by model name")
        api_key_for(endpoint)
        endpoints[endpoint.model] = endpoint
    return endpoints


def load_prices(path: str | None) -> dict | None:
    """The price table, checked: every entry {"input": number, "output": number} in USD per million tokens."""
    if path is None:
        return None
    try:
        prices = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError) as error:
        raise HalosError(f"cannot read price table {path!r}: {' '.join(str(error).split())}") from None
    for model, price in (prices.items() if isinstance(prices, dict) else [(None, None)]):
        if not isinstance(price, dict) or not all(isinstance(price.get(side), (int, float))
                                                  for side in ("input", "output")):
            raise HalosError(f"price table {path!r}: {model!r} must map to {{'input': USD, 'output': USD}} "
                             "per million tokens")
    return prices


def default_judgments_path(results_file: Path, pairs: PairSet) -> Path:
    """`judgments/<results stem>.<exp_name>.<candidate>_vs_<baseline>.jsonl` beside the results file."""
    parts = [results_file.stem, pairs.exp_name, f"{pairs.candidate_name}_vs_{pairs.baseline_name}"]
    safe_parts = [re.sub(r"[^A-Za-z0-9._-]+", "_", part) for part in parts]
    return results_file.parent / "judgments" / (".".join(safe_parts) + ".jsonl")


def progress_printer(args: argparse.Namespace, comparisons: dict[str, Comparison], run_usage: dict,
                     progress: tqdm):
    """The callback that reports each new judgment (and its tokens) as it arrives."""
    tallies = {"candidate": 0, "baseline": 0}

    def on_record(record: dict) -> None:
        comparison = comparisons[record["key"]]
        progress.update()
        used = run_usage.setdefault(record["judge"], [0, 0])
        used[0] += record["prompt_tokens"]
        used[1] += record["completion_tokens"]
        where = f"sample {comparison.index} ({comparison.judge}, {comparison.shown[0]} first)"
        if record["error"] is not None:
            tqdm.write(f"{where}: failed after {record['attempts']} attempts: {record['error']}")
            return
        margin = first_margin(record["judge_output"], args.labels, args.protocol)
        winner = None if margin == 0 else comparison.shown[0 if margin > 0 else 1]
        side = "candidate" if comparison.candidate_first == (margin > 0) else "baseline"
        tallies[side] += margin != 0
        if args.verbose:
            tqdm.write(f"{where}: {record['judge_output']!r} -> {winner}; candidate {tallies['candidate']} - "
                       f"baseline {tallies['baseline']}")

    return on_record


def run_judgments(args: argparse.Namespace, pending: list[Comparison], endpoints: dict[str, Endpoint],
                  cache: JudgmentCache) -> dict[str, list[int]]:
    """Send the pending requests; returns the tokens (in, out) this run spent per judge."""
    settings = EngineSettings(args.concurrency, args.sleep_time, args.max_retries, args.timeout, args.backoff)
    run_usage: dict[str, list[int]] = {}
    with tqdm(total=len(pending), desc="judging", unit="judgment") as progress:
        on_record = progress_printer(args, {c.key: c for c in pending}, run_usage, progress)
        judge_pending(pending, endpoints, settings, cache, on_record)
    return run_usage


def build_summary(args: argparse.Namespace, pairs: PairSet, lengths: dict[str, list[int]], verdicts: dict,
                  cache: JudgmentCache, comparisons: list[Comparison], prices: dict | None) -> dict:
    """The results line: the original's fields (ensemble tallies), the win rates and a report per judge."""
    stats = StatsSettings(args.confidence, args.strong_weight, args.bootstrap, args.bootstrap_seed)
    x = length_feature(np.array(lengths["candidate"]), np.array(lengths["baseline"]))
    judges = {}
    for judge, judge_verdicts in verdicts.items():
        keys = {c.key for c in comparisons if c.judge == judge}
        usage = usage_summary([cache.records[key] for key in keys if key in cache.records], prices, judge)
        judges[judge] = judge_summary(judge_verdicts, x, stats, usage)
    outcomes_by_judge = {judge: judge_outcomes(judge_verdicts) for judge, judge_verdicts in verdicts.items()}
    outcomes = ensemble_outcomes(list(outcomes_by_judge.values()))
    counts = tally(outcomes)
    raw, lc = win_rates(outcomes, x, stats)
    costs = [report["usage"]["cost"] for report in judges.values()]
    sides = {side: {"name": name, "wins": wins, "lengths": lengths[side], "mean_length": float(np.mean(lengths[side]))}
             for side, name, wins in [("candidate", pairs.candidate_name, counts["wins"]),
                                      ("baseline", pairs.baseline_name, counts["losses"])]}
    return {
        "date": str(datetime.now()), "total": len(outcomes), "seed": args.seed, "exp_name": pairs.exp_name,
        "judge": "+".join(verdicts), **sides,
        "ties_or_invalid": counts["ties_or_invalid"], "errors": counts["errors"],
        "win_rate": raw, "lc_win_rate": lc, "judges": judges, "agreement": agreement(outcomes_by_judge),
        "cost": None if None in costs else sum(costs),
        "settings": {"protocol": args.protocol, "both_orders": args.both_orders, "labels": args.labels,
                     "strong_weight": args.strong_weight, "bootstrap_resamples": args.bootstrap,
                     "bootstrap_seed": args.bootstrap_seed, "length_unit": args.length_unit},
        "config": pairs.config,
    }


def write_extras(args: argparse.Namespace, pairs: PairSet, summary: dict, comparisons: list[Comparison],
                 verdicts: dict, cache: JudgmentCache) -> None:
    """The optional outputs: CSV, AlpacaEval files and the chart."""
    if args.save_csv:
        margins = {c.key: first_margin(cache.records[c.key]["judge_output"], args.labels, args.protocol)
                   for c in comparisons if cache.answered(c.key)}
        write_judgments_csv(args.save_csv, pairs, comparisons, cache.records, margins)
    if args.alpaca_eval_dir:
        preferences = {judge: [None if o is None else ALPACA_PREFERENCE[int(np.sign(o))]
                               for o in judge_outcomes(judge_verdicts)]
                       for judge, judge_verdicts in verdicts.items()}
        write_alpaca_eval(Path(args.alpaca_eval_dir), pairs, preferences)
    if args.plot:
        write_plot(args.plot, summary)


def compare(args: argparse.Namespace) -> int:
    """Judge every request not yet judged, then append the summary; returns the exit code."""
    validate_args(args)
    endpoints = parse_judges(args.judge, args.base_url)
    prices = load_prices(args.prices)
    pairs = load_pairs(args.file, PairKeys(args.candidate_key, args.baseline_key, args.history_key), args.max_comp,
                       args.baseline_file, args.questions)
    lengths = response_lengths({"candidate": pairs.candidate, "baseline": pairs.baseline}, args.length_unit,
                               args.tokenizer, pairs.config, pairs.source)
    count = len(pairs.prompts)
    orders = [(True, False)] * count if args.both_orders else [(first,) for first in shown_orders(count, args.seed)]
    plan = JudgingPlan(list(endpoints), args.labels, args.protocol, args.seed, orders)
    comparisons = plan_comparisons(pairs, plan)
    results_file = Path(args.results_file) if args.results_file else pairs.source.parent / "results.jsonl"
    cache = JudgmentCache(Path(args.judgments_file) if args.judgments_file
                          else default_judgments_path(results_file, pairs))
    pending = [comparison for comparison in comparisons if not cache.answered(comparison.key)]
    if len(pending) < len(comparisons):
        print(f"resuming: {len(comparisons) - len(pending)} of {len(comparisons)} judgments are in {cache.path}")
    run_usage = run_judgments(args, pending, endpoints, cache) if pending else {}
    verdicts = collect_verdicts(comparisons, cache, plan, count)
    summary = build_summary(args, pairs, lengths, verdicts, cache, comparisons, prices)
    if summary["win_rate"]["n"] == 0:
        print(f"compare.py: error: no prompt got a verdict ({summary['errors']} failed); no results line "
              "written; rerun the same command to retry", file=sys.stderr)
        return 1
    if not append_results_line(results_file, summary):
        print(f"{results_file} already holds this result; not appended again")
    write_extras(args, pairs, summary, comparisons, verdicts, cache)
    for line in summary_lines(summary):
        print(line)
    for judge, (tokens_in, tokens_out) in run_usage.items():
        print(f"this run: judge {judge} used {tokens_in} tokens in, {tokens_out} out")
    if summary["errors"]:
        print(f"{summary['errors']} prompts have failed judgments; rerun the same command to retry them",
              file=sys.stderr)
        return 1
    return 0


def main(argv: list[str] | None = None) -> int:
    """Command-line entry point; returns the exit code (2 for bad input, 1 for failed judgments)."""
    args = build_parser().parse_args(argv)
    try:
        return compare(args)
    except JudgeRejectedError as error:
        print(f"compare.py: error: the judge endpoint refused the request: {error}", file=sys.stderr)
        return 1
    except JudgeUnreachableError as error:
        print(f"compare.py: error: {error}", file=sys.stderr)
        return 1
    except HalosError as error:
        print(f"compare.py: error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
