"""From verdicts to the numbers of a results line: tallies, raw and length-controlled win rates with their
intervals, position bias, agreement between judges and cost.

Margins are the candidate's: +2 much better, +1 better, 0 tie or no verdict, -1 worse, -2 much worse; None is a
failed request. Verdicts are combined the same way across the two orders of a prompt and across judges
(`combine_margins`): a side wins if a strict majority of the verdicts favour it, else it is a tie.
"""

from dataclasses import dataclass

import numpy as np

from judging.judgments import Verdict
from judging.stats import (bootstrap_intervals, clopper_pearson_interval, cohen_kappa, length_controlled_rates,
                            percent_agreement, weighted_rates)


@dataclass(frozen=True)
class StatsSettings:
    """How outcomes become win rates."""

    confidence: float = 0.9
    strong_weight: float = 3.0  # games a "much better" verdict counts as (Arena-Hard-Auto counts 3)
    bootstrap_resamples: int = 1000
    bootstrap_seed: int = 0


def combine_margins(margins: list[int | None]) -> int | None:
    """One verdict from several (two orders, or several judges); None if any of them failed.

    The candidate (baseline) wins if more than half of the margins favour it, by the smallest of those margins;
    anything else is a tie. One margin is returned as it is; two agree or make a tie.
    """
    if any(margin is None for margin in margins):
        return None
    for sign in (1, -1):
        favouring = [abs(margin) for margin in margins if margin * sign > 0]
        if 2 * len(favouring) > len(margins):
            return sign * min(favouring)
    return 0


def judge_outcomes(verdicts: list[list[Verdict]]) -> list[int | None]:
    """Per prompt, the judge's verdicts in every order it saw, combined."""
    return [combine_margins([verdict.candidate_margin for verdict in orders]) for orders in verdicts]


def ensemble_outcomes(outcomes_by_judge: list[list[int | None]]) -> list[int | None]:
    """Per prompt, the judges' combined verdicts, combined again (the ensemble)."""
    return [combine_margins(list(per_prompt)) for per_prompt in zip(*outcomes_by_judge)]


def tally(outcomes: list[int | None]) -> dict:
    return {"wins": sum(o is not None and o > 0 for o in outcomes),
            "losses": sum(o is not None and o < 0 for o in outcomes),
            "ties_or_invalid": sum(o == 0 for o in outcomes),
            "errors": sum(o is None for o in outcomes)}


def win_rates(outcomes: list[int | None], x: np.ndarray, settings: StatsSettings) -> tuple[dict, dict]:
    """The raw and the length-controlled win rate over the prompts with a verdict, with their intervals.

    Each prompt counts as one game, or `strong_weight` games for a "much better" verdict either way; ties and
    no-verdicts are games the candidate did not win (the original's convention). The binomial interval needs
    unit weights, so it is null when a strong verdict carries another weight. Args: x (n,), the length feature.
    """
    judged = [index for index, outcome in enumerate(outcomes) if outcome is not None]
    confidence = settings.confidence
    raw = {"value": None, "ci_low": None, "ci_high": None, "confidence": confidence, "n": len(judged),
           "bootstrap_low": None, "bootstrap_high": None}
    lc = {"value": None, "bootstrap_low": None, "bootstrap_high": None, "confidence": confidence,
          "undefined_resamples": None}
    if not judged:
        return raw, lc
    margins = np.array([outcomes[index] for index in judged])
    wins = (margins > 0).astype(np.float64)
    weights = np.where(np.abs(margins) == 2, settings.strong_weight, 1.0)
    raw["value"] = float(weighted_rates(wins, weights[None])[0])
    if np.all(weights == 1):
        raw["ci_low"], raw["ci_high"] = clopper_pearson_interval(int(wins.sum()), len(judged), confidence)
    value = length_controlled_rates(x[judged], wins, weights[None])[0]
    lc["value"] = None if np.isnan(value) else float(value)
    if settings.bootstrap_resamples:
        intervals = bootstrap_intervals(wins, weights, x[judged], settings.bootstrap_resamples,
                                        settings.bootstrap_seed, confidence)
        raw["bootstrap_low"], raw["bootstrap_high"] = intervals.raw_low, intervals.raw_high
        lc["bootstrap_low"], lc["bootstrap_high"] = intervals.lc_low, intervals.lc_high
        lc["undefined_resamples"] = intervals.lc_undefined
    return raw, lc


def position_summary(verdicts: list[list[Verdict]]) -> dict:
    """Position bias of one judge.

    * `first_position_rate`: among verdicts that pick a response, the fraction that pick the one shown first
      (0.5 for a judge without position bias).
    * `consistency`: among prompts judged in both orders (neither failed), the fraction where both verdicts name
      the same response or both are ties; None unless both orders were judged.
    """
    decided = [verdict.first_margin > 0 for orders in verdicts for verdict in orders
               if verdict.first_margin not in (None, 0)]
    both = [orders for orders in verdicts
            if len(orders) == 2 and all(verdict.first_margin is not None for verdict in orders)]
    consistent = [np.sign(orders[0].candidate_margin) == np.sign(orders[1].candidate_margin) for orders in both]
    return {"first_position_rate": sum(decided) / len(decided) if decided else None, "decided": len(decided),
            "consistency": sum(consistent) / len(consistent) if consistent else None,
            "pairs_in_both_orders": len(both)}


def agreement(outcomes_by_judge: dict[str, list[int | None]]) -> list[dict]:
    """Percent agreement and Cohen's kappa of every two judges, on the winner (candidate, baseline or tie) of the
    prompts both judged."""
    names = list(outcomes_by_judge)
    rows = []
    for position, first in enumerate(names):
        for second in names[position + 1:]:
            both = [(int(np.sign(a)), int(np.sign(b)))
                    for a, b in zip(outcomes_by_judge[first], outcomes_by_judge[second])
                    if a is not None and b is not None]
            labels_a, labels_b = [a for a, _ in both], [b for _, b in both]
            rows.append({"judges": [first, second], "n": len(both),
                         "percent": percent_agreement(labels_a, labels_b) if both else None,
                         "kappa": cohen_kappa(labels_a, labels_b) if both else None})
    return rows


def usage_summary(records: list[dict], prices: dict | None, judge: str) -> dict:
    """Requests and tokens of a judge's records, and their cost from `prices[judge]` (USD per million tokens)."""
    prompt_tokens = sum(record.get("prompt_tokens", 0) for record in records)
    completion_tokens = sum(record.get("completion_tokens", 0) for record in records)
    price = (prices or {}).get(judge)
    cost = None if price is None else (prompt_tokens * price["input"] + completion_tokens * price["output"]) / 1e6
    return {"requests": len(records), "prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "cost": cost}


def judge_summary(verdicts: list[list[Verdict]], x: np.ndarray, settings: StatsSettings, usage: dict) -> dict:
    """Everything about one judge: tallies, win rates, position bias and usage."""
    outcomes = judge_outcomes(verdicts)
    raw, lc = win_rates(outcomes, x, settings)
    return {**tally(outcomes), "win_rate": raw, "lc_win_rate": lc, "position": position_summary(verdicts),
            "usage": usage}
