"""judging.stats: each statistic against values computed by hand on small tables, and the length-controlled
win rate on synthetic judges that prefer longer answers."""

import math

import numpy as np
import pytest

from judging.stats import (bootstrap_counts, bootstrap_intervals, clopper_pearson_interval, cohen_kappa,
                            fit_length_logistic, length_controlled_rates, length_feature, percent_agreement,
                            percentile_interval, weighted_rates)

# float64 throughout; Newton's method stops on steps below 1e-12, so fitted values are good to ~1e-10.
FIT_TOLERANCE = 1e-9


def logit(p: float) -> float:
    return math.log(p / (1 - p))


def sigmoid(z: float) -> float:
    return 1 / (1 + math.exp(-z))


# ---- Clopper-Pearson ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("successes, trials, confidence, low, high", [
    (5, 10, 0.95, 0.187086, 0.812914),  # textbook values of the exact interval
    (1, 10, 0.95, 0.002529, 0.445016),
    (7, 20, 0.90, 0.177311, 0.558035),
    (0, 6, 0.90, 0.0, 0.393038),  # 1 - 0.05 ** (1/6)
    (6, 6, 0.90, 0.606962, 1.0),  # 0.05 ** (1/6)
])
def test_clopper_pearson_matches_textbook_values(successes, trials, confidence, low, high):
    assert clopper_pearson_interval(successes, trials, confidence) == pytest.approx((low, high), abs=1e-6)


def test_clopper_pearson_bounds_put_half_the_error_in_each_binomial_tail():
    successes, trials, confidence = 37, 80, 0.9
    low, high = clopper_pearson_interval(successes, trials, confidence)

    def pmf(i, p):
        return math.comb(trials, i) * p**i * (1 - p) ** (trials - i)

    assert sum(pmf(i, low) for i in range(successes, trials + 1)) == pytest.approx(0.05, abs=1e-9)
    assert sum(pmf(i, high) for i in range(successes + 1)) == pytest.approx(0.05, abs=1e-9)


# ---- length feature and length-controlled win rate --------------------------------------------------------------


def test_length_feature_squashes_the_standardised_difference():
    """d = [2, -2, 0, 4] has mean 1 and population sd sqrt((1 + 9 + 1 + 9) / 4) = sqrt(5)."""
    x = length_feature(np.array([12, 8, 10, 14]), np.array([10, 10, 10, 10]))
    assert x == pytest.approx(np.tanh(np.array([2, -2, 0, 4]) / math.sqrt(5)), abs=1e-15)
    assert length_feature(np.array([5, 7]), np.array([3, 5])).tolist() == [0.0, 0.0]  # sd 0: no length signal


def two_level_table():
    """x = -0.2 on 4 prompts (1 win) and x = 0.6 on 5 prompts (4 wins).

    With two levels the fit is exact: sigma(a + b x) equals each level's win fraction, so
    b = (logit 0.8 - logit 0.25) / 0.8 = 3.106133, a = logit 0.25 + 0.2 b = -0.477386 and LC = sigma(a) = 0.382870.
    """
    x = np.array([-0.2] * 4 + [0.6] * 5)
    wins = np.array([1, 0, 0, 0, 1, 1, 1, 1, 0], dtype=np.float64)
    slope = (logit(0.8) - logit(0.25)) / 0.8
    intercept = logit(0.25) + 0.2 * slope
    return x, wins, intercept, slope


def test_length_logistic_fit_on_two_levels_is_exact():
    x, wins, intercept, slope = two_level_table()
    fitted_intercept, fitted_slope = fit_length_logistic(x, wins, np.ones((1, len(x))))
    assert (fitted_intercept[0], fitted_slope[0]) == pytest.approx((intercept, slope), abs=FIT_TOLERANCE)
    assert (intercept, slope) == pytest.approx((-0.477386, 3.106133), abs=1e-6)
    lc = length_controlled_rates(x, wins, np.ones((1, len(x))))
    assert lc[0] == pytest.approx(sigmoid(intercept), abs=FIT_TOLERANCE)
    assert lc[0] == pytest.approx(0.382870, abs=1e-6)


def test_a_weight_of_two_counts_like_a_duplicated_prompt():
    x, wins, _, _ = two_level_table()
    weights = np.ones(len(x))
    weights[0] = 2  # the only win at x = -0.2 now counts twice: 2 of 5 there
    slope = (logit(0.8) - logit(0.4)) / 0.8
    intercept = logit(0.4) + 0.2 * slope
    duplicated = length_controlled_rates(np.append(x, x[0]), np.append(wins, wins[0]), np.ones((1, len(x) + 1)))
    weighted = length_controlled_rates(x, wins, weights[None])
    assert weighted[0] == pytest.approx(sigmoid(intercept), abs=FIT_TOLERANCE)
    assert weighted[0] == pytest.approx(duplicated[0], abs=FIT_TOLERANCE)


