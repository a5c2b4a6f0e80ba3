"""Hand-computed and behavioural tests for losses.py.

Expected values are worked out from the literal inputs with `math`, never by calling the function
under test. Hand-computed tests use float64 so tolerances can be tight.
"""

import functools
import math

import pytest
import torch

import losses

assert_tight = functools.partial(torch.testing.assert_close, rtol=1e-12, atol=1e-12)


def vec(*values: float, requires_grad: bool = False) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.float64, requires_grad=requires_grad)


def mat(*rows: list[float], requires_grad: bool = False) -> torch.Tensor:
    return torch.tensor(rows, dtype=torch.float64, requires_grad=requires_grad)


def sigmoid(x: float) -> float:
    return 1 / (1 + math.exp(-x))


def neg_log_sigmoid(x: float) -> float:
    """−log σ(x) = log(1 + e^{−x})."""
    return math.log1p(math.exp(-x))


# Four pairs shared by the paired-loss tests:
#   r_w = policy_chosen − reference_chosen     = [0.5, −0.5, −1.0, 0.5]
#   r_l = policy_rejected − reference_rejected = [−0.5, 0.5, −0.5, −1.0]
#   Δ   = r_w − r_l                            = [1.0, −1.0, −0.5, 1.5]
PAIRED = dict(
    policy_chosen_logps=vec(-1.0, -2.0, -3.0, -0.5),
    policy_rejected_logps=vec(-2.0, -1.5, -3.0, -4.0),
    reference_chosen_logps=vec(-1.5, -1.5, -2.0, -1.0),
    reference_rejected_logps=vec(-1.5, -2.0, -2.5, -3.0),
)
DELTAS = [1.0, -1.0, -0.5, 1.5]


def test_dpo_loss_hand_computed():
    """β = 0.1: ℓ = −log σ(0.1·Δ); rewards 0.1·r_w = [0.05, −0.05, −0.1, 0.05], 0.1·r_l likewise."""
    out = losses.dpo_loss(**PAIRED, beta=0.1)
    assert_tight(out.losses, vec(*[neg_log_sigmoid(0.1 * d) for d in DELTAS]))
    assert_tight(out.chosen_rewards, vec(0.05, -0.05, -0.1, 0.05))
    assert_tight(out.rejected_rewards, vec(-0.05, 0.05, -0.05, -0.1))
    assert not out.chosen_rewards.requires_grad


def test_cdpo_loss_hand_computed():
    """β = 0.1, ε = 0.2: ℓ = 0.8·(−log σ(0.1Δ)) + 0.2·(−log σ(−0.1Δ))."""
    out = losses.cdpo_loss(**PAIRED, beta=0.1, epsilon=0.2)
    expected = [0.8 * neg_log_sigmoid(0.1 * d) + 0.2 * neg_log_sigmoid(-0.1 * d) for d in DELTAS]
    assert_tight(out.losses, vec(*expected))


def test_cdpo_with_zero_epsilon_equals_dpo():
    cdpo = losses.cdpo_loss(**PAIRED, beta=0.3, epsilon=0.0)
    dpo = losses.dpo_loss(**PAIRED, beta=0.3)
    for cdpo_field, dpo_field in zip(cdpo, dpo):
        assert_tight(cdpo_field, dpo_field)


def test_cdpo_at_half_epsilon_ignores_which_response_is_chosen():
    """At ε = 0.5 the loss is symmetric in Δ, so swapping chosen and rejected changes nothing."""
    swapped = dict(
        policy_chosen_logps=PAIRED["policy_rejected_logps"],
        policy_rejected_logps=PAIRED["policy_chosen_logps"],
        reference_chosen_logps=PAIRED["reference_rejected_logps"],
        reference_rejected_logps=PAIRED["reference_chosen_logps"],
    )
    original = losses.cdpo_loss(**PAIRED, beta=0.1, epsilon=0.5).losses
    assert_tight(losses.cdpo_loss(**swapped, beta=0.1, epsilon=0.5).losses, original)


