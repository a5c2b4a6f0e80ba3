"""Hand-computed tests of the scored-feedback losses (losses.scored: Bradley-Terry, offline GRPO) and of humanline
clipping (losses.humanline). Expected values are worked out from the literal inputs with `math`; float64 keeps the
tolerances tight."""
import functools
import math

import pytest
import torch

import losses

assert_tight = functools.partial(torch.testing.assert_close, rtol=1e-12, atol=1e-12)


def tensor(rows, requires_grad=False):
    return torch.tensor(rows, dtype=torch.float64, requires_grad=requires_grad)


def neg_log_sigmoid(x: float) -> float:
    return math.log1p(math.exp(-x))


def test_bradley_terry_hand_computed_with_its_gradient():
    """r_w − r_l = [1, −1, 0] ⇒ ℓ = [log(1 + e^−1), log(1 + e), ln 2]; ∂ℓ/∂r_w = −σ(−Δ) = −(1 − σ(Δ))."""
    chosen = tensor([1.0, 0.0, -2.0], requires_grad=True)
    output = losses.bradley_terry_loss(chosen, tensor([0.0, 1.0, -2.0]))
    assert_tight(output.losses, tensor([neg_log_sigmoid(1), neg_log_sigmoid(-1), math.log(2)]))
    assert_tight(output.chosen_rewards, tensor([1.0, 0.0, -2.0]))
    output.losses.sum().backward()
    sigmoid = lambda x: 1 / (1 + math.exp(-x))  # noqa: E731
    assert_tight(chosen.grad, tensor([-(1 - sigmoid(1)), -(1 - sigmoid(-1)), -0.5]))


def test_grpo_advantages_hand_computed():
    """Group 1 scores [1, 2, 3]: mean 2, population std √(2/3); group 2 [5, 5]: std 0, so advantages 0, not NaN."""
    std = math.sqrt(2 / 3)
    advantages = losses.grpo_advantages(tensor([1.0, 2.0, 3.0, 5.0, 5.0]), tensor([2.0, 2.0, 2.0, 5.0, 5.0]),
                                        tensor([std, std, std, 0.0, 0.0]), epsilon=1e-4)
    assert_tight(advantages, tensor([-1 / (std + 1e-4), 0.0, 1 / (std + 1e-4), 0.0, 0.0]))


# Two sequences: row 0 has 2 response tokens (its last position is padding), row 1 has 3.
POLICY = [[-1.0, -2.0, 0.0], [-0.5, -1.5, -3.0]]
REFERENCE = [[-1.2, -1.9, 0.0], [-0.5, -1.0, -3.5]]
MASK = torch.tensor([[True, True, False], [True, True, True]])
ADVANTAGES = [1.0, -0.5]
BETA, EPSILON = 0.1, 0.2


def hand_computed_grpo():
    """Per-token loss ℓ_t and whether the clipped term was taken, from the literal inputs."""
    rows = []
    for policy, reference, mask, advantage in zip(POLICY, REFERENCE, MASK.tolist(), ADVANTAGES):
        row = []
        for p, r, m in zip(policy, reference, mask):
            if not m:
                continue
            x = p - r
            ratio = math.exp(x)
            unclipped, clipped = ratio * advantage, min(max(ratio, 1 - EPSILON), 1 + EPSILON) * advantage
            kl = math.exp(-x) + x - 1
            # d/dθ of −ρA is −ρA unless the clipped term is taken (then the clamp passes no gradient);
            # d/dθ of KL_t = 1 − e^{−x}.
            gradient = (0.0 if clipped < unclipped else -unclipped) + BETA * (1 - math.exp(-x))
            row.append((-min(unclipped, clipped) + BETA * kl, kl, clipped < unclipped, gradient))
        rows.append(row)
    return rows