def test_rows_of_weights_are_fitted_independently():
    x, wins, intercept, _ = two_level_table()
    zero_one = np.ones((3, len(x)))
    zero_one[1, 4:] = 0  # only the x = -0.2 level is left: one win of four, all at one nonzero x
    zero_one[2, :] = 0
    zero_one[2, [1, 2]] = 1  # two non-wins only
    lc = length_controlled_rates(x, wins, zero_one)
    assert lc[0] == pytest.approx(sigmoid(intercept), abs=FIT_TOLERANCE)
    assert math.isnan(lc[1])  # every x is -0.2: no way to say what happens at 0
    assert lc[2] == 0.0


@pytest.mark.parametrize("x, wins, expected", [
    ([0.1, 0.5, -0.3], [1, 1, 1], 1.0),  # no non-win: the limit of every fit
    ([0.1, 0.5, -0.3], [0, 0, 0], 0.0),
    ([0.0, 0.0, 0.0, 0.0], [1, 0, 0, 1], 0.5),  # no length difference anywhere: the raw rate
    ([0.3, 0.3, 0.3], [1, 0, 0], math.nan),  # one nonzero x: nothing to extrapolate from
    ([-0.5, -0.1, 0.2, 0.7], [0, 0, 1, 1], math.nan),  # wins exactly where longer: slope runs off to infinity
    ([-0.5, 0.2, 0.2, 0.7], [0, 0, 1, 1], math.nan),  # quasi-separated: they only touch at x = 0.2
    ([-0.5, -0.1, 0.2, 0.7], [1, 1, 0, 0], math.nan),  # separated the other way
])
def test_length_controlled_rate_where_no_fit_exists(x, wins, expected):
    lc = length_controlled_rates(np.array(x), np.array(wins, dtype=np.float64), np.ones((1, len(x))))
    assert lc[0] == pytest.approx(expected, nan_ok=True)


def synthetic_judgments(n: int, quality: float, seed: int):
    """A judge whose verdicts follow logit P(candidate wins) = quality + 1.5 x, with the candidate's answers
    longer on average (length differences ~ N(80, 100)), so a longer answer tends to win whatever its quality."""
    rng = np.random.default_rng(seed)
    difference = rng.normal(80, 100, n)
    x = length_feature(difference, np.zeros(n))
    p = 1 / (1 + np.exp(-(quality + 1.5 * x)))
    return x, (rng.random(n) < p).astype(np.float64)


def lc_standard_error(x: np.ndarray, intercept: float, slope: float) -> float:
    """Delta-method standard error of sigma(a) from the fit's Fisher information."""
    p = 1 / (1 + np.exp(-(intercept + slope * x)))
    curvature = p * (1 - p)
    information = np.array([[curvature.sum(), (curvature * x).sum()], [(curvature * x).sum(),
                                                                       (curvature * x * x).sum()]])
    variance_a = np.linalg.inv(information)[0, 0]
    return sigmoid(intercept) * (1 - sigmoid(intercept)) * math.sqrt(variance_a)


@pytest.mark.parametrize("quality", [0.0, 0.4])
def test_length_control_removes_a_judges_preference_for_longer_answers(quality):
    """The raw win rate is pulled far above the quality-only rate sigma(quality) by length alone; the
    length-controlled rate recovers sigma(quality) to within 4 standard errors of the estimate."""
    n = 4000
    x, wins = synthetic_judgments(n, quality, seed=7)
    weights = np.ones((1, n))
    intercept, slope = fit_length_logistic(x, wins, weights)
    lc = length_controlled_rates(x, wins, weights)[0]
    standard_error = lc_standard_error(x, intercept[0], slope[0])
    assert abs(lc - sigmoid(quality)) < 4 * standard_error
    raw = wins.mean()
    raw_standard_error = math.sqrt(raw * (1 - raw) / n)
    assert raw - sigmoid(quality) > 10 * raw_standard_error  # the raw rate keeps the length bias


def test_without_a_length_bias_length_control_changes_little():
    """A judge that ignores length: the fitted slope is noise, and LC stays within 4 standard errors of raw."""
    n = 4000
    rng = np.random.default_rng(3)
    x = length_feature(rng.normal(80, 100, n), np.zeros(n))
    wins = (rng.random(n) < 0.6).astype(np.float64)
    intercept, slope = fit_length_logistic(x, wins, np.ones((1, n)))
    lc = length_controlled_rates(x, wins, np.ones((1, n)))[0]
    assert abs(lc - wins.mean()) < 4 * lc_standard_error(x, intercept[0], slope[0])