def test_slic_loss_hand_computed():
    """β = 1, λ = 0.1; logπ(y_w) − logπ(y_l) = [0.5, 2.0, 2.5] ⇒ hinge = [0.5, 0, 0];
    regulariser 0.1·(−logπ(y_w)) = [0.1, 0.2, 0.05] ⇒ ℓ = [0.6, 0.2, 0.05]."""
    chosen, rejected = vec(-1.0, -2.0, -0.5), vec(-1.5, -4.0, -3.0)
    out = losses.slic_loss(chosen, rejected, beta=1.0, lambda_coef=0.1)
    assert_tight(out.losses, vec(0.6, 0.2, 0.05))
    assert_tight(out.chosen_rewards, chosen)
    assert_tight(out.rejected_rewards, rejected)


def test_slic_hinge_is_zero_from_the_margin_up_and_has_slope_minus_one_below():
    """β = 1, λ = 0: margins [1.0 (exactly β), 1.5 (above), 0.25 (below)] ⇒ hinge [0, 0, 0.75];
    ∂ℓ/∂logπ(y_w) is 0 above the margin and −1 below it, ∂ℓ/∂logπ(y_l) is 0 and +1."""
    chosen = vec(-1.0, -1.0, -1.0, requires_grad=True)
    rejected = vec(-2.0, -2.5, -1.25, requires_grad=True)
    out = losses.slic_loss(chosen, rejected, beta=1.0, lambda_coef=0.0)
    assert_tight(out.losses, vec(0.0, 0.0, 0.75))
    out.losses.sum().backward()
    assert_tight(chosen.grad[1:], vec(0.0, -1.0))
    assert_tight(rejected.grad[1:], vec(0.0, 1.0))


# KTO example: r_chosen = [−1.0 + 1.5, −2.0 + 1.0] = [0.5, −1.0]; r_rejected = [−3.0 + 2.0] = [−1.0].
KTO_INPUTS = dict(
    policy_chosen_logps=vec(-1.0, -2.0),
    policy_rejected_logps=vec(-3.0),
    reference_chosen_logps=vec(-1.5, -1.0),
    reference_rejected_logps=vec(-2.0),
)


def test_kto_loss_hand_computed():
    """β = 0.5, z = 0.2, λ_D = 2, λ_U = 3:
    desirable   2·(1 − σ(0.5·(0.5 − 0.2))) = 2·(1 − σ(0.15)),
                2·(1 − σ(0.5·(−1.0 − 0.2))) = 2·(1 − σ(−0.6));
    undesirable 3·(1 − σ(0.5·(0.2 + 1.0))) = 3·(1 − σ(0.6));
    rewards 0.5·r = [0.25, −0.5] and [−0.5]."""
    kl_estimate = torch.tensor(0.2, dtype=torch.float64)
    out = losses.kto_loss(**KTO_INPUTS, kl_estimate=kl_estimate, beta=0.5, desirable_weight=2.0, undesirable_weight=3.0)
    expected = [2 * (1 - sigmoid(0.15)), 2 * (1 - sigmoid(-0.6)), 3 * (1 - sigmoid(0.6))]
    assert_tight(out.losses, vec(*expected))
    assert_tight(out.chosen_rewards, vec(0.25, -0.5))
    assert_tight(out.rejected_rewards, vec(-0.5))
    assert_tight(out.kl_estimate, torch.tensor(0.2, dtype=torch.float64))


def test_kto_weights_scale_each_class():
    kl = torch.tensor(0.1, dtype=torch.float64)
    unweighted = losses.kto_loss(**KTO_INPUTS, kl_estimate=kl, beta=0.1, desirable_weight=1.0, undesirable_weight=1.0)
    weighted = losses.kto_loss(**KTO_INPUTS, kl_estimate=kl, beta=0.1, desirable_weight=4.0, undesirable_weight=0.5)
    assert_tight(weighted.losses, unweighted.losses * vec(4.0, 4.0, 0.5))


def test_kto_negative_kl_estimate_is_clamped_to_zero():
    def run(kl: float) -> losses.KTOLossOutput:
        kl_estimate = torch.tensor(kl, dtype=torch.float64)
        return losses.kto_loss(
            **KTO_INPUTS, kl_estimate=kl_estimate, beta=0.1, desirable_weight=1.0, undesirable_weight=1.0
        )

    clamped, zero = run(-0.7), run(0.0)
    assert_tight(clamped.losses, zero.losses)
    assert clamped.kl_estimate.item() == 0.0


