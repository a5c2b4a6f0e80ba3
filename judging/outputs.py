"""What compare.py writes from a finished comparison: the results line (appended once), the console summary, the
CSV of judgments and the win-rate chart."""

import csv
import json
from pathlib import Path

from judging.judgments import Comparison
from judging.sample_formats import PairSet

VOLATILE_FIELDS = ("date",)  # fields that differ between two results lines of the same judgments


def same_results(first: dict, second: dict) -> bool:
    """Whether two results lines report the same thing (they may differ only in their date)."""
    strip = lambda line: {key: value for key, value in line.items() if key not in VOLATILE_FIELDS}  # noqa: E731
    return strip(first) == strip(second)


def append_results_line(path: Path, summary: dict) -> bool:
    """Append the summary to the results file unless a line there already says the same; True if appended.

    So rerunning a finished comparison (to add --plot or --save_csv, say) adds no duplicate line.
    """
    if path.exists():
        for line in path.read_text(encoding="utf-8").splitlines():
            try:
                earlier = json.loads(line)
            except ValueError:
                continue  # not ours to judge; the file is only ever appended to
            if isinstance(earlier, dict) and same_results(earlier, summary):
                return False
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a", encoding="utf-8") as handle:
        handle.write(json.dumps(summary) + "\n")
    return True


def rate_text(rate: dict, name: str) -> str:
    """`win rate 0.527 (90% CI 0.490-0.564, bootstrap 0.492-0.561)`, with whichever intervals exist."""
    if rate["value"] is None:
        return f"{name} n/a"
    intervals = []
    if rate.get("ci_low") is not None:
        intervals.append(f"{rate['confidence']:.0%} CI {rate['ci_low']:.3f}-{rate['ci_high']:.3f}")
    if rate["bootstrap_low"] is not None:
        intervals.append(f"bootstrap {rate['bootstrap_low']:.3f}-{rate['bootstrap_high']:.3f}")
    return f"{name} {rate['value']:.3f}" + (f" ({', '.join(intervals)})" if intervals else "")


def summary_lines(summary: dict) -> list[str]:
    """The console report: the headline, then per judge, agreement and cost when there is more to say."""
    head = (f"{summary['candidate']['name']} vs {summary['baseline']['name']}: "
            f"{summary['candidate']['wins']} wins, {summary['baseline']['wins']} losses, "
            f"{summary['ties_or_invalid']} ties/invalid, {summary['errors']} errors of {summary['total']}")
    lines = [head if summary["win_rate"]["value"] is None else
             f"{head}; {rate_text(summary['win_rate'], 'win rate')}; "
             f"{rate_text(summary['lc_win_rate'], 'length-controlled')}"]
    lines.append(f"mean length ({summary['settings']['length_unit']}): {summary['candidate']['mean_length']:.1f} vs "
                 f"{summary['baseline']['mean_length']:.1f}")
    for judge, report in summary["judges"].items():
        if len(summary["judges"]) > 1:
            lines.append(f"judge {judge}: {report['wins']}-{report['losses']}, "
                         f"{rate_text(report['win_rate'], 'win rate')}; "
                         f"{rate_text(report['lc_win_rate'], 'length-controlled')}")
        position = report["position"]
        if position["consistency"] is not None:
            lines.append(f"judge {judge}: position consistency {position['consistency']:.3f} over "
                         f"{position['pairs_in_both_orders']} prompts; first position picked "
                         f"{position['first_position_rate'] or 0:.3f} of {position['decided']} decided verdicts")
        usage = report["usage"]
        cost = "" if usage["cost"] is None else f", ${usage['cost']:.4f}"
        lines.append(f"judge {judge}: {usage['requests']} judgments, {usage['prompt_tokens']} tokens in, "
                     f"{usage['completion_tokens']} out{cost}")
    for row in summary["agreement"]:
        kappa = "n/a" if row["kappa"] is None else f"{row['kappa']:.3f}"
        percent = "n/a" if row["percent"] is None else f"{row['percent']:.3f}"
        lines.append(f"agreement {row['judges'][0]} / {row['judges'][1]}: {percent} "
                     f"(Cohen's kappa {kappa}, n={row['n']})")
    return lines


