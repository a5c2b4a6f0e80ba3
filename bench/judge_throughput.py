"""Judge throughput of compare.py: concurrent vs sequential requests against a loopback judge.

Starts the loopback OpenAI-compatible server from tests/judge_server.py with a fixed reply latency, plans the
requests compare.py makes for N prompts (both orders of each with `--both_orders`: 2N requests), then times the
judge engine (`judging.engine.ChatEngine`, the real openai SDK over HTTP, sleep_time 0) on them at `--concurrency`
and at concurrency 1.

    .venv/bin/python bench/judge_throughput.py --n 64 --concurrency 16 --latency 0.2 --both_orders
"""

import argparse
import sys
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO_ROOT), str(REPO_ROOT / "tests")]

from judge_server import JudgeServer  # noqa: E402
from judging.engine import ChatEngine, EngineSettings, Endpoint, run_engines  # noqa: E402
from judging.judgments import JudgingPlan, plan_comparisons  # noqa: E402
from judging.protocol import PromptFormat, shown_orders  # noqa: E402
from judging.sample_formats import PairSet  # noqa: E402

JUDGE = "loopback-judge"


def make_pairs(count: int) -> PairSet:
    """`count` short prompts with a candidate that carries the loopback judge's winner marker."""
    prompt_format = PromptFormat()
    prompts = [prompt_format.prompt_for(f"Question {index}?") for index in range(count)]
    return PairSet(prompts, [f"Question {index}?" for index in range(count)],
                   [f"Answer {index} [good]." for index in range(count)],
                   [f"Other answer {index}." for index in range(count)], "policy", "chosen", "bench", {},
                   prompt_format, REPO_ROOT)


def judgments_per_second(base_url: str, requests: list, concurrency: int) -> float:
    """Judge every request once; raises unless each one got a reply."""
    settings = EngineSettings(concurrency=concurrency, sleep_time=0.0, timeout=30)
    replies = []
    start = time.perf_counter()
    run_engines([(ChatEngine(Endpoint(JUDGE, base_url), settings), requests,
                  lambda position, reply: replies.append(reply))])
    elapsed = time.perf_counter() - start
    answered = sum(reply.text is not None for reply in replies)
    if answered != len(requests):
        raise RuntimeError(f"only {answered} of {len(requests)} requests got a reply")
    return len(requests) / elapsed


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=64, help="prompts per run")
    parser.add_argument("--concurrency", type=int, default=16, help="concurrency of the parallel run")
    parser.add_argument("--latency", type=float, default=0.2, help="server reply latency in seconds")
    parser.add_argument("--both_orders", action="store_true", help="judge each prompt in both orders")
    args = parser.parse_args(argv)
    orders = [(True, False)] * args.n if args.both_orders else [(first,) for first in shown_orders(args.n, 0)]
    comparisons = plan_comparisons(make_pairs(args.n), JudgingPlan([JUDGE], "12", "binary", 0, orders))
    requests = [comparison.request for comparison in comparisons]
    with JudgeServer(latency=args.latency) as server:
        concurrent = judgments_per_second(server.base_url, requests, args.concurrency)
        sequential = judgments_per_second(server.base_url, requests, 1)
    print(f"N={args.n} prompts, {len(requests)} judgments{' (both orders)' * args.both_orders}, "
          f"server latency {args.latency * 1000:.0f} ms")
    print(f"concurrency {args.concurrency:>2}: {concurrent:7.2f} judgments/s")
    print(f"concurrency  1: {sequential:7.2f} judgments/s")
    print(f"speed-up: {concurrent / sequential:.1f}x")


if __name__ == "__main__":
    main()