def test_kto_reference_point_gets_no_gradient():
    raw_kl = torch.tensor(0.3, dtype=torch.float64, requires_grad=True)
    policy_chosen, policy_rejected = vec(-1.0, -2.0, requires_grad=True), vec(-3.0, requires_grad=True)
    out = losses.kto_loss(
        policy_chosen, policy_rejected, KTO_INPUTS["reference_chosen_logps"], KTO_INPUTS["reference_rejected_logps"],
        raw_kl * 2, beta=0.1, desirable_weight=1.0, undesirable_weight=1.0,
    )
    out.losses.sum().backward()
    assert raw_kl.grad is None
    assert policy_chosen.grad is not None and policy_rejected.grad is not None


@pytest.mark.parametrize("empty_class", ["rejected", "chosen"])
def test_kto_with_one_class_only_has_finite_losses(empty_class):
    """An all-desirable or all-undesirable microbatch: losses cover the present class only."""
    present, empty = vec(-1.0, -2.0, requires_grad=True), vec()
    inputs = dict(
        policy_chosen_logps=present if empty_class == "rejected" else empty,
        policy_rejected_logps=empty if empty_class == "rejected" else present,
        reference_chosen_logps=vec(-1.5, -1.0) if empty_class == "rejected" else empty,
        reference_rejected_logps=empty if empty_class == "rejected" else vec(-1.5, -1.0),
    )
    kl_estimate = torch.tensor(0.1, dtype=torch.float64)
    out = losses.kto_loss(**inputs, kl_estimate=kl_estimate, beta=0.1, desirable_weight=1.0, undesirable_weight=1.0)
    assert out.losses.shape == (2,)
    assert torch.isfinite(out.losses).all()
    empty_rewards = out.rejected_rewards if empty_class == "rejected" else out.chosen_rewards
    assert empty_rewards.shape == (0,)
    out.losses.sum().backward()
    assert torch.isfinite(present.grad).all()


def test_kto_kl_estimate_is_the_detached_unclamped_mean_log_ratio():
    """Log-ratios [−1 + 1.5, −2 + 1, −3 + 2] = [0.5, −1.0, −1.0] ⇒ mean −0.5 (clamping happens later)."""
    policy_kl = vec(-1.0, -2.0, -3.0, requires_grad=True)
    estimate = losses.kto_kl_estimate(policy_kl, vec(-1.5, -1.0, -2.0))
    assert_tight(estimate, torch.tensor(-0.5, dtype=torch.float64))
    assert estimate.shape == () and not estimate.requires_grad


# kto-simple example: r_chosen = [−1.0 + 1.5, −0.5 + 2.0] = [0.5, 1.5]  ⇒ z_c = max(0, 1.0) = 1.0;
#                     r_rejected = [−3.0 + 2.0, −1.6 + 2.0] = [−1.0, 0.4] ⇒ z_r = max(0, −0.3) = 0.
SIMPLE_KTO_INPUTS = dict(
    policy_chosen_logps=vec(-1.0, -0.5),
    policy_rejected_logps=vec(-3.0, -1.6),
    reference_chosen_logps=vec(-1.5, -2.0),
    reference_rejected_logps=vec(-2.0, -2.0),
)


def test_simple_kto_loss_hand_computed():
    """β = 0.1: desirable 1 − σ(0.1·(r − z_r)) = [1 − σ(0.05), 1 − σ(0.15)];
    undesirable 1 − σ(0.1·(z_c − r)) = [1 − σ(0.1·2.0), 1 − σ(0.1·0.6)]."""
    out = losses.simple_kto_loss(**SIMPLE_KTO_INPUTS, beta=0.1)
    expected = [1 - sigmoid(0.05), 1 - sigmoid(0.15), 1 - sigmoid(0.2), 1 - sigmoid(0.06)]
    assert_tight(out.losses, vec(*expected))
    assert_tight(out.chosen_rewards, vec(0.05, 0.15))
    assert_tight(out.rejected_rewards, vec(-0.1, 0.04))


