"""Hand-computed, closed-form and published-vector tests for the losses beyond the original's (losses.paired and
losses.unpaired): IPO, SimPO, ORPO, robust DPO, hinge, NCA, APO-zero/down, SPPO-hard, length-normalised DPO,
BCO (paired and unpaired).

Expected values are worked out from the literal inputs with `math`, never by calling the function under test;
float64 keeps the tolerances tight.
"""
import functools
import math

import pytest
import torch

import losses

assert_tight = functools.partial(torch.testing.assert_close, rtol=1e-12, atol=1e-12)
LN2 = math.log(2)


def vec(*values: float, requires_grad: bool = False) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.float64, requires_grad=requires_grad)


def scalar(value: float) -> torch.Tensor:
    return torch.tensor(value, dtype=torch.float64)


def sigmoid(x: float) -> float:
    return 1 / (1 + math.exp(-x))


def neg_log_sigmoid(x: float) -> float:
    return math.log1p(math.exp(-x))


# Three pairs: r_w = [0.5, -0.5, 2.0], r_l = [-1.0, 0.5, 1.0], lengths |y_w| = [1, 2, 4], |y_l| = [2, 1, 5].
PAIRED = dict(
    policy_chosen_logps=vec(-1.0, -2.0, -3.0),
    policy_rejected_logps=vec(-3.0, -1.5, -4.0),
    reference_chosen_logps=vec(-1.5, -1.5, -5.0),
    reference_rejected_logps=vec(-2.0, -2.0, -5.0),
)
R_W, R_L = [0.5, -0.5, 2.0], [-1.0, 0.5, 1.0]
LENGTHS = dict(chosen_lengths=vec(1, 2, 4), rejected_lengths=vec(2, 1, 5))
N_W, N_L = [1, 2, 4], [2, 1, 5]

# torchtune's DPO test fixture (tests/torchtune/rlhf/loss/test_dpo_loss.py): Δ = [0, 10, 20].
TORCHTUNE = dict(
    policy_chosen_logps=torch.tensor([-0.5, -10.0, -1.0]),
    policy_rejected_logps=torch.tensor([-0.1, -30.0, -21.0]),
    reference_chosen_logps=torch.tensor([-0.5, -10.1, -0.1]),
    reference_rejected_logps=torch.tensor([-0.1, -20.1, -0.1]),
)

REFERENCE_LOSSES = {  # name -> (function, extra keyword arguments)
    "rdpo": (losses.rdpo_loss, dict(beta=0.1, epsilon=0.2)),
    "hinge": (losses.hinge_loss, dict(beta=0.1)),
    "nca": (losses.nca_loss, dict(beta=0.1)),
    "apo-zero": (losses.apo_zero_loss, dict(beta=0.1)),
    "apo-down": (losses.apo_down_loss, dict(beta=0.1)),
    "sppo-hard": (losses.sppo_hard_loss, dict(beta=0.1)),
    "bco-pair": (losses.bco_pair_loss, dict(beta=0.1, delta=scalar(0.0))),
    "ipo": (losses.ipo_loss, dict(tau=0.1, **LENGTHS)),
    "dpo-norm": (losses.dpo_norm_loss, dict(beta=2.0, **LENGTHS)),
}


def at_initialisation(function, **kwargs):
    """The loss with π_θ = π_ref on the PAIRED log-probs (policy log-probs used as the reference too)."""
    policy = dict(policy_chosen_logps=PAIRED["policy_chosen_logps"],
                  policy_rejected_logps=PAIRED["policy_rejected_logps"])
    return function(**policy, reference_chosen_logps=policy["policy_chosen_logps"],
                    reference_rejected_logps=policy["policy_rejected_logps"], **kwargs)


@pytest.mark.parametrize("name, expected", [
    ("rdpo", LN2),  # ((1 − ε)·ln 2 − ε·ln 2)/(1 − 2ε)
    ("hinge", 1.0),
    ("nca", 2 * LN2),
    ("apo-zero", 1.0),
    ("apo-down", 1.0),
    ("sppo-hard", 1 / (2 * 0.1 ** 2)),  # 2·(1/(2β))²
    ("bco-pair", 2 * LN2),
    ("ipo", (1 / (2 * 0.1)) ** 2),  # finite: the normaliser is the token count, never a log-ratio
    ("dpo-norm", LN2),
])
def test_closed_forms_at_initialisation(name, expected):
    function, kwargs = REFERENCE_LOSSES[name]
    output = at_initialisation(function, **kwargs)
    assert_tight(output.losses, vec(expected, expected, expected))
    assert_tight(output.chosen_rewards, vec(0, 0, 0))


