"""Statistics of pairwise win rates: the exact binomial interval, the length-controlled win rate, bootstrap
intervals over prompts and agreement between judges. Pure functions of small arrays (numpy, no scipy).

Notation: `n` prompts, each with a candidate outcome `wins[i]` (1 if the candidate won, else 0), a weight
`weights[i]` (how many games the verdict counts as) and a length feature `x[i]`; `B` bootstrap resamples. The
formulas are written out in docs/compare.md.
"""

import math
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np

NEWTON_ITERATIONS = 100  # Newton's method converges in under 10 steps here; the cap only guards a bad start
NEWTON_TOLERANCE = 1e-12  # on the largest parameter step; float64 log-likelihoods resolve far below this
MAX_STEP_HALVINGS = 40
# Resamples fitted at once: the fit holds about ten (block, n) float64 arrays, 40 MB for n = 5,000.
BOOTSTRAP_BLOCK = 100


# ---- exact binomial interval ----------------------------------------------------------------------------------


def log_binomial_coefficient(n: int, k: int) -> float:
    return math.lgamma(n + 1) - math.lgamma(k + 1) - math.lgamma(n - k + 1)


def probability_at_least(successes: int, trials: int, p: float) -> float:
    """P(X >= successes) for X ~ Binomial(trials, p); equals the regularised I_p(k, n-k+1)."""
    if successes <= 0 or p >= 1.0:
        return 1.0
    if p <= 0.0:
        return 0.0
    log_p, log_q = math.log(p), math.log1p(-p)
    return math.fsum(
        math.exp(log_binomial_coefficient(trials, i) + i * log_p + (trials - i) * log_q)
        for i in range(successes, trials + 1)
    )


def clopper_pearson_lower(successes: int, trials: int, tail: float) -> float:
    """The p at which P(X >= successes) = tail, by bisection (the tail grows with p)."""
    if successes == 0:
        return 0.0
    low, high = 0.0, 1.0
    for _ in range(100):  # 100 halvings are far below float resolution
        middle = (low + high) / 2
        if probability_at_least(successes, trials, middle) < tail:
            low = middle
        else:
            high = middle
    return (low + high) / 2


def clopper_pearson_interval(successes: int, trials: int, confidence: float) -> tuple[float, float]:
    """Exact (Clopper-Pearson) two-sided binomial confidence interval for successes/trials.

    Same as `scipy.stats.binomtest(successes, trials).proportion_ci(confidence)`, which the original's plotting
    script uses. The upper bound is the lower bound of the failures, mirrored.
    """
    if trials < 1 or not 0 <= successes <= trials:
        raise ValueError(f"need 0 <= successes <= trials and trials >= 1, got {successes}/{trials}")
    tail = (1 - confidence) / 2
    lower = clopper_pearson_lower(successes, trials, tail)
    upper = 1.0 - clopper_pearson_lower(trials - successes, trials, tail)
    return lower, upper


# ---- length control --------------------------------------------------------------------------------------------


def length_feature(candidate_lengths: np.ndarray, baseline_lengths: np.ndarray) -> np.ndarray:
    """x = tanh(d / sd(d)) with d = candidate length - baseline length per prompt; 0 everywhere if sd(d) = 0.

    sd is the population standard deviation (ddof 0) over the given prompts. Shapes: (n,) in, (n,) out.
    """
    difference = np.asarray(candidate_lengths, dtype=np.float64) - np.asarray(baseline_lengths, dtype=np.float64)
    spread = difference.std()
    return np.tanh(difference / spread) if spread > 0 else np.zeros_like(difference)