def test_simple_kto_reference_points_are_detached():
    """Undesirable losses depend on the chosen rows only through z_c, so with z_c detached the
    chosen log-probs get exactly zero gradient from them (the original leaked gradient here)."""
    policy_chosen = SIMPLE_KTO_INPUTS["policy_chosen_logps"].clone().requires_grad_()
    out = losses.simple_kto_loss(**{**SIMPLE_KTO_INPUTS, "policy_chosen_logps": policy_chosen}, beta=0.1)
    out.losses[2:].sum().backward()
    assert_tight(policy_chosen.grad, vec(0.0, 0.0))


def test_simple_kto_with_an_empty_class_uses_zero_reference_point():
    """No undesirable rows ⇒ z_r = 0: ℓ = 1 − σ(0.1·r) = [1 − σ(0.05), 1 − σ(0.15)], no NaN."""
    inputs = {**SIMPLE_KTO_INPUTS, "policy_rejected_logps": vec(), "reference_rejected_logps": vec()}
    out = losses.simple_kto_loss(**inputs, beta=0.1)
    assert_tight(out.losses, vec(1 - sigmoid(0.05), 1 - sigmoid(0.15)))


def test_kto_zero_loss_hand_computed():
    """β = 0.1, reference point 0: desirable 1 − σ(0.1·[0.5, 1.5]); undesirable 1 − σ(−0.1·[−1.0, 0.4])."""
    out = losses.kto_zero_loss(**SIMPLE_KTO_INPUTS, beta=0.1)
    expected = [1 - sigmoid(0.05), 1 - sigmoid(0.15), 1 - sigmoid(0.1), 1 - sigmoid(-0.04)]
    assert_tight(out.losses, vec(*expected))


def test_sft_loss_is_negative_summed_log_prob():
    assert_tight(losses.sft_loss(vec(-2.5, -10.0)), vec(2.5, 10.0))


def test_paired_reward_accuracies_compare_each_pair_with_its_own_partner():
    """Own-partner comparison: [1 > 0, 0.5 > 0.7, −1 > −2, 2 > 3, 1 > 1] = [1, 0, 1, 0, 0].
    The original's reversed comparison would give [1 > 1, 0.5 > 3, −1 > −2, 2 > 0.7, 1 > 0] = [0, 0, 1, 1, 1]."""
    accuracies = losses.paired_reward_accuracies(vec(1.0, 0.5, -1.0, 2.0, 1.0), vec(0.0, 0.7, -2.0, 3.0, 1.0))
    assert_tight(accuracies, vec(1.0, 0.0, 1.0, 0.0, 0.0))


# --- PPO pieces ------------------------------------------------------------------------------

def test_gae_advantages_hand_computed():
    """γ = 0.9, λ = 0.8 (γλ = 0.72).
    Row 0, no padding: V = [0.5, 0.4, 0.3], R = [0, 0, 1]
      t=2: δ = 1 − 0.3 = 0.7                 A = 0.7
      t=1: δ = 0.9·0.3 − 0.4 = −0.13          A = −0.13 + 0.72·0.7 = 0.374
      t=0: δ = 0.9·0.4 − 0.5 = −0.14          A = −0.14 + 0.72·0.374 = 0.12928
      returns = A + V = [0.62928, 0.774, 1.0]
    Row 1, last token masked (its V = 5 and R = 7 are ignored): V = [0.2, 0.6, 0], R = [0, 1, 0]
      t=2: δ = 0                              A = 0
      t=1: δ = 1 + 0.9·0 − 0.6 = 0.4          A = 0.4
      t=0: δ = 0.9·0.6 − 0.2 = 0.34           A = 0.34 + 0.72·0.4 = 0.628
      returns = [0.828, 1.0, 0]"""
    values = mat([0.5, 0.4, 0.3], [0.2, 0.6, 5.0])
    rewards = mat([0.0, 0.0, 1.0], [0.0, 1.0, 7.0])
    mask = torch.tensor([[1, 1, 1], [1, 1, 0]])
    out = losses.gae_advantages(values, rewards, mask, gamma=0.9, lam=0.8)
    assert_tight(out.advantages, mat([0.12928, 0.374, 0.7], [0.628, 0.4, 0.0]))
    assert_tight(out.returns, mat([0.62928, 0.774, 1.0], [0.828, 1.0, 0.0]))


