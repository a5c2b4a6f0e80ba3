"""Pairwise judgments: which requests a comparison needs, sending the ones the cache lacks, reading verdicts back.

A comparison of n prompts by J judges needs n x J requests, or 2 x n x J with both orders. Each is keyed by
its content (`judging.engine.request_key`), looked up in the judgments file, and sent only if it has no reply there.
"""

from collections.abc import Callable, Sequence
from dataclasses import dataclass

from judging.cache import JudgmentCache, reply_record
from judging.engine import ChatEngine, ChatReply, ChatRequest, EngineSettings, Endpoint, request_key, run_engines
from judging.protocol import build_messages, first_margin, max_tokens_for
from judging.sample_formats import PairSet


@dataclass(frozen=True)
class Comparison:
    """One judge request: prompt `index` shown to `judge` with the candidate first or second."""

    index: int
    judge: str
    candidate_first: bool
    shown: tuple[str, str]  # the side names in the order shown
    request: ChatRequest
    key: str


@dataclass(frozen=True)
class Verdict:
    """What one judge said about one prompt in one order. `first_margin` is None if the request failed."""

    candidate_first: bool
    first_margin: int | None

    @property
    def candidate_margin(self) -> int | None:
        """The margin for the candidate (+2..-2), None for a failed request."""
        if self.first_margin is None:
            return None
        return self.first_margin if self.candidate_first else -self.first_margin


@dataclass(frozen=True)
class JudgingPlan:
    """Everything that fixes the requests, besides the texts."""

    judges: list[str]  # judge model names
    labels: str
    protocol: str
    seed: int
    orders: list[tuple[bool, ...]]  # per prompt: the candidate_first values to judge


def plan_comparisons(pairs: PairSet, plan: JudgingPlan) -> list[Comparison]:
    """Every request the comparison needs, prompt by prompt, then order, then judge."""
    comparisons = []
    for index, prompt in enumerate(pairs.prompts):
        for candidate_first in plan.orders[index]:
            sides = [(pairs.candidate_name, pairs.candidate[index]), (pairs.baseline_name, pairs.baseline[index])]
            first, second = sides if candidate_first else sides[::-1]
            messages = build_messages(prompt, first[1], second[1], plan.labels, pairs.prompt_format, plan.protocol)
            request = ChatRequest(messages, max_tokens_for(plan.protocol), temperature=0, seed=plan.seed,
                                  template=f"halos-{plan.protocol}-v1")
            for judge in plan.judges:
                comparisons.append(Comparison(index, judge, candidate_first, (first[0], second[0]), request,
                                              request_key(judge, request)))
    return comparisons


def judge_pending(pending: Sequence[Comparison], endpoints: dict[str, Endpoint], settings: EngineSettings,
                  cache: JudgmentCache, on_record: Callable[[dict], None]) -> None:
    """Send the pending comparisons, every judge at once, appending each reply to the judgments file as it
    arrives and then calling `on_record` with it."""
    with cache.appending() as append:
        work = []
        for judge, endpoint in endpoints.items():
            mine = [comparison for comparison in pending if comparison.judge == judge]

            def on_reply(position: int, reply: ChatReply, mine: list[Comparison] = mine) -> None:
                comparison = mine[position]
                record = reply_record(comparison.key, comparison.judge, comparison.request, reply,
                                      index=comparison.index, shown=list(comparison.shown))
                append(record)
                on_record(record)

            if mine:
                work.append((ChatEngine(endpoint, settings), [comparison.request for comparison in mine], on_reply))
        run_engines(work)


def collect_verdicts(comparisons: Sequence[Comparison], cache: JudgmentCache, plan: JudgingPlan,
                     count: int) -> dict[str, list[list[Verdict]]]:
    """verdicts[judge][index]: the judge's verdict on prompt `index` in each order, read from the cache.

    The reply text is parsed here, not when it is recorded, so the file holds only what the judge said.
    """
    verdicts = {judge: [[] for _ in range(count)] for judge in plan.judges}
    for comparison in comparisons:
        record = cache.records.get(comparison.key)
        margin = None
        if record is not None and record["error"] is None:
            margin = first_margin(record["judge_output"], plan.labels, plan.protocol)
        verdicts[comparison.judge][comparison.index].append(Verdict(comparison.candidate_first, margin))
    return verdicts

