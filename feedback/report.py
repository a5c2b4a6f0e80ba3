"""The table every dataloader builds at start: per dataset, rows read and dropped (why), examples, items, the epoch's
mix, token-length percentiles and truncation; plus one warning line per thing a user should know. Nothing about
the data is silent: builders print it for the train and the test split before training starts."""
from collections import Counter
from dataclasses import dataclass, field
from typing import Dict, List, Mapping, NamedTuple, Optional, Sequence

import numpy as np

PERCENTILES = (50, 90, 99)


class ItemLengths(NamedTuple):
    """What the report needs of one item: its dataset, token lengths before truncation, and what truncation cuts."""
    source: str
    prompt: int
    responses: tuple
    prompt_truncated: bool
    responses_truncated: int
    identical_pair: bool  # a preference pair whose chosen and rejected responses are the same tokens


@dataclass
class SourceCounts:
    """Loading counts of one dataset (rows_read None: its function does not count rows)."""
    name: str
    rows_read: Optional[int]
    dropped: Counter = field(default_factory=Counter)
    examples: int = 0


@dataclass
class DataReport:
    """The start-of-run data table of one loader and split, and its warnings."""
    title: str
    table: str
    warnings: List[str]

    def __str__(self) -> str:
        return "\n".join([self.title, self.table] + [f"warning: {line}" for line in self.warnings])


def percentiles(lengths: Sequence[int]) -> str:
    if not lengths:
        return "-"
    values = np.percentile(np.asarray(lengths), PERCENTILES, method="higher")
    return "/".join(str(int(v)) for v in (*values, max(lengths)))


def fraction(count: int, total: int) -> str:
    return f"{count} ({100 * count / total:.1f}%)" if total else "0"


def build_report(title: str, counts: Sequence[SourceCounts], items: Sequence[ItemLengths],
                 pool_sizes: Mapping[str, int], shares: Mapping[str, int], max_length: int,
                 max_prompt_length: int) -> DataReport:
    """The table and warnings. `items` are one epoch's distinct items before mixing; `pool_sizes` and `shares` the
    items each dataset keeps after its cap and contributes per epoch."""
    header = ["dataset", "rows read", "dropped", "examples", "items", "per epoch", "prompt tokens",
              "response tokens", "truncated prompts", "truncated responses"]
    by_source: Dict[str, List[ItemLengths]] = {c.name: [] for c in counts}
    for item in items:
        by_source[item.source].append(item)
    rows, warnings = [header], []
    for source in counts:
        own = by_source[source.name]
        n_responses = sum(len(item.responses) for item in own)
        pool, share = pool_sizes.get(source.name, len(own)), shares.get(source.name, len(own))
        per_epoch = f"{share}" + (f" ({share / pool:.2f}x)" if pool and share != len(own) else "")
        rows.append([source.name, "-" if source.rows_read is None else str(source.rows_read),
                     str(sum(source.dropped.values())), str(source.examples), str(len(own)), per_epoch,
                     percentiles([item.prompt for item in own]),
                     percentiles([length for item in own for length in item.responses]),
                     fraction(sum(item.prompt_truncated for item in own), len(own)),
                     fraction(sum(item.responses_truncated for item in own), n_responses)])
        warnings += source_warnings(source, own, pool, share, max_length, max_prompt_length)
    widths = [max(len(row[k]) for row in rows) for k in range(len(header))]
    table = "\n".join("  ".join(cell.ljust(width) for cell, width in zip(row, widths)).rstrip() for row in rows)
    return DataReport(f"{title}; token lengths are p{'/p'.join(map(str, PERCENTILES))}/max", table, warnings)


def source_warnings(source: SourceCounts, items: Sequence[ItemLengths], pool: int, share: int, max_length: int,
                    max_prompt_length: int) -> List[str]:
    warnings = []
    if source.dropped:
        reasons = ", ".join(f"{reason}: {count}" for reason, count in source.dropped.most_common())
        warnings.append(f"{source.name}: dropped {sum(source.dropped.values())} of {source.rows_read} rows ({reasons})")
    if pool < len(items):
        warnings.append(f"{source.name}: capped at {pool} of its {len(items)} items (dataset_max_examples)")
    if share > pool:
        warnings.append(f"{source.name}: oversampled {share / pool:.2f}x to reach its weight: {share} items per epoch "
                        f"from {pool}, so items repeat within an epoch")
    identical = sum(item.identical_pair for item in items)
    if identical:
        warnings.append(f"{source.name}: {identical} of {len(items)} pairs have identical chosen and rejected "
                        f"responses; pairwise losses learn nothing from them (DPO's loss stays at ln 2)")
    prompts_cut = sum(item.prompt_truncated for item in items)
    responses_cut = sum(item.responses_truncated for item in items)
    if prompts_cut or responses_cut:
        warnings.append(f"{source.name}: truncated {prompts_cut}/{len(items)} prompts to max_prompt_length="
                        f"{max_prompt_length} and {responses_cut}/{sum(len(i.responses) for i in items)} responses to "
                        f"fit max_length={max_length}")
    return warnings