def test_masked_mean_and_var_ignore_masked_entries():
    """Unmasked [1, 4, 7, 2]: mean 3.5; population var (2.5² + 0.5² + 3.5² + 1.5²)/4 = 21/4."""
    values = mat([1.0, 4.0, math.nan], [7.0, math.inf, 2.0])
    mask = torch.tensor([[True, True, False], [True, False, True]])
    assert_tight(losses.masked_mean(values, mask), torch.tensor(3.5, dtype=torch.float64))
    assert_tight(losses.masked_var(values, mask), torch.tensor(5.25, dtype=torch.float64))


def test_whiten_hand_computed():
    """Unmasked [1, 2, 3]: μ = 2, σ² = 2/3 ⇒ (x − 2)/sqrt(2/3 + 1e−8); the masked 100 becomes 0."""
    scale = 1 / math.sqrt(2 / 3 + 1e-8)
    whitened = losses.whiten(mat([1.0, 2.0, 3.0, 100.0]), torch.tensor([[1, 1, 1, 0]]))
    assert_tight(whitened, mat([-scale, 0.0, scale, 0.0]))


# PPO example (cliprange 0.5 ⇒ ρ clamped to [0.5, 2]; old log-probs 0 ⇒ ρ = exp(logp)):
#   row 0, tokens 0-1 unmasked: ρ = [3, 0.8], A = [1, −2]
#     token 0: max(−1·3, −1·2) = −2 (clipped term wins); token 1: max(1.6, 1.6) = 1.6
#   row 1, token 0 unmasked:     ρ = 1.5, A = −1 ⇒ max(1.5, 1.5) = 1.5
#   policy = (−2 + 1.6 + 1.5)/3 = 1.1/3; clipfrac = 1/3
PPO_LOGPS = mat([math.log(3.0), math.log(0.8), 5.0], [math.log(1.5), 4.0, -4.0])
PPO_ADVANTAGES = mat([1.0, -2.0, 100.0], [-1.0, 100.0, -100.0])
PPO_MASK = torch.tensor([[1, 1, 0], [1, 0, 0]])


def test_ppo_policy_loss_hand_computed():
    out = losses.ppo_policy_loss(PPO_LOGPS, torch.zeros_like(PPO_LOGPS), PPO_ADVANTAGES, PPO_MASK, cliprange=0.5)
    assert_tight(out.loss, torch.tensor(1.1 / 3, dtype=torch.float64))
    assert_tight(out.clipfrac, torch.tensor(1 / 3, dtype=torch.float64))


def test_ppo_loss_hand_computed():
    """critic: V − target = [−0.5, 0.2 | 0.3] ⇒ 0.5·(0.25 + 0.04 + 0.09)/3;
    KL: ⟨logp_ref − logp⟩ = ((0 − ln 3) + (ln 0.5 − ln 0.8) + (ln 2 − ln 1.5))/3;
    seq ratio: mean(3·0.8, 1.5) = 1.95; total = policy + 0.01·critic + 0.1·KL."""
    values = mat([0.5, 0.2, 9.0], [0.3, 7.0, 7.0])
    targets = mat([1.0, 0.0, -9.0], [0.0, 5.0, 5.0])
    reference = mat([0.0, math.log(0.5), 3.0], [math.log(2.0), 0.0, 0.0])
    out = losses.ppo_loss(
        PPO_LOGPS, values, torch.zeros_like(PPO_LOGPS), reference, PPO_ADVANTAGES, targets, PPO_MASK,
        cliprange=0.5, critic_coef=0.01, kl_coef=0.1,
    )
    policy = 1.1 / 3
    critic = 0.5 * (0.25 + 0.04 + 0.09) / 3
    kl = (-math.log(3.0) + math.log(0.5) - math.log(0.8) + math.log(2.0) - math.log(1.5)) / 3
    scalar = functools.partial(torch.tensor, dtype=torch.float64)
    assert_tight(out.policy_loss, scalar(policy))
    assert_tight(out.critic_loss, scalar(critic))
    assert_tight(out.kl_penalty, scalar(kl))
    assert_tight(out.clipfrac, scalar(1 / 3))
    assert_tight(out.seq_ratio, scalar(1.95))
    assert_tight(out.loss, scalar(policy + 0.01 * critic + 0.1 * kl))