# ---- bootstrap ---------------------------------------------------------------------------------------------------


def test_bootstrap_counts_draw_n_prompts_per_resample_and_depend_only_on_the_seed():
    counts = bootstrap_counts(5, 200, seed=11)
    assert counts.shape == (200, 5) and (counts.sum(axis=1) == 5).all() and counts.min() >= 0
    assert (bootstrap_counts(5, 200, seed=11) == counts).all()
    assert (bootstrap_counts(5, 200, seed=12) != counts).any()


def test_weighted_rates_of_explicit_resamples():
    """Prompts (win, loss, win) drawn (3,0,0) -> 1; (0,2,1) -> 1/3; (1,1,1) with weight 3 on the loss -> 2/5."""
    wins = np.array([1.0, 0.0, 1.0])
    rows = np.array([[3, 0, 0], [0, 2, 1], [1, 3, 1], [0, 0, 0]], dtype=np.float64)
    rates = weighted_rates(wins, rows)
    assert rates[:3] == pytest.approx([1.0, 1 / 3, 2 / 5], abs=1e-15)
    assert math.isnan(rates[3])


def test_percentile_interval_uses_linear_quantiles():
    """Quantiles 0.1 and 0.9 of 0..10 are 1 and 9; of [0, 1] they are 0.1 and 0.9."""
    assert percentile_interval(np.arange(11.0), 0.8) == pytest.approx((1.0, 9.0), abs=1e-12)
    assert percentile_interval(np.array([0.0, 1.0]), 0.8) == pytest.approx((0.1, 0.9), abs=1e-12)


def test_bootstrap_intervals_are_the_percentiles_of_the_resampled_rates():
    x, wins = synthetic_judgments(60, 0.2, seed=5)
    weights = np.where(np.arange(60) % 7 == 0, 3.0, 1.0)
    intervals = bootstrap_intervals(wins, weights, x, resamples=300, seed=4, confidence=0.9)
    resampled = bootstrap_counts(60, 300, seed=4) * weights
    raw = weighted_rates(wins, resampled)
    lc = length_controlled_rates(x, wins, resampled)
    assert (intervals.raw_low, intervals.raw_high) == percentile_interval(raw, 0.9)
    assert intervals.lc_undefined == 0
    assert (intervals.lc_low, intervals.lc_high) == percentile_interval(lc, 0.9)
    assert intervals == bootstrap_intervals(wins, weights, x, resamples=300, seed=4, confidence=0.9)
    assert intervals != bootstrap_intervals(wins, weights, x, resamples=300, seed=5, confidence=0.9)


def test_bootstrap_leaves_the_lc_interval_open_when_some_resample_has_no_fit():
    x = np.array([-0.5, -0.1, 0.2, 0.7])
    wins = np.array([0.0, 1.0, 0.0, 1.0])
    intervals = bootstrap_intervals(wins, np.ones(4), x, resamples=200, seed=0, confidence=0.9)
    assert intervals.lc_undefined > 0 and intervals.lc_low is None and intervals.lc_high is None


# ---- agreement ---------------------------------------------------------------------------------------------------


def test_cohen_kappa_on_a_three_way_table():
    """Labels 1, 0, -1 on four items: p_o = 3/4; marginals (2,1,1)/4 and (1,2,1)/4 give
    p_e = 2/16 + 2/16 + 1/16 = 5/16, so kappa = (12/16 - 5/16) / (11/16) = 7/11."""
    first, second = [1, 1, 0, -1], [1, 0, 0, -1]
    assert percent_agreement(first, second) == 0.75
    assert cohen_kappa(first, second) == pytest.approx(7 / 11, abs=1e-15)


def test_cohen_kappa_on_a_two_way_table():
    """20 items: both yes 9, both no 5, yes/no 4, no/yes 2. p_o = 14/20 = 0.7; p_e = 0.65*0.55 + 0.35*0.45
    = 0.515; kappa = 0.185 / 0.485."""
    first = ["y"] * 9 + ["n"] * 5 + ["y"] * 4 + ["n"] * 2
    second = ["y"] * 9 + ["n"] * 5 + ["n"] * 4 + ["y"] * 2
    assert cohen_kappa(first, second) == pytest.approx(0.185 / 0.485, abs=1e-12)


def test_cohen_kappa_limits():
    assert cohen_kappa([1, 0, -1], [1, 0, -1]) == 1.0
    assert cohen_kappa([1, 1, 1], [1, 1, 1]) is None  # chance agreement is already 1
    assert cohen_kappa([1, -1], [-1, 1]) == pytest.approx(-1.0)