def test_dpo_matches_torchtunes_published_vector():
    """β = 0.1: −log σ([0, 1, 2]) = [0.6931, 0.3133, 0.1269]."""
    output = losses.dpo_loss(**TORCHTUNE, beta=0.1)
    torch.testing.assert_close(output.losses, torch.tensor([0.6931, 0.3133, 0.1269]), rtol=0, atol=5e-5)


def test_simpo_matches_the_published_vector_on_the_same_fixture():
    """Per-token log-probs (lengths 1): β = 2, γ = 0.5 ⇒ −log σ(2·[−0.4, 20, 20] − 0.5) = [1.5410, ≈0, ≈0]."""
    ones = torch.ones(3)
    output = losses.simpo_loss(TORCHTUNE["policy_chosen_logps"], TORCHTUNE["policy_rejected_logps"], ones, ones,
                               beta=2.0, gamma=0.5)
    torch.testing.assert_close(output.losses, torch.tensor([1.5410, 0.0, 0.0]), rtol=0, atol=5e-5)


def test_rdpo_hand_computed_and_unbiased_under_label_noise():
    """β = 0.1, ε = 0.2, Δ = [1.5, −1, 1]: ℓ = (0.8·(−log σ(0.1Δ)) − 0.2·(−log σ(−0.1Δ)))/0.6. Averaged over the
    label being right (1 − ε) or flipped (ε), the loss is the clean DPO loss (Chowdhury et al., Lemma 3.1)."""
    deltas = [w - l for w, l in zip(R_W, R_L)]
    output = losses.rdpo_loss(**PAIRED, beta=0.1, epsilon=0.2)
    expected = [(0.8 * neg_log_sigmoid(0.1 * d) - 0.2 * neg_log_sigmoid(-0.1 * d)) / 0.6 for d in deltas]
    assert_tight(output.losses, vec(*expected))
    flipped = losses.rdpo_loss(PAIRED["policy_rejected_logps"], PAIRED["policy_chosen_logps"],
                               PAIRED["reference_rejected_logps"], PAIRED["reference_chosen_logps"],
                               beta=0.1, epsilon=0.2)
    assert_tight(0.8 * output.losses + 0.2 * flipped.losses, losses.dpo_loss(**PAIRED, beta=0.1).losses)


def test_rdpo_with_zero_epsilon_is_dpo():
    assert_tight(losses.rdpo_loss(**PAIRED, beta=0.3, epsilon=0.0).losses, losses.dpo_loss(**PAIRED, beta=0.3).losses)


def test_hinge_hand_computed_and_flat_beyond_the_margin():
    """β = 0.5, Δ = [1.5, −1, 1] ⇒ max(0, 1 − 0.5Δ) = [0.25, 1.5, 0.5]; β = 1 puts pair 1 past the margin: 0."""
    assert_tight(losses.hinge_loss(**PAIRED, beta=0.5).losses, vec(0.25, 1.5, 0.5))
    chosen = PAIRED["policy_chosen_logps"].clone().requires_grad_()
    output = losses.hinge_loss(chosen, *list(PAIRED.values())[1:], beta=1.0)
    assert_tight(output.losses, vec(0.0, 2.0, 0.0))
    output.losses.sum().backward()
    assert_tight(chosen.grad, vec(0.0, -1.0, 0.0))  # pair 3 sits exactly at the hinge: torch's relu'(0) = 0


def test_nca_hand_computed():
    """β = 0.2: ℓ = −log σ(0.2r_w) − ½ log σ(−0.2r_w) − ½ log σ(−0.2r_l)."""
    expected = [neg_log_sigmoid(0.2 * w) + 0.5 * neg_log_sigmoid(-0.2 * w) + 0.5 * neg_log_sigmoid(-0.2 * l)
                for w, l in zip(R_W, R_L)]
    assert_tight(losses.nca_loss(**PAIRED, beta=0.2).losses, vec(*expected))


def test_apo_zero_and_down_hand_computed():
    """β = 0.3: zero = 1 − σ(0.3r_w) + σ(0.3r_l); down = σ(0.3r_w) + 1 − σ(0.3(r_w − r_l))."""
    zero = [1 - sigmoid(0.3 * w) + sigmoid(0.3 * l) for w, l in zip(R_W, R_L)]
    down = [sigmoid(0.3 * w) + 1 - sigmoid(0.3 * (w - l)) for w, l in zip(R_W, R_L)]
    assert_tight(losses.apo_zero_loss(**PAIRED, beta=0.3).losses, vec(*zero))
    assert_tight(losses.apo_down_loss(**PAIRED, beta=0.3).losses, vec(*down))