def test_ppo_clipping_stops_gradient_beyond_the_clip_range():
    """A = 1 on both tokens, cliprange 0.5. Token 0: ρ = 3 > 1/0.5 ⇒ loss −2, constant ⇒ gradient 0.
    Token 1: ρ = 0.25 < 0.5 ⇒ the unclipped −ρ is the larger term ⇒ ∂/∂logp = −ρ/2 = −0.125."""
    logps = mat([math.log(3.0), math.log(0.25)], requires_grad=True)
    out = losses.ppo_policy_loss(logps, torch.zeros_like(logps), mat([1.0, 1.0]), torch.ones(1, 2), cliprange=0.5)
    out.loss.backward()
    assert_tight(logps.grad, mat([0.0, -0.125]))
    assert out.clipfrac.item() == 0.5


def test_ppo_policy_loss_lower_for_higher_advantages():
    logps, old = mat([-1.0, -2.0, -0.5]), mat([-1.1, -1.9, -0.5])
    mask = torch.ones(1, 3)
    low = losses.ppo_policy_loss(logps, old, mat([0.1, -0.3, 0.2]), mask, cliprange=0.2).loss
    high = losses.ppo_policy_loss(logps, old, mat([1.1, 0.7, 1.2]), mask, cliprange=0.2).loss
    assert high < low


def test_entropy_from_logits_hand_computed():
    """Token 0: logits [0, ln 3] ⇒ p = [1/4, 3/4], H = −(¼·ln ¼ + ¾·ln ¾); token 1: uniform ⇒ ln 2;
    token 2 is masked. Mean = (H_0 + ln 2)/2."""
    logits = torch.tensor([[[0.0, math.log(3.0)], [5.0, 5.0], [100.0, -100.0]]], dtype=torch.float64)
    entropy_0 = -(0.25 * math.log(0.25) + 0.75 * math.log(0.75))
    expected = torch.tensor((entropy_0 + math.log(2.0)) / 2, dtype=torch.float64)
    assert_tight(losses.entropy_from_logits(logits, torch.tensor([[1, 1, 0]])), expected)


# --- gradients and input validation ----------------------------------------------------------

def _summed_loss_with_fixed_reference(loss_fn, **hyperparameters):
    def run(chosen, rejected):
        return loss_fn(chosen, rejected, vec(-1.5, -1.0), vec(-1.0, -2.5), **hyperparameters).losses.sum()
    return run


LOSSES_OF_SEQUENCE_LOGPS = {
    "sft": lambda chosen, rejected: losses.sft_loss(chosen).sum(),
    "dpo": _summed_loss_with_fixed_reference(losses.dpo_loss, beta=0.1),
    "cdpo": _summed_loss_with_fixed_reference(losses.cdpo_loss, beta=0.1, epsilon=0.2),
    "slic": lambda chosen, rejected: losses.slic_loss(chosen, rejected, beta=1.0, lambda_coef=0.1).losses.sum(),
    "kto": lambda chosen, rejected: losses.kto_loss(
        chosen, rejected, vec(-1.5, -1.0), vec(-1.0, -2.5), torch.tensor(0.1, dtype=torch.float64),
        beta=0.1, desirable_weight=1.0, undesirable_weight=1.0,
    ).losses.sum(),
    "kto-simple": _summed_loss_with_fixed_reference(losses.simple_kto_loss, beta=0.1),
    "kto-zero": _summed_loss_with_fixed_reference(losses.kto_zero_loss, beta=0.1),
}


@pytest.mark.parametrize("name", LOSSES_OF_SEQUENCE_LOGPS)
def test_gradient_reaches_policy_logps(name):
    chosen, rejected = vec(-1.0, -2.0, requires_grad=True), vec(-1.2, -2.2, requires_grad=True)
    LOSSES_OF_SEQUENCE_LOGPS[name](chosen, rejected).backward()
    assert torch.isfinite(chosen.grad).all() and chosen.grad.abs().sum() > 0
    if name != "sft":
        assert torch.isfinite(rejected.grad).all() and rejected.grad.abs().sum() > 0


