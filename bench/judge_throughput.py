"""Judge throughput of compare.py: concurrent vs sequential requests against a loopback judge.

Starts the loopback OpenAI-compatible server from tests/judge_server.py with a fixed reply latency,
then times compare.py's judging engine (the real openai SDK over HTTP, with sleep_time 0) on the
same N comparisons at `--concurrency` and at concurrency 1.

    .venv/bin/python bench/judge_throughput.py --n 64 --concurrency 16 --latency 0.2
"""

import argparse
import asyncio
import sys
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO_ROOT), str(REPO_ROOT / "tests")]

import openai  # noqa: E402

import compare  # noqa: E402
from judge_server import JudgeServer  # noqa: E402


def make_comparisons(count: int) -> list[compare.Comparison]:
    """`count` short two-response comparisons in the judge protocol."""
    orders = compare.shown_orders(count, "policy", "chosen", seed=0)
    comparisons = []
    for index, order in enumerate(orders):
        sample = {"prompt": f"\n<|user|>\nQuestion {index}?\n<|assistant|>\n",
                  "policy": f"Answer {index} [good].", "chosen": f"Other answer {index}."}
        messages = compare.build_messages(sample, order, "12", "prompt", {})
        comparisons.append(compare.Comparison(index, order, messages))
    return comparisons


async def judge_with(base_url: str, comparisons: list[compare.Comparison], concurrency: int) -> int:
    """Judge all comparisons; returns how many got a verdict."""
    settings = compare.JudgeSettings("loopback-judge", 0, "12", concurrency=concurrency, sleep_time=0.0)
    records = []
    async with openai.AsyncOpenAI(api_key="EMPTY", base_url=base_url, timeout=30, max_retries=0) as client:
        await compare.judge_all(client, comparisons, settings, records.append)
    return sum(record["verdict"] is not None for record in records)


def judgments_per_second(base_url: str, comparisons: list[compare.Comparison], concurrency: int) -> float:
    start = time.perf_counter()
    verdicts = asyncio.run(judge_with(base_url, comparisons, concurrency))
    elapsed = time.perf_counter() - start
    if verdicts != len(comparisons):
        raise RuntimeError(f"only {verdicts} of {len(comparisons)} comparisons got a verdict")
    return len(comparisons) / elapsed


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=64, help="judgments per run")
    parser.add_argument("--concurrency", type=int, default=16, help="concurrency of the parallel run")
    parser.add_argument("--latency", type=float, default=0.2, help="server reply latency in seconds")
    args = parser.parse_args(argv)
    comparisons = make_comparisons(args.n)
    with JudgeServer(latency=args.latency) as server:
        concurrent = judgments_per_second(server.base_url, comparisons, args.concurrency)
        sequential = judgments_per_second(server.base_url, comparisons, 1)
    print(f"N={args.n} judgments, server latency {args.latency * 1000:.0f} ms")
    print(f"concurrency {args.concurrency:>2}: {concurrent:7.2f} judgments/s")
    print(f"concurrency  1: {sequential:7.2f} judgments/s")
    print(f"speed-up: {concurrent / sequential:.1f}x")


if __name__ == "__main__":
    main()