def write_judgments_csv(path: str, pairs: PairSet, comparisons: list[Comparison], records: dict[str, dict],
                        margins: dict[str, int | None]) -> None:
    """One row per answered request; A and B are the responses in the order the judge saw them."""
    with open(path, "w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(["input", "src_A", "src_B", "response_A", "response_B", "judge_choice", "judge",
                         "judge_output"])
        for comparison in sorted(comparisons, key=lambda c: (c.index, not c.candidate_first, c.judge)):
            margin = margins.get(comparison.key)
            if margin is None:
                continue
            candidate, baseline = pairs.candidate[comparison.index], pairs.baseline[comparison.index]
            first, second = (candidate, baseline) if comparison.candidate_first else (baseline, candidate)
            choice = "A" if margin > 0 else "B" if margin < 0 else ""
            writer.writerow([pairs.prompts[comparison.index].strip(), *comparison.shown, first.strip(),
                             second.strip(), choice, comparison.judge, records[comparison.key]["judge_output"]])


def chart_rows(summary: dict) -> list[tuple[str, dict, dict]]:
    """(label, raw rate, length-controlled rate) per judge, then the ensemble's when there are several."""
    rows = [(judge, report["win_rate"], report["lc_win_rate"]) for judge, report in summary["judges"].items()]
    if len(rows) > 1:
        rows.append(("ensemble", summary["win_rate"], summary["lc_win_rate"]))
    return rows


def error_bar(rate: dict) -> tuple[float, float]:
    """Distances below and above the value: the bootstrap interval, else the binomial one, else none."""
    for low, high in (("bootstrap_low", "bootstrap_high"), ("ci_low", "ci_high")):
        if rate.get(low) is not None:
            return rate["value"] - rate[low], rate[high] - rate["value"]
    return 0.0, 0.0


def win_rate_figure(summary: dict):
    """Bars of the raw and the length-controlled win rate per judge (and the ensemble), with intervals."""
    import matplotlib

    matplotlib.use("Agg")  # no display needed
    import matplotlib.pyplot as plt

    rows = chart_rows(summary)
    figure, axes = plt.subplots(figsize=(2 + 1.6 * len(rows), 4))
    width = 0.38
    for offset, (name, pick, colour) in enumerate([("raw", 1, "tab:blue"), ("length-controlled", 2, "tab:orange")]):
        positions, heights, errors = [], [], [[], []]
        for position, row in enumerate(rows):
            rate = row[pick]
            if rate["value"] is None:
                continue
            below, above = error_bar(rate)
            positions.append(position + (offset - 0.5) * width)
            heights.append(rate["value"])
            errors[0].append(below)
            errors[1].append(above)
        bars = axes.bar(positions, heights, width, yerr=errors, capsize=5, color=colour, label=name)
        axes.bar_label(bars, fmt="%.2f", padding=2, fontsize=8)
    axes.set_xticks(range(len(rows)), [row[0] for row in rows])
    axes.axhline(0.5, color="grey", linestyle="--", linewidth=1)
    axes.set_ylim(0, 1)
    axes.set_ylabel(f"win rate vs {summary['baseline']['name']} ({summary['win_rate']['confidence']:.0%} interval)")
    axes.set_title(f"{summary['candidate']['name']} ({summary['exp_name']})")
    axes.legend(loc="upper right")
    figure.tight_layout()
    return figure


def write_plot(path: str, summary: dict) -> None:
    figure = win_rate_figure(summary)
    import matplotlib.pyplot as plt  # after win_rate_figure chose the Agg backend

    figure.savefig(path)
    plt.close(figure)