def test_gradient_reaches_ppo_logps_and_values():
    logps = mat([-1.0, -2.0], requires_grad=True)
    values = mat([0.3, 0.1], requires_grad=True)
    out = losses.ppo_loss(
        logps, values, mat([-1.1, -1.9]), mat([-1.1, -1.9]), mat([0.5, -0.5]), mat([1.0, 0.0]), torch.ones(1, 2),
        cliprange=0.5, critic_coef=0.01, kl_coef=0.1,
    )
    out.loss.backward()
    assert logps.grad.abs().sum() > 0 and values.grad.abs().sum() > 0


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (lambda: losses.dpo_loss(vec(1.0, 2.0), vec(1.0), vec(1.0, 2.0), vec(1.0, 2.0), beta=0.1),
         "dpo_loss: policy_rejected_logps has shape \\(1,\\)"),
        (lambda: losses.dpo_loss(mat([1.0, 2.0]), mat([1.0, 2.0]), mat([1.0, 2.0]), mat([1.0, 2.0]), beta=0.1),
         "policy_chosen_logps must have shape \\(B,\\)"),
        (lambda: losses.cdpo_loss(vec(1.0), vec(1.0), vec(1.0), vec(1.0), beta=0.1, epsilon=0.7),
         "epsilon must be in \\[0, 0.5\\]"),
        (lambda: losses.slic_loss(vec(1.0, 2.0), vec(1.0, 2.0, 3.0), beta=1.0, lambda_coef=0.1),
         "slic_loss: policy_rejected_logps"),
        (lambda: losses.kto_loss(vec(1.0), vec(1.0), vec(1.0), vec(1.0), vec(0.1, 0.2), beta=0.1,
                                 desirable_weight=1.0, undesirable_weight=1.0),
         "kl_estimate must be a scalar"),
        (lambda: losses.kto_loss(vec(1.0, 2.0), vec(1.0), vec(1.0), vec(1.0), torch.tensor(0.0), beta=0.1,
                                 desirable_weight=1.0, undesirable_weight=1.0),
         "kto_loss: reference_chosen_logps has shape"),
        (lambda: losses.simple_kto_loss(vec(1.0), vec(1.0, 2.0), vec(1.0), vec(1.0), beta=0.1),
         "simple_kto_loss: reference_rejected_logps"),
        (lambda: losses.kto_kl_estimate(vec(), vec()), "at least one KL pair"),
        (lambda: losses.sft_loss(mat([1.0, 2.0])), "sft_loss: policy_logps must have shape \\(B,\\)"),
        (lambda: losses.paired_reward_accuracies(vec(1.0, 2.0), vec(1.0)), "paired_reward_accuracies"),
        (lambda: losses.gae_advantages(mat([1.0, 2.0]), mat([1.0]), torch.ones(1, 2), gamma=0.9, lam=0.9),
         "gae_advantages: rewards has shape"),
        (lambda: losses.gae_advantages(mat([1.0]), mat([1.0]), torch.ones(1, 1), gamma=1.5, lam=0.9),
         "gamma must be in \\[0, 1\\]"),
        (lambda: losses.ppo_policy_loss(mat([1.0, 2.0]), mat([1.0, 2.0]), mat([1.0, 2.0]), torch.ones(2, 1),
                                        cliprange=0.5),
         "ppo_policy_loss: mask has shape"),
        (lambda: losses.ppo_policy_loss(mat([1.0]), mat([1.0]), mat([1.0]), torch.ones(1, 1), cliprange=1.5),
         "cliprange must be in \\(0, 1\\]"),
        (lambda: losses.masked_mean(mat([1.0, 2.0]), torch.ones(2)), "masked_mean: mask has shape"),
        (lambda: losses.entropy_from_logits(mat([1.0, 2.0]), torch.ones(1, 2)), "logits must have shape"),
    ],
)
def test_bad_input_raises_one_line_value_error(call, message):
    with pytest.raises(losses.LossInputError, match=message) as error:
        call()
    assert isinstance(error.value, ValueError)
    assert "\n" not in str(error.value)