def weighted_rates(wins: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """Win rate sum(w * y) / sum(w) of each row of weights (B, n) for wins (n,); NaN for an all-zero row."""
    total = weights.sum(axis=-1)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(total > 0, (weights * wins).sum(axis=-1) / np.where(total > 0, total, 1), np.nan)


def log_likelihood(intercept: np.ndarray, slope: np.ndarray, x: np.ndarray, wins: np.ndarray,
                   weights: np.ndarray) -> np.ndarray:
    """Weighted Bernoulli log-likelihood of logit P(win) = intercept + slope * x, per row. (B,) params, (B,) out."""
    logits = intercept[:, None] + slope[:, None] * x
    # log sigma(z) = -log(1 + e^-z); logaddexp keeps it finite for large |z|.
    return -(weights * (wins * np.logaddexp(0, -logits) + (1 - wins) * np.logaddexp(0, logits))).sum(axis=-1)


def fit_length_logistic(x: np.ndarray, wins: np.ndarray, weights: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Maximum-likelihood fit of logit P(win_i) = a + b * x_i, with sample weights, for each row of `weights`.

    Newton's method with step halving (the log-likelihood is concave). Only call it on rows where the estimate
    exists (see `length_controlled_rates`). Shapes: x (n,), wins (n,), weights (B, n); returns a (B,), b (B,).
    """
    rate = np.clip(weighted_rates(wins, weights), 1e-6, 1 - 1e-6)
    intercept, slope = np.log(rate / (1 - rate)), np.zeros(len(weights))
    current = log_likelihood(intercept, slope, x, wins, weights)
    for _ in range(NEWTON_ITERATIONS):
        p = 1 / (1 + np.exp(-(intercept[:, None] + slope[:, None] * x)))
        residual, curvature = weights * (wins - p), weights * p * (1 - p)
        g_a, g_b = residual.sum(-1), (residual * x).sum(-1)
        h_aa, h_ab, h_bb = curvature.sum(-1), (curvature * x).sum(-1), (curvature * x * x).sum(-1)
        determinant = h_aa * h_bb - h_ab ** 2
        step_a = (h_bb * g_a - h_ab * g_b) / determinant
        step_b = (h_aa * g_b - h_ab * g_a) / determinant
        scale = np.ones(len(weights))
        for _ in range(MAX_STEP_HALVINGS):
            trial = log_likelihood(intercept + scale * step_a, slope + scale * step_b, x, wins, weights)
            worse = trial < current - 1e-12 * np.abs(current)
            if not worse.any():
                break
            scale = np.where(worse, scale / 2, scale)
        intercept, slope = intercept + scale * step_a, slope + scale * step_b
        current = log_likelihood(intercept, slope, x, wins, weights)
        if np.max(scale * np.maximum(np.abs(step_a), np.abs(step_b))) < NEWTON_TOLERANCE:
            break
    return intercept, slope


def length_controlled_rates(x: np.ndarray, wins: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """P(win) at zero length difference, sigma(a), from the fit of `fit_length_logistic`, per row of weights.

    Where the maximum-likelihood estimate does not exist the value is decided without it or is NaN:
    * no weighted win (or no weighted loss) in the row: 0 (or 1), the limit of every fit;
    * every x of the row equal: the raw rate if that x is 0, else NaN (nothing to extrapolate from);
    * wins and non-wins separated by length (every non-win's x <= every win's x, or the reverse): NaN, since the
      slope runs off to infinity and P(win) at x = 0 has no limit that the data decide.
    Shapes: x (n,), wins (n,), weights (B, n); returns (B,).
    """
    present = weights > 0
    won, lost = present & (wins == 1), present & (wins == 0)
    x_row = np.broadcast_to(x, weights.shape)
    min_win, max_win = np.where(won, x_row, np.inf).min(-1), np.where(won, x_row, -np.inf).max(-1)
    min_loss, max_loss = np.where(lost, x_row, np.inf).min(-1), np.where(lost, x_row, -np.inf).max(-1)
    min_all, max_all = np.minimum(min_win, min_loss), np.maximum(max_win, max_loss)
    no_wins, no_losses = ~won.any(-1), ~lost.any(-1)
    constant = ~no_wins & ~no_losses & (min_all == max_all)
    separated = ~no_wins & ~no_losses & ~constant & ((max_loss <= min_win) | (max_win <= min_loss))
    result = np.full(len(weights), np.nan)
    result[no_wins], result[no_losses] = 0.0, 1.0
    constant_at_zero = constant & (min_all == 0)
    result[constant_at_zero] = weighted_rates(wins, weights[constant_at_zero])
    fit = ~no_wins & ~no_losses & ~constant & ~separated
    if fit.any():
        intercept, _ = fit_length_logistic(x, wins, weights[fit])
        result[fit] = 1 / (1 + np.exp(-intercept))
    return result


# ---- bootstrap over prompts -------------------------------------------------------------------------------------


def bootstrap_count_blocks(n: int, resamples: int, seed: int) -> Iterator[np.ndarray]:
    """How often each of n prompts is drawn in each of `resamples` draws of n prompts with replacement, in blocks
    of at most BOOTSTRAP_BLOCK resamples (so memory stays bounded). Each block is (rows, n).

    Drawn from one `numpy.random.default_rng(seed)`, so the same seed gives the same counts (and intervals).
    """
    rng = np.random.default_rng(seed)
    for start in range(0, resamples, BOOTSTRAP_BLOCK):
        yield rng.multinomial(n, np.full(n, 1.0 / n), size=min(BOOTSTRAP_BLOCK, resamples - start))


def bootstrap_counts(n: int, resamples: int, seed: int) -> np.ndarray:
    """All of `bootstrap_count_blocks` at once. (B, n)."""
    return np.concatenate(list(bootstrap_count_blocks(n, resamples, seed)))


def percentile_interval(values: np.ndarray, confidence: float) -> tuple[float, float]:
    """The (1-c)/2 and (1+c)/2 quantiles of `values` (numpy's default linear interpolation)."""
    low, high = np.quantile(values, [(1 - confidence) / 2, (1 + confidence) / 2])
    return float(low), float(high)


@dataclass(frozen=True)
class BootstrapIntervals:
    """Percentile bootstrap intervals of the raw and the length-controlled win rate.

    `lc_low`/`lc_high` are None when some resample has no length-controlled rate (`lc_undefined` of them).
    """

    raw_low: float
    raw_high: float
    lc_low: float | None
    lc_high: float | None
    lc_undefined: int


def bootstrap_intervals(wins: np.ndarray, weights: np.ndarray, x: np.ndarray, resamples: int, seed: int,
                        confidence: float) -> BootstrapIntervals:
    """Resample the n prompts `resamples` times; each prompt keeps its outcome, weight and length feature.

    Shapes: wins (n,), weights (n,), x (n,).
    """
    raw, lc = [], []
    for counts in bootstrap_count_blocks(len(wins), resamples, seed):
        resampled_weights = counts * weights
        raw.append(weighted_rates(wins, resampled_weights))
        lc.append(length_controlled_rates(x, wins, resampled_weights))
    raw, lc = np.concatenate(raw), np.concatenate(lc)
    undefined = int(np.isnan(lc).sum())
    lc_low, lc_high = percentile_interval(lc, confidence) if undefined == 0 else (None, None)
    return BootstrapIntervals(*percentile_interval(raw, confidence), lc_low, lc_high, undefined)


# ---- agreement between judges -----------------------------------------------------------------------------------


def percent_agreement(first: list, second: list) -> float:
    """The fraction of items on which two raters give the same label."""
    return sum(a == b for a, b in zip(first, second, strict=True)) / len(first)


def cohen_kappa(first: list, second: list) -> float | None:
    """Cohen's kappa (p_o - p_e) / (1 - p_e) of two raters' labels; None when p_e = 1 (one shared label)."""
    count = len(first)
    observed = percent_agreement(first, second)
    labels = set(first) | set(second)
    expected = sum((first.count(label) / count) * (second.count(label) / count) for label in labels)
    if expected >= 1.0:
        return None
    return (observed - expected) / (1 - expected)