def test_grpo_loss_hand_computed_token_mean_and_gradient():
    """Token log-ratios [0.2, −0.1] and [0, −0.5, 0.5] with ε = 0.2: tokens (0,0) and (1,1) are clipped, (1,2) is
    not (the unclipped term is the smaller one for a negative advantage), so only its surrogate passes gradient
    among the ratios beyond [0.8, 1.2]."""
    expected = hand_computed_grpo()
    policy = tensor(POLICY, requires_grad=True)
    output = losses.grpo_loss(policy, tensor(REFERENCE), MASK, tensor(ADVANTAGES), 5.0, beta=BETA, epsilon=EPSILON)
    assert output.loss.item() == pytest.approx(sum(t[0] for row in expected for t in row) / 5, rel=1e-12)
    assert_tight(output.losses, tensor([sum(t[0] for t in row) / len(row) for row in expected]))
    assert_tight(output.kl, tensor([sum(t[1] for t in row) / len(row) for row in expected]))
    assert_tight(output.clipped, tensor([0.5, 1 / 3]))
    output.loss.backward()
    gradients = [[t[3] / 5 for t in row] + [0.0] * (3 - len(row)) for row in expected]
    assert_tight(policy.grad, tensor(gradients))


def test_grpo_at_initialisation_is_minus_the_advantage_per_token():
    """π_θ = π_ref: ρ = 1, KL = 0, so ℓ_t = −A and the gradient is −A/token_count on every response token."""
    policy = tensor(REFERENCE, requires_grad=True)
    output = losses.grpo_loss(policy, tensor(REFERENCE), MASK, tensor(ADVANTAGES), 5.0, beta=BETA, epsilon=EPSILON)
    assert output.loss.item() == pytest.approx((2 * -1.0 + 3 * 0.5) / 5, rel=1e-12)
    output.loss.backward()
    assert_tight(policy.grad, tensor([[-0.2, -0.2, 0.0], [0.1, 0.1, 0.1]]))


def test_grpo_token_mean_splits_over_micro_batches():
    """With the whole step's token count as the divisor, the rows' losses summed separately equal the step's loss:
    what makes GRPO independent of gradient accumulation and of the number of processes."""
    arguments = dict(beta=BETA, epsilon=EPSILON)
    whole = losses.grpo_loss(tensor(POLICY), tensor(REFERENCE), MASK, tensor(ADVANTAGES), 5.0, **arguments).loss
    parts = [losses.grpo_loss(tensor(POLICY)[k:k + 1], tensor(REFERENCE)[k:k + 1], MASK[k:k + 1],
                              tensor(ADVANTAGES)[k:k + 1], 5.0, **arguments).loss for k in (0, 1)]
    assert (parts[0] + parts[1]).item() == pytest.approx(whole.item(), rel=1e-12)


def test_grpo_rejects_an_empty_response_and_mismatched_rows():
    with pytest.raises(losses.LossInputError, match="at least one response token"):
        losses.grpo_loss(tensor(POLICY), tensor(REFERENCE), torch.zeros(2, 3, dtype=torch.bool), tensor(ADVANTAGES),
                         1.0, beta=0.1, epsilon=0.2)
    with pytest.raises(losses.LossInputError, match="advantages has 1 rows but mask has 2"):
        losses.grpo_loss(tensor(POLICY), tensor(REFERENCE), MASK, tensor([1.0]), 1.0, beta=0.1, epsilon=0.2)


def test_humanline_clamps_token_log_ratios_and_stops_their_gradient():
    """Log-ratios [2, −3, 0.5 | masked] clamped to [−1, 1] ⇒ [1, −1, 0.5, 0]; only the unclamped token has a
    gradient."""
    policy = tensor([[1.0, -4.0, -0.5, 7.0]], requires_grad=True)
    reference = tensor([[-1.0, -1.0, -1.0, -1.0]])
    mask = torch.tensor([[True, True, True, False]])
    clamped = losses.humanline_log_ratios(policy, reference, mask, log_epsilon_P=-1.0, log_epsilon_R=1.0)
    assert_tight(clamped, tensor([[1.0, -1.0, 0.5, 0.0]]))
    clamped.sum().backward()
    assert_tight(policy.grad, tensor([[0.0, 0.0, 1.0, 0.0]]))


def test_humanline_needs_bounds_around_zero():
    with pytest.raises(losses.LossInputError, match="log_epsilon_P <= 0 <= log_epsilon_R"):
        losses.humanline_log_ratios(tensor([[0.0]]), tensor([[0.0]]), torch.tensor([[True]]), log_epsilon_P=0.5,
                                    log_epsilon_R=1.0)