@pytest.mark.parametrize("function, chosen_gradient", [(losses.apo_zero_loss, -0.025), (losses.apo_down_loss, 0.0)])
def test_apo_anchors_at_initialisation(function, chosen_gradient):
    """At π_θ = π_ref with β = 0.1 (σ'(0) = 1/4): APO-zero raises the chosen likelihood (∂ℓ/∂logπ(y_w) = −β/4) and
    lowers the rejected one (+β/4); APO-down leaves the chosen one (β/4 − β/4 = 0) and lowers the rejected one."""
    chosen = PAIRED["policy_chosen_logps"].clone().requires_grad_()
    rejected = PAIRED["policy_rejected_logps"].clone().requires_grad_()
    function(chosen, rejected, chosen.detach(), rejected.detach(), beta=0.1).losses.sum().backward()
    assert_tight(chosen.grad, vec(*[chosen_gradient] * 3))
    assert_tight(rejected.grad, vec(0.025, 0.025, 0.025))


def test_sppo_hard_hand_computed():
    """β = 0.5 (targets ±1): ℓ = (r_w − 1)² + (r_l + 1)² = [0.25 + 0, 2.25 + 2.25, 1 + 4]."""
    assert_tight(losses.sppo_hard_loss(**PAIRED, beta=0.5).losses, vec(0.25, 4.5, 5.0))


def test_bco_pair_hand_computed_with_a_shift():
    """β = 0.1, δ = 0.05: ℓ = −log σ(0.1r_w − 0.05) − log σ(0.05 − 0.1r_l)."""
    expected = [neg_log_sigmoid(0.1 * w - 0.05) + neg_log_sigmoid(0.05 - 0.1 * l) for w, l in zip(R_W, R_L)]
    output = losses.bco_pair_loss(**PAIRED, delta=scalar(0.05), beta=0.1)
    assert_tight(output.losses, vec(*expected))
    assert_tight(output.chosen_rewards, vec(*[0.1 * w for w in R_W]))


def test_ipo_hand_computed_on_per_token_log_ratios():
    """τ = 0.5 (target 1): h = r_w/|y_w| − r_l/|y_l| = [0.5 + 0.5, −0.25 − 0.5, 0.5 − 0.2] ⇒ (h − 1)²."""
    h = [w / nw - l / nl for w, l, nw, nl in zip(R_W, R_L, N_W, N_L)]
    output = losses.ipo_loss(**PAIRED, **LENGTHS, tau=0.5)
    assert_tight(output.losses, vec(*[(x - 1) ** 2 for x in h]))
    assert_tight(output.chosen_rewards, vec(*[w / n for w, n in zip(R_W, N_W)]))


def test_dpo_norm_hand_computed_and_blind_to_length():
    """β = 2: ℓ = −log σ(2·(r_w/|y_w| − r_l/|y_l|)); a response repeated k times (log-probs and length ×k) changes
    nothing, where DPO's loss would move."""
    h = [w / nw - l / nl for w, l, nw, nl in zip(R_W, R_L, N_W, N_L)]
    output = losses.dpo_norm_loss(**PAIRED, **LENGTHS, beta=2.0)
    assert_tight(output.losses, vec(*[neg_log_sigmoid(2 * x) for x in h]))
    longer = dict(PAIRED, policy_chosen_logps=3 * PAIRED["policy_chosen_logps"],
                  reference_chosen_logps=3 * PAIRED["reference_chosen_logps"])
    repeated = losses.dpo_norm_loss(**longer, chosen_lengths=3 * LENGTHS["chosen_lengths"],
                                    rejected_lengths=LENGTHS["rejected_lengths"], beta=2.0)
    assert_tight(repeated.losses, output.losses)


def test_simpo_hand_computed_needs_no_reference():
    """β = 2, γ = 1: per-token log-probs [−1, −1, −0.75] and [−1.5, −1.5, −0.8] ⇒ −log σ(2·[0.5, 0.5, 0.05] − 1)."""
    output = losses.simpo_loss(PAIRED["policy_chosen_logps"], PAIRED["policy_rejected_logps"], **LENGTHS,
                               beta=2.0, gamma=1.0)
    assert_tight(output.losses, vec(neg_log_sigmoid(0.0), neg_log_sigmoid(0.0), neg_log_sigmoid(-0.9)))
    assert_tight(output.chosen_rewards, vec(-2.0, -2.0, -1.5))


def log_odds(a: float) -> float:
    return a - math.log(1 - math.exp(a))


def test_orpo_hand_computed():
    """λ = 0.5, per-token log-probs a_w = [−1, −1, −0.75], a_l = [−1.5, −1.5, −0.8]:
    ℓ = −a_w + 0.5·(−log σ(log odds(a_w) − log odds(a_l)))."""
    a_w, a_l = [-1.0, -1.0, -0.75], [-1.5, -1.5, -0.8]
    expected = [-w + 0.5 * neg_log_sigmoid(log_odds(w) - log_odds(l)) for w, l in zip(a_w, a_l)]
    output = losses.orpo_loss(PAIRED["policy_chosen_logps"], PAIRED["policy_rejected_logps"], **LENGTHS,
                              lambda_coef=0.5)
    assert_tight(output.losses, vec(*expected))


def test_orpo_log_odds_stay_finite_with_finite_gradients_near_probability_one():
    """At a per-token log-prob of −1e-12 (p ≈ 1) 1 − p cancels in naive arithmetic; log(−expm1) keeps 28 nats of
    log-odds. A log-prob that is exactly 0 gives finite odds too, and the unselected branch yields no NaN gradient."""
    logps = vec(-1e-12, 0.0, -50.0, -0.5, requires_grad=True)
    odds = losses.log_odds(logps)
    assert torch.isfinite(odds).all()
    assert odds[0].item() == pytest.approx(-math.log(1e-12), rel=1e-6)
    assert odds[2].item() == pytest.approx(-50.0, abs=1e-12)
    odds.sum().backward()
    assert torch.isfinite(logps.grad).all()
    ones = torch.ones(4, dtype=torch.float64)
    output = losses.orpo_loss(logps, vec(-3.0, -2.0, -60.0, -1.0), ones, ones, lambda_coef=0.1)
    assert torch.isfinite(output.losses).all()


def test_length_normalised_losses_refuse_empty_responses():
    with pytest.raises(losses.LossInputError, match="chosen_lengths must be >= 1"):
        losses.ipo_loss(**PAIRED, chosen_lengths=vec(1, 0, 2), rejected_lengths=vec(1, 1, 1), tau=0.1)


def test_bco_unpaired_hand_computed():
    """β = 0.5, δ = 0.1, r_chosen = [0.5, −1], r_rejected = [−1]: desirable −log σ(0.5r − 0.1), undesirable
    −log σ(0.1 − 0.5r); ln 2 each at π_θ = π_ref and δ = 0."""
    chosen, rejected = vec(-1.0, -2.0), vec(-3.0)
    output = losses.bco_loss(chosen, rejected, vec(-1.5, -1.0), vec(-2.0), scalar(0.1), beta=0.5)
    expected = [neg_log_sigmoid(0.25 - 0.1), neg_log_sigmoid(-0.5 - 0.1), neg_log_sigmoid(0.1 + 0.5)]
    assert_tight(output.losses, vec(*expected))
    at_init = losses.bco_loss(chosen, rejected, chosen, rejected, scalar(0.0), beta=0.5)
    assert_tight(at_init.losses, vec(LN2, LN2, LN2))


def test_kto_at_initialisation_is_half_the_weight():
    """π_θ = π_ref and z = 0: λ·(1 − σ(0)) = 0.5·λ for each class."""
    chosen, rejected = vec(-1.0, -2.0), vec(-3.0)
    output = losses.kto_loss(chosen, rejected, chosen, rejected, scalar(0.0), beta=0.1, desirable_weight=1.5,
                             undesirable_weight=0.4)
    assert_tight(output.losses, vec(0.75, 0.75, 0.2))


@pytest.mark.parametrize("function, kwargs, message", [
    (losses.dpo_loss, dict(beta=0.0), "beta must be > 0, got 0.0"),
    (losses.rdpo_loss, dict(beta=0.1, epsilon=0.5), r"epsilon must be in \[0, 0.5\), got 0.5"),
    (losses.ipo_loss, dict(tau=-1.0, **LENGTHS), "tau must be > 0, got -1.0"),
    (losses.hinge_loss, dict(beta=-0.1), "beta must be > 0"),
])
def test_out_of_range_hyperparameters_are_refused_by_the_function_too(function, kwargs, message):
    with pytest.raises(losses.LossInputError, match=message):
        function(**PAIRED, **kwargs)
