"""rlhf.algos as a specification: worked examples with their expected numbers and why.

The numbered examples are the source texts' worked examples of the objective; each is
checked on the value and on the autograd gradient.
"""

import math

import pytest
import torch

from rlhf import algos
from rlhf.algos import (
    AdaptiveKLController,
    FixedKLController,
    a2c_policy_loss,
    compute_gae,
    entropy_from_logits,
    explained_variance,
    kl_penalty,
    logprobs_and_entropy_from_logits,
    logprobs_from_logits,
    masked_mean,
    masked_var,
    masked_whiten,
    pairwise_reward_loss,
    ppo_clip_side,
    ppo_policy_loss,
    shape_rewards,
    value_loss,
)

f64 = torch.float64


def one_token_ppo(ratio, advantage, clip_eps=0.2, clip_eps_high=None):
    """PPO on a single token with the given ratio. Returns (objective U_clip, dU/dlog pi,
    stats): U is minus the loss."""
    logprobs = torch.tensor([[math.log(ratio)]], dtype=f64, requires_grad=True)
    old_logprobs = torch.zeros(1, 1, dtype=f64)
    advantages = torch.tensor([[advantage]], dtype=f64)
    loss, stats = ppo_policy_loss(logprobs, old_logprobs, advantages, torch.ones(1, 1), clip_eps, clip_eps_high)
    loss.backward()
    return -loss.item(), -logprobs.grad.item(), stats


# --------------------------------------------------------------------------------------
# PPO clipped surrogate: examples 1-3
# --------------------------------------------------------------------------------------


def test_example_1_ratio_1_5_positive_advantage_is_capped_at_1_2_A_with_zero_gradient():
    # min(1.5 * 2, 1.2 * 2) = 2.4: the clipped branch; its gradient is 0, so this step
    # does not push the token's probability further up.
    objective, grad, stats = one_token_ppo(ratio=1.5, advantage=2.0)
    assert objective == pytest.approx(2.4)
    assert grad == 0.0
    assert stats["clipfrac"] == 1.0


def test_example_2_ratio_3_large_positive_advantage_gain_capped_zero_gradient():
    # min(3 * 10, 1.2 * 10) = 12: the gain is capped at (1 + eps) * A.
    objective, grad, stats = one_token_ppo(ratio=3.0, advantage=10.0)
    assert objective == pytest.approx(12.0)
    assert grad == 0.0
    assert stats["clipfrac"] == 1.0
    assert stats["ratio_max"] == pytest.approx(3.0)


def test_example_3_ratio_0_5_negative_advantage_gives_minus_2_with_zero_gradient():
    # min(0.5 * -2.5, 0.8 * -2.5) = min(-1.25, -2.0) = -2.0: the clipped branch, so the
    # probability is not pushed down any further in this step.
    objective, grad, stats = one_token_ppo(ratio=0.5, advantage=-2.5)
    assert objective == pytest.approx(-2.0)
    assert grad == 0.0
    assert stats["clipfrac"] == 1.0


@pytest.mark.parametrize(
    "ratio, advantage",
    [
        (1.1, 2.0),  # inside [0.8, 1.2]
        (0.5, 2.0),  # below the range, but A > 0: min picks 0.5 * A, which can still rise
        (1.5, -1.0),  # above the range, but A < 0: min picks 1.5 * A, which can still fall
    ],
)
def test_unclipped_tokens_get_the_gradient_of_rho_times_A(ratio, advantage):
    # d(rho * A)/d log pi = rho * A, because rho = exp(log pi - log pi_old).
    objective, grad, stats = one_token_ppo(ratio, advantage)
    assert objective == pytest.approx(ratio * advantage)
    assert grad == pytest.approx(ratio * advantage)
    assert grad != 0.0
    assert stats["clipfrac"] == 0.0


def test_clip_eps_high_widens_only_the_upper_side():
    # With clip_eps_high = 0.6 the upper bound is 1.6: ratio 1.5 with A > 0 is not clipped...
    objective, grad, _ = one_token_ppo(1.5, 2.0, clip_eps=0.2, clip_eps_high=0.6)
    assert (objective, grad) == (pytest.approx(3.0), pytest.approx(3.0))
    # ...while the lower bound stays 0.8.
    objective, grad, _ = one_token_ppo(0.5, -2.5, clip_eps=0.2, clip_eps_high=0.6)
    assert (objective, grad) == (pytest.approx(-2.0), 0.0)


def test_ppo_clip_side_marks_the_tokens_whose_clipped_branch_is_selected():
    ratio = torch.tensor([[1.5, 1.5, 0.5, 0.5, 1.0, 1.3]])
    advantages = torch.tensor([[1.0, -1.0, -1.0, 1.0, 1.0, 1.0]])
    # +1: capped gain (rho > 1.2, A > 0); -1: capped loss (rho < 0.8, A < 0); else 0.
    assert ppo_clip_side(ratio, advantages).tolist() == [[1, 0, -1, 0, 0, 1]]
    # A wider upper side (1.6) releases both capped gains; the lower side (0.8) is unchanged.
    assert ppo_clip_side(ratio, advantages, 0.2, clip_eps_high=0.6).tolist() == [[0, 0, -1, 0, 0, 0]]


def test_ppo_stats_on_two_tokens():
    # Tokens with ratios 1.5 (A=+1, clipped) and 0.5 (A=+1, not clipped).
    logprobs = torch.log(torch.tensor([[1.5, 0.5]], dtype=f64))
    loss, stats = ppo_policy_loss(logprobs, torch.zeros(1, 2, dtype=f64), torch.ones(1, 2, dtype=f64), torch.ones(1, 2))
    assert loss.item() == pytest.approx(-(1.2 + 0.5) / 2)
    assert stats["clipfrac"] == 0.5
    assert stats["ratio_mean"] == pytest.approx(1.0)
    assert stats["ratio_max"] == pytest.approx(1.5)
    # approx_kl is the k3 estimate of KL(pi_old || pi): mean((rho - 1) - log rho).
    assert stats["approx_kl"] == pytest.approx(((0.5 - math.log(1.5)) + (-0.5 - math.log(0.5))) / 2)
    assert all(isinstance(v, float) for v in stats.values())


def test_ppo_at_ratio_one_equals_a2c_gradient_and_stats_are_zero():
    # At the first PPO epoch pi == pi_old: the gradient of rho * A is A * grad log pi,
    # the same as A2C's; nothing is clipped and the approximate KL is 0.
    torch.manual_seed(0)
    logprobs = torch.randn(3, 4, dtype=f64).requires_grad_()
    advantages = torch.randn(3, 4, dtype=f64)
    mask = torch.ones(3, 4)
    loss, stats = ppo_policy_loss(logprobs, logprobs.detach(), advantages, mask)
    (ppo_grad,) = torch.autograd.grad(loss, logprobs)
    (a2c_grad,) = torch.autograd.grad(a2c_policy_loss(logprobs, advantages, mask), logprobs)
    torch.testing.assert_close(ppo_grad, a2c_grad)
    assert stats["clipfrac"] == 0.0 and stats["approx_kl"] == 0.0 and stats["ratio_mean"] == 1.0


def test_advantages_and_old_logprobs_get_no_gradient():
    logprobs = torch.zeros(1, 2, requires_grad=True)
    old_logprobs = torch.zeros(1, 2, requires_grad=True)
    advantages = torch.ones(1, 2, requires_grad=True)
    loss, _ = ppo_policy_loss(logprobs, old_logprobs, advantages, torch.ones(1, 2))
    (loss + a2c_policy_loss(logprobs, advantages, torch.ones(1, 2))).backward()
    assert logprobs.grad is not None
    assert old_logprobs.grad is None and advantages.grad is None


# --------------------------------------------------------------------------------------
# A2C: example 4, and examples 5 and 7 as one optimiser step
# --------------------------------------------------------------------------------------


def test_example_4_innovative_minus_12_effective_minus_2_4():
    # U = log pi * A: 'innovative' -3.0 * 4.0 = -12.0; 'effective' -1.2 * 2.0 = -2.4.
    mask = torch.ones(1, 1)
    innovative = torch.tensor([[-3.0]], requires_grad=True)
    effective = torch.tensor([[-1.2]], requires_grad=True)
    u_innovative = -a2c_policy_loss(innovative, torch.tensor([[4.0]]), mask)
    u_effective = -a2c_policy_loss(effective, torch.tensor([[2.0]]), mask)
    assert u_innovative.item() == pytest.approx(-12.0)
    assert u_effective.item() == pytest.approx(-2.4)
    assert u_effective > u_innovative  # 'effective' makes the larger contribution to U
    # dU/dlog pi = A: the advantage is the weight of each token's log-prob gradient.
    u_innovative.backward()
    u_effective.backward()
    assert innovative.grad.item() == pytest.approx(4.0)
    assert effective.grad.item() == pytest.approx(2.0)
    # Both tokens in one batch: the loss is the mean over real tokens, -(-12 - 2.4) / 2.
    both = a2c_policy_loss(torch.tensor([[-3.0, -1.2]]), torch.tensor([[4.0, 2.0]]), torch.ones(1, 2))
    assert both.item() == pytest.approx(7.2)


def sgd_step_probability(loss_kind, advantage, maximise_utility=False):
    """Probability of token 2 of a 5-token categorical policy before and after one SGD
    step on the chosen loss, for one sampled token 2 with the given advantage."""
    torch.manual_seed(0)
    logits = torch.randn(5, requires_grad=True)
    optimiser = torch.optim.SGD([logits], lr=0.5)
    before = torch.softmax(logits, -1)[2].item()
    logprobs = torch.log_softmax(logits, -1)[2].reshape(1, 1)
    advantages, mask = torch.tensor([[advantage]]), torch.ones(1, 1)
    if loss_kind == "ppo":
        loss, _ = ppo_policy_loss(logprobs, logprobs.detach(), advantages, mask)
    else:
        loss = a2c_policy_loss(logprobs, advantages, mask)
    if maximise_utility:
        loss = -loss  # example 7: minimising +E[U] instead of -E[U]
    optimiser.zero_grad()
    loss.backward()
    optimiser.step()
    return before, torch.softmax(logits, -1)[2].item()


@pytest.mark.parametrize("loss_kind", ["ppo", "a2c"])
def test_example_5_one_sgd_step_raises_positive_and_lowers_negative_advantage_tokens(loss_kind):
    before, after = sgd_step_probability(loss_kind, advantage=+1.0)
    assert after > before
    before, after = sgd_step_probability(loss_kind, advantage=-1.0)
    assert after < before


@pytest.mark.parametrize("loss_kind", ["ppo", "a2c"])
def test_example_7_minimising_plus_utility_trains_toward_low_utility(loss_kind):
    # The sign error: the step now lowers a good token and raises a bad one.
    before, after = sgd_step_probability(loss_kind, advantage=+1.0, maximise_utility=True)
    assert after < before
    before, after = sgd_step_probability(loss_kind, advantage=-1.0, maximise_utility=True)
    assert after > before


# --------------------------------------------------------------------------------------
# KL penalty: examples 6 and 9, estimators, controllers
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", algos.KL_KINDS)
def test_example_6_equal_probabilities_give_zero_penalty(kind):
    logprobs = torch.tensor([[-0.7, -2.3, -0.01]])
    assert torch.equal(kl_penalty(logprobs, logprobs.clone(), kind), torch.zeros(1, 3))
    # Folded into the rewards, only the reward model's score remains.
    rewards = shape_rewards(torch.tensor([0.9]), logprobs, logprobs.clone(), torch.ones(1, 3), kl_coef=0.1, kind=kind)
    assert rewards.tolist() == [[0.0, 0.0, pytest.approx(0.9)]]


def test_example_9_verbose_answer_the_reference_finds_unlikely_carries_the_larger_penalty():
    # Row 0: "Yes." (2 tokens); the reference likes it (log pi_ref = -0.1 per token), the
    # policy a little less (-0.5). Row 1: a 6-token verbose answer the policy now gives
    # log pi = -1 per token and the reference near-zero probability (log pi_ref = -15).
    logprobs = torch.tensor([[-0.5, -0.5, 0, 0, 0, 0], [-1.0] * 6])
    ref_logprobs = torch.tensor([[-0.1, -0.1, 0, 0, 0, 0], [-15.0] * 6])
    mask = torch.tensor([[1, 1, 0, 0, 0, 0], [1] * 6])
    penalty = (kl_penalty(logprobs, ref_logprobs, "k1") * mask).sum(-1)  # sum_t log pi - log pi_ref
    assert penalty.tolist() == [pytest.approx(-0.8), pytest.approx(84.0)]
    assert penalty[1] > penalty[0]


def test_kl_estimators_on_one_log_ratio():
    # log_ratio = log 2: k1 = log 2, k2 = (log 2)^2 / 2, k3 = 1/2 - 1 + log 2, abs = log 2.
    lr = math.log(2.0)
    logprobs, ref_logprobs = torch.tensor([[lr, -lr]], dtype=f64), torch.zeros(1, 2, dtype=f64)
    assert kl_penalty(logprobs, ref_logprobs, "k1").tolist() == [[pytest.approx(lr), pytest.approx(-lr)]]
    assert kl_penalty(logprobs, ref_logprobs, "k2").tolist() == [[pytest.approx(lr**2 / 2)] * 2]
    assert kl_penalty(logprobs, ref_logprobs, "k3").tolist() == [[pytest.approx(lr - 0.5), pytest.approx(1 - lr)]]
    assert kl_penalty(logprobs, ref_logprobs, "abs").tolist() == [[pytest.approx(lr)] * 2]


def test_k2_k3_abs_are_non_negative_and_k1_is_not():
    torch.manual_seed(0)
    logprobs, ref_logprobs = 3 * torch.randn(64, 32), 3 * torch.randn(64, 32)
    for kind in ("k2", "k3", "abs"):
        assert (kl_penalty(logprobs, ref_logprobs, kind) >= 0).all(), kind
    assert (kl_penalty(logprobs, ref_logprobs, "k1") < 0).any()


def test_k1_and_k3_are_unbiased_estimates_of_kl_policy_to_reference():
    # Tokens sampled from pi: E[k1] = E[k3] = KL(pi || pi_ref); k3 has the lower variance.
    torch.manual_seed(0)
    log_pi = torch.log_softmax(torch.randn(6, dtype=f64), -1)
    log_ref = torch.log_softmax(torch.randn(6, dtype=f64), -1)
    exact = (log_pi.exp() * (log_pi - log_ref)).sum().item()
    tokens = torch.multinomial(log_pi.exp(), 200_000, replacement=True)
    logprobs, ref_logprobs = log_pi[tokens][None], log_ref[tokens][None]
    k1 = kl_penalty(logprobs, ref_logprobs, "k1")
    k3 = kl_penalty(logprobs, ref_logprobs, "k3")
    for estimate in (k1, k3):
        standard_error = estimate.std().item() / math.sqrt(estimate.numel())
        assert abs(estimate.mean().item() - exact) < 4 * standard_error
    assert k3.std() < k1.std()


def test_shape_rewards_penalise_every_real_token_and_add_the_score_at_the_last():
    # k1 per token: row 0 [0.5, 0, -0.5], row 1 [-1, 0, (padding)]. With kl_coef 0.1:
    # r = -0.1 * k1, plus the score on the last real token (index 2, then index 1).
    logprobs = torch.tensor([[-1.0, -1.0, -1.0], [-2.0, -2.0, 7.0]])
    ref_logprobs = torch.tensor([[-1.5, -1.0, -0.5], [-1.0, -2.0, -9.0]])
    mask = torch.tensor([[1, 1, 1], [1, 1, 0]])
    scores = torch.tensor([1.0, 2.0])
    rewards = shape_rewards(scores, logprobs, ref_logprobs, mask, kl_coef=0.1)
    torch.testing.assert_close(rewards, torch.tensor([[-0.05, 0.0, 1.05], [0.1, 2.0, 0.0]]))
    # Summed over a response: score - beta * Penalty(x, y).
    torch.testing.assert_close(rewards.sum(-1), torch.tensor([1.0 - 0.1 * 0.0, 2.0 - 0.1 * -1.0]))
    assert not rewards.requires_grad


def test_fixed_kl_controller_stays_constant():
    controller = FixedKLController(0.05)
    for kl in (0.0, 1.0, 100.0):
        controller.update(kl, n_steps=64)
    assert controller.value == 0.05


def test_adaptive_kl_controller_raises_above_target_and_lowers_below():
    # KL = 2 * target: err = clip(1, -0.2, 0.2) = 0.2, value *= 1 + 0.2 * 64 / 1000.
    controller = AdaptiveKLController(0.1, target=6.0, horizon=1000)
    controller.update(12.0, n_steps=64)
    assert controller.value == pytest.approx(0.1 * 1.0128)
    # KL = 0: err = clip(-1, ...) = -0.2, value *= 1 - 0.2 * 64 / 1000.
    controller = AdaptiveKLController(0.1, target=6.0, horizon=1000)
    controller.update(0.0, n_steps=64)
    assert controller.value == pytest.approx(0.1 * 0.9872)
    # Inside the clip: KL = 1.1 * target gives err = 0.1.
    controller = AdaptiveKLController(0.1, target=6.0, horizon=1000)
    controller.update(6.6, n_steps=100)
    assert controller.value == pytest.approx(0.1 * 1.01)


@pytest.mark.parametrize("make", [lambda: FixedKLController(0.2), lambda: AdaptiveKLController(0.2, 1.0, 100)])
def test_kl_controller_state_dict_round_trip(make):
    controller = make()
    for kl in (3.0, 0.5, 2.0):
        controller.update(kl, n_steps=10)
    resumed = make()
    resumed.load_state_dict(controller.state_dict())
    assert resumed.value == controller.value
    controller.update(4.0, n_steps=10)
    resumed.update(4.0, n_steps=10)
    assert resumed.value == controller.value
    if isinstance(controller, AdaptiveKLController):
        assert controller.value != 0.2  # the round trip carried a moved value, not the initial one


# --------------------------------------------------------------------------------------
# GAE
# --------------------------------------------------------------------------------------


def gae_reference(rewards, values, gamma, lam):
    """Plain-Python GAE over one unpadded response (lists)."""
    advantages, last = [0.0] * len(rewards), 0.0
    for t in reversed(range(len(rewards))):
        next_value = values[t + 1] if t + 1 < len(rewards) else 0.0
        delta = rewards[t] + gamma * next_value - values[t]
        last = delta + gamma * lam * last
        advantages[t] = last
    return advantages, [a + v for a, v in zip(advantages, values)]


def test_gae_with_gamma_lam_one_is_future_reward_minus_value():
    # rewards [0, 0, 1], values 0.5 everywhere, gamma = lam = 1: A_t = 1 - 0.5 at every t
    # (Monte Carlo return minus baseline) and the value target R_t is the return, 1.
    advantages, returns = compute_gae(torch.tensor([[0.0, 0, 1]]), torch.full((1, 3), 0.5), torch.ones(1, 3), 1.0, 1.0)
    torch.testing.assert_close(advantages, torch.full((1, 3), 0.5))
    torch.testing.assert_close(returns, torch.ones(1, 3))


def test_gae_with_lam_zero_is_the_one_step_td_error():
    # A_t = r_t + gamma * V_{t+1} - V_t, with V after the last token = 0.
    rewards, values = torch.tensor([[1.0, 2.0]]), torch.tensor([[3.0, 4.0]])
    advantages, _ = compute_gae(rewards, values, torch.ones(1, 2), gamma=0.5, lam=0.0)
    torch.testing.assert_close(advantages, torch.tensor([[1.0 + 0.5 * 4.0 - 3.0, 2.0 - 4.0]]))


@pytest.mark.parametrize("gamma, lam", [(1.0, 0.95), (0.9, 0.8), (0.99, 0.0), (1.0, 1.0), (0.0, 0.5)])
def test_gae_matches_a_reference_loop_with_variable_lengths(gamma, lam):
    torch.manual_seed(1)
    lengths = [7, 1, 4, 3, 6]
    batch, width = len(lengths), 7
    rewards, values = torch.randn(batch, width, dtype=f64), torch.randn(batch, width, dtype=f64)
    mask = torch.arange(width)[None] < torch.tensor(lengths)[:, None]
    # Garbage in the padding must not leak into real tokens.
    rewards[~mask], values[~mask] = 1e6, -1e6
    advantages, returns = compute_gae(rewards, values, mask, gamma, lam)
    for i, n in enumerate(lengths):
        expected_advantages, expected_returns = gae_reference(rewards[i, :n].tolist(), values[i, :n].tolist(), gamma, lam)
        torch.testing.assert_close(advantages[i, :n], torch.tensor(expected_advantages, dtype=f64))
        torch.testing.assert_close(returns[i, :n], torch.tensor(expected_returns, dtype=f64))
    assert (advantages[~mask] == 0).all() and (returns[~mask] == 0).all()


def test_gae_skips_padded_positions_anywhere_in_the_row():
    # Left padding, or a hole in the mask: the real tokens are one response, "t+1" is the
    # next real token, so each gets the advantage it has in the compacted row.
    rewards = torch.tensor([[9.0, 0.5, 9.0, 1.0, 9.0]], dtype=f64)
    values = torch.tensor([[-9.0, 0.2, -9.0, 0.4, -9.0]], dtype=f64)
    mask = torch.tensor([[0, 1, 0, 1, 0]])
    advantages, returns = compute_gae(rewards, values, mask, gamma=0.9, lam=0.8)
    expected_advantages, expected_returns = gae_reference([0.5, 1.0], [0.2, 0.4], gamma=0.9, lam=0.8)
    torch.testing.assert_close(advantages[mask.bool()], torch.tensor(expected_advantages, dtype=f64))
    torch.testing.assert_close(returns[mask.bool()], torch.tensor(expected_returns, dtype=f64))


def test_gae_outputs_are_detached():
    rewards = torch.randn(2, 3, requires_grad=True)
    values = torch.randn(2, 3, requires_grad=True)
    advantages, returns = compute_gae(rewards, values, torch.ones(2, 3), 1.0, 0.95)
    assert not advantages.requires_grad and not returns.requires_grad


# --------------------------------------------------------------------------------------
# Critic: value loss, explained variance
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "value, old_value, ret, expected_loss, expected_grad, clipped",
    [
        # V moved from V_old = 1 toward R = 2, past V_old + 0.2: the clipped V is 1.2 and
        # (1.2 - 2)^2 = 0.64 beats (1.5 - 2)^2 = 0.25, so max picks the clipped term, which
        # has no gradient: the critic, like the policy, does not move too far in one step.
        (1.5, 1.0, 2.0, 0.5 * 0.64, 0.0, 1.0),
        # V inside [V_old - 0.2, V_old + 0.2]: both terms are (1.1 - 2)^2 = 0.81; gradient V - R.
        (1.1, 1.0, 2.0, 0.5 * 0.81, -0.9, 0.0),
        # V moved away from R, past V_old - 0.2: (0.5 - 2)^2 = 2.25 beats (0.8 - 2)^2 = 1.44,
        # so the unclipped term is kept and its gradient V - R = -1.5 pulls V back.
        (0.5, 1.0, 2.0, 0.5 * 2.25, -1.5, 0.0),
    ],
)
def test_value_loss_worked_examples(value, old_value, ret, expected_loss, expected_grad, clipped):
    values = torch.tensor([[value]], dtype=f64, requires_grad=True)
    loss, stats = value_loss(values, torch.tensor([[old_value]], dtype=f64), torch.tensor([[ret]], dtype=f64), torch.ones(1, 1))
    loss.backward()
    assert loss.item() == pytest.approx(expected_loss)
    assert values.grad.item() == pytest.approx(expected_grad)
    assert stats["vf_clipfrac"] == clipped
    assert stats["value_mean"] == pytest.approx(value)


def test_value_loss_without_clipping_is_half_squared_error():
    values = torch.tensor([[1.5, 0.0]], dtype=f64, requires_grad=True)
    returns = torch.tensor([[2.0, 1.0]], dtype=f64)
    loss, stats = value_loss(values, torch.zeros(1, 2, dtype=f64), returns, torch.ones(1, 2), clip_range=None)
    loss.backward()
    assert loss.item() == pytest.approx(0.5 * (0.25 + 1.0) / 2)
    torch.testing.assert_close(values.grad, torch.tensor([[-0.25, -0.5]], dtype=f64))  # (V - R) / n
    assert stats["vf_clipfrac"] == 0.0


def test_explained_variance():
    returns = torch.tensor([[1.0, 2.0, 3.0, 4.0]])
    mask = torch.ones(1, 4)
    assert explained_variance(returns.clone(), returns, mask) == pytest.approx(1.0)  # perfect critic
    assert explained_variance(torch.full((1, 4), 2.5), returns, mask) == pytest.approx(0.0)  # a constant
    assert explained_variance(-returns, returns, mask) == pytest.approx(-3.0)  # Var[2R] / Var[R] = 4
    # Var[R] = 0: undefined ratio, documented as 0.0 rather than NaN.
    assert explained_variance(torch.randn(1, 4), torch.ones(1, 4), mask) == 0.0


# --------------------------------------------------------------------------------------
# Masked statistics
# --------------------------------------------------------------------------------------


def test_masked_mean_var_whiten_use_only_real_tokens():
    # Real values 1, 2, 3 | 4: mean 2.5, unbiased variance 5/3, biased 5/4.
    x = torch.tensor([[1.0, 2.0, 3.0], [4.0, 100.0, -100.0]], dtype=f64)
    mask = torch.tensor([[True, True, True], [True, False, False]])
    assert masked_mean(x, mask).item() == pytest.approx(2.5)
    assert masked_mean(x, mask, dim=1).tolist() == [pytest.approx(2.0), pytest.approx(4.0)]
    assert masked_var(x, mask).item() == pytest.approx(5 / 3)
    assert masked_var(x, mask, unbiased=False).item() == pytest.approx(5 / 4)
    white = masked_whiten(x, mask)
    assert masked_mean(white, mask).item() == pytest.approx(0.0, abs=1e-12)
    assert masked_var(white, mask).item() == pytest.approx(1.0, rel=1e-6)
    torch.testing.assert_close(white[mask], (torch.tensor([1.0, 2, 3, 4], dtype=f64) - 2.5) / math.sqrt(5 / 3))
    assert (white[~mask] == 0).all()
    # shift_mean=False rescales but keeps the mean.
    assert masked_mean(masked_whiten(x, mask, shift_mean=False), mask).item() == pytest.approx(2.5)


def test_masks_may_be_bool_int_or_float():
    x = torch.tensor([[1.0, 5.0, 9.0]])
    for mask in (torch.tensor([[True, True, False]]), torch.tensor([[1, 1, 0]]), torch.tensor([[1.0, 1.0, 0.0]])):
        assert masked_mean(x, mask).item() == 3.0


# --------------------------------------------------------------------------------------
# Padding changes nothing
# --------------------------------------------------------------------------------------

LENGTHS = [6, 3, 1, 4]


def padded_batch(seed=0):
    """A clean batch (zeros on padding) and the same batch with garbage in its padding and
    three more padded columns: NaN, +-inf and huge finite values."""
    torch.manual_seed(seed)
    width = max(LENGTHS)
    mask = torch.arange(width)[None] < torch.tensor(LENGTHS)[:, None]
    clean = {name: torch.randn(len(LENGTHS), width, dtype=f64) * mask for name in
             ("logprobs", "old_logprobs", "ref_logprobs", "advantages", "values", "old_values", "returns", "rewards")}
    clean["logprobs"] = -clean["logprobs"].abs()
    wide_mask = torch.cat([mask, torch.zeros(len(LENGTHS), 3, dtype=torch.bool)], dim=1)
    garbage = {}
    for i, (name, x) in enumerate(clean.items()):
        noise = 1e6 * torch.randn(len(LENGTHS), width + 3, dtype=f64)
        noise.view(-1)[i::7] = float("nan")
        noise.view(-1)[i + 1 :: 11] = float("inf")
        noise.view(-1)[i + 2 :: 13] = -float("inf")
        wide = torch.cat([x, torch.zeros(len(LENGTHS), 3, dtype=f64)], dim=1)
        garbage[name] = torch.where(wide_mask, wide, noise)
    return mask, clean, wide_mask, garbage


def real_part(x, mask):
    return x[:, : mask.shape[1]][mask]


def test_padding_changes_no_masked_statistic():
    mask, clean, wide_mask, garbage = padded_batch()
    x, xg = clean["advantages"], garbage["advantages"]
    assert masked_mean(x, mask).item() == pytest.approx(masked_mean(xg, wide_mask).item(), rel=1e-12)
    torch.testing.assert_close(masked_mean(x, mask, dim=1), masked_mean(xg, wide_mask, dim=1))
    assert masked_var(x, mask).item() == pytest.approx(masked_var(xg, wide_mask).item(), rel=1e-12)
    white, white_g = masked_whiten(x, mask), masked_whiten(xg, wide_mask)
    torch.testing.assert_close(real_part(white_g, mask), white[mask])
    assert (white_g[~wide_mask] == 0).all()
    ev = explained_variance(clean["values"], clean["returns"], mask)
    assert ev == pytest.approx(explained_variance(garbage["values"], garbage["returns"], wide_mask))


@pytest.mark.parametrize("kind", algos.KL_KINDS)
def test_padding_changes_no_kl_or_shaped_reward(kind):
    mask, clean, wide_mask, garbage = padded_batch()
    kl = kl_penalty(clean["logprobs"], clean["ref_logprobs"], kind)
    kl_g = kl_penalty(garbage["logprobs"], garbage["ref_logprobs"], kind)
    torch.testing.assert_close(real_part(kl_g, mask), kl[mask])
    scores = torch.tensor([0.5, -1.0, 2.0, 0.0], dtype=f64)
    rewards = shape_rewards(scores, clean["logprobs"], clean["ref_logprobs"], mask, 0.1, kind)
    rewards_g = shape_rewards(scores, garbage["logprobs"], garbage["ref_logprobs"], wide_mask, 0.1, kind)
    torch.testing.assert_close(rewards_g[:, : mask.shape[1]], rewards)
    assert (rewards_g[:, mask.shape[1] :] == 0).all()


def test_padding_changes_no_advantage_or_return():
    mask, clean, wide_mask, garbage = padded_batch()
    advantages, returns = compute_gae(clean["rewards"], clean["values"], mask, 1.0, 0.95)
    advantages_g, returns_g = compute_gae(garbage["rewards"], garbage["values"], wide_mask, 1.0, 0.95)
    torch.testing.assert_close(advantages_g[:, : mask.shape[1]], advantages)
    torch.testing.assert_close(returns_g[:, : mask.shape[1]], returns)
    assert (advantages_g[~wide_mask] == 0).all() and (returns_g[~wide_mask] == 0).all()


def losses_and_grads(batch, mask):
    """Every loss with its stats and the gradient it sends into the trainable input."""
    results = {}
    logprobs = batch["logprobs"].clone().requires_grad_()
    loss, stats = ppo_policy_loss(logprobs, batch["old_logprobs"], batch["advantages"], mask)
    results["ppo"] = (loss.item(), stats, torch.autograd.grad(loss, logprobs)[0])
    loss = a2c_policy_loss(logprobs, batch["advantages"], mask)
    results["a2c"] = (loss.item(), {}, torch.autograd.grad(loss, logprobs)[0])
    values = batch["values"].clone().requires_grad_()
    for clip_range in (0.2, None):
        loss, stats = value_loss(values, batch["old_values"], batch["returns"], mask, clip_range)
        results[f"value_{clip_range}"] = (loss.item(), stats, torch.autograd.grad(loss, values)[0])
    return results


def test_padding_changes_no_loss_statistic_or_gradient():
    mask, clean, wide_mask, garbage = padded_batch()
    # Give PPO some clipped tokens and the critic some clipped values to count.
    clean["old_logprobs"] = clean["logprobs"] + 0.5 * torch.randn_like(clean["logprobs"]) * mask
    garbage["old_logprobs"] = torch.where(wide_mask, torch.nn.functional.pad(clean["old_logprobs"], (0, 3)), garbage["old_logprobs"])
    expected = losses_and_grads(clean, mask)
    assert expected["ppo"][1]["clipfrac"] > 0 and expected["value_0.2"][1]["vf_clipfrac"] > 0
    for name, (loss, stats, grad) in losses_and_grads(garbage, wide_mask).items():
        expected_loss, expected_stats, expected_grad = expected[name]
        assert loss == pytest.approx(expected_loss, rel=1e-12), name
        assert stats == pytest.approx(expected_stats, rel=1e-12), name
        torch.testing.assert_close(grad[:, : mask.shape[1]], expected_grad)
        assert (grad[~wide_mask] == 0).all(), f"{name}: padded positions must get exactly zero gradient"


# --------------------------------------------------------------------------------------
# Log-probs and entropy from logits
# --------------------------------------------------------------------------------------


def reference_logprobs(logits, labels, temperature=1.0):
    return torch.log_softmax(logits.double() / temperature, -1).gather(-1, labels[..., None]).squeeze(-1)


def reference_entropy(logits):
    logp = torch.log_softmax(logits.double(), -1)
    return -(logp.exp() * logp).sum(-1)


@pytest.mark.parametrize("temperature", [1.0, 0.7, 2.0])
def test_logprobs_from_logits_is_log_softmax_of_logits_over_temperature(temperature):
    torch.manual_seed(0)
    logits = torch.randn(3, 5, 11, requires_grad=True)
    labels = torch.randint(0, 11, (3, 5))
    logprobs = logprobs_from_logits(logits, labels, temperature)
    expected = torch.log_softmax(logits / temperature, -1).gather(-1, labels[..., None]).squeeze(-1)
    torch.testing.assert_close(logprobs, expected)
    (grad,) = torch.autograd.grad(logprobs.sum(), logits)
    (expected_grad,) = torch.autograd.grad(expected.sum(), logits)
    torch.testing.assert_close(grad, expected_grad)


def test_logprobs_and_entropy_are_the_same_when_computed_in_chunks(monkeypatch):
    torch.manual_seed(0)
    logits = torch.randn(5, 4, 9, requires_grad=True)
    labels = torch.randint(0, 9, (5, 4))
    whole_lp, whole_h = logprobs_from_logits(logits, labels, 0.8), entropy_from_logits(logits)
    monkeypatch.setattr(algos, "_FP32_CHUNK_ELEMENTS", 2 * 4 * 9)  # eight positions per chunk
    chunked_lp, chunked_h = logprobs_from_logits(logits, labels, 0.8), entropy_from_logits(logits)
    torch.testing.assert_close(chunked_lp, whole_lp)
    torch.testing.assert_close(chunked_h, whole_h)
    (grad_whole,) = torch.autograd.grad((whole_lp + whole_h).sum(), logits)
    (grad_chunked,) = torch.autograd.grad((chunked_lp + chunked_h).sum(), logits)
    torch.testing.assert_close(grad_chunked, grad_whole)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("make_logits", [
    lambda: 1e4 * torch.randn(2, 3, 50),  # spread 1e4: near one-hot distributions
    lambda: 1e4 + 3 * torch.randn(2, 3, 50),  # offset 1e4, spread 3: a real entropy
], ids=["spread", "offset"])
def test_logprobs_and_entropy_are_stable_for_huge_logits(dtype, make_logits):
    # Logits of size 1e4: a naive exp overflows. Results must be finite, fp32, and match a
    # float64 computation on the same (rounded) logits to fp32 rounding at that scale.
    torch.manual_seed(0)
    logits = make_logits().to(dtype)
    labels = torch.randint(0, 50, (2, 3))
    logprobs, entropy = logprobs_from_logits(logits, labels), entropy_from_logits(logits)
    assert logprobs.dtype == torch.float32 and entropy.dtype == torch.float32
    assert torch.isfinite(logprobs).all() and torch.isfinite(entropy).all()
    torch.testing.assert_close(logprobs.double(), reference_logprobs(logits, labels), rtol=1e-6, atol=1e-2)
    torch.testing.assert_close(entropy.double(), reference_entropy(logits), rtol=0, atol=1e-5)


@pytest.mark.parametrize("temperature", [1.0, 0.7])
@pytest.mark.parametrize("make_logits", [
    lambda: torch.randn(3, 5, 11),
    lambda: 1e4 + 3 * torch.randn(2, 3, 50),  # offset 1e4: the shift keeps it exact
    lambda: torch.tensor([[[0.0, -math.inf, -math.inf], [3.0, 3.0, -math.inf]]]),  # masked vocabulary
], ids=["plain", "offset", "masked"])
def test_fused_logprobs_and_entropy_equal_the_separate_functions(make_logits, temperature):
    # One logsumexp serves both: the numbers and gradients of the exact (float64)
    # log-softmax and entropy of the tempered distribution, and, where fp32 rounding of
    # large logits does not intervene, of the separate functions.
    torch.manual_seed(0)
    logits = make_logits().requires_grad_(True)
    labels = torch.zeros(logits.shape[:-1], dtype=torch.long)  # token 0 is never masked above
    logprobs, entropy = logprobs_and_entropy_from_logits(logits, labels, temperature)
    exact = logits.detach().double().requires_grad_(True)
    log_p = torch.log_softmax(exact / temperature, -1)
    exact_entropy = -(log_p.exp() * log_p.clamp(min=-1e300)).sum(-1)
    torch.testing.assert_close(logprobs.double(), log_p[..., 0], rtol=1e-6, atol=1e-5)
    torch.testing.assert_close(entropy.double(), exact_entropy, rtol=0, atol=1e-5)
    (grad,) = torch.autograd.grad((logprobs + entropy).sum(), logits)
    (expected,) = torch.autograd.grad((log_p[..., 0] + exact_entropy).sum(), exact)
    torch.testing.assert_close(grad.double(), expected, rtol=1e-4, atol=1e-5)
    if logits.abs().max() < 100:
        torch.testing.assert_close(logprobs, logprobs_from_logits(logits, labels, temperature))
        torch.testing.assert_close(entropy, entropy_from_logits(logits / temperature))


def test_entropy_without_grad_is_logged_only():
    # No entropy bonus: the entropy carries no graph, and the log-probs' gradient is unchanged.
    torch.manual_seed(0)
    logits = torch.randn(2, 4, 7, requires_grad=True)
    labels = torch.randint(0, 7, (2, 4))
    logprobs, entropy = logprobs_and_entropy_from_logits(logits, labels, 0.7, entropy_grad=False)
    assert not entropy.requires_grad and logprobs.requires_grad
    torch.testing.assert_close(entropy, entropy_from_logits(logits.detach() / 0.7))
    (grad,) = torch.autograd.grad(logprobs.sum(), logits)
    (expected,) = torch.autograd.grad(logprobs_from_logits(logits, labels, 0.7).sum(), logits)
    torch.testing.assert_close(grad, expected)


def test_entropy_worked_examples():
    # Uniform over V tokens: H = log V. One certain token: H = 0, also with -inf logits
    # (a masked vocabulary), where softmax * logit would be 0 * -inf = NaN.
    assert entropy_from_logits(torch.zeros(1, 1, 8)).item() == pytest.approx(math.log(8))
    certain = torch.tensor([[[0.0, -math.inf, -math.inf]]])
    assert entropy_from_logits(certain).item() == 0.0
    two_way = torch.tensor([[[3.0, 3.0, -math.inf]]])
    assert entropy_from_logits(two_way).item() == pytest.approx(math.log(2))
    torch.manual_seed(0)
    logits = 5 * torch.randn(4, 6, 30)
    torch.testing.assert_close(entropy_from_logits(logits).double(), reference_entropy(logits), rtol=0, atol=1e-6)


# --------------------------------------------------------------------------------------
# Bradley-Terry reward-model loss
# --------------------------------------------------------------------------------------


def test_pairwise_loss_is_log_2_at_equal_rewards_and_falls_with_the_gap():
    loss, accuracy = pairwise_reward_loss(torch.zeros(4), torch.zeros(4))
    assert loss.item() == pytest.approx(math.log(2))
    assert accuracy == 0.0  # ties are not counted as correct
    # Gap 1: -log sigmoid(1) = log(1 + e^-1).
    loss, accuracy = pairwise_reward_loss(torch.tensor([2.0]), torch.tensor([1.0]))
    assert loss.item() == pytest.approx(math.log1p(math.exp(-1)))
    assert accuracy == 1.0
    # A margin is subtracted from the gap: gap 1 with margin 1 is back to log 2.
    loss, _ = pairwise_reward_loss(torch.tensor([2.0]), torch.tensor([1.0]), margin=1.0)
    assert loss.item() == pytest.approx(math.log(2))


def test_pairwise_accuracy_is_the_share_of_pairs_ranked_correctly():
    _, accuracy = pairwise_reward_loss(torch.tensor([1.0, 0.0, 3.0, -1.0]), torch.tensor([0.0, 1.0, 2.0, 5.0]))
    assert accuracy == 0.5


def test_pairwise_gradient_pushes_chosen_up_and_rejected_down():
    chosen = torch.tensor([0.3, -1.0], requires_grad=True)
    rejected = torch.tensor([0.1, 2.0], requires_grad=True)
    loss, _ = pairwise_reward_loss(chosen, rejected)
    loss.backward()
    assert (chosen.grad < 0).all() and (rejected.grad > 0).all()  # descent raises chosen
    # d loss / d r_chosen = -sigmoid(-(gap)) / n
    torch.testing.assert_close(chosen.grad, -torch.sigmoid(-(chosen - rejected).detach()) / 2)


def test_pairwise_loss_is_stable_for_huge_gaps():
    loss, _ = pairwise_reward_loss(torch.tensor([0.0, 1000.0]), torch.tensor([1000.0, 0.0]))
    assert loss.item() == pytest.approx(1000.0 / 2)  # -log sigmoid(-1000) = 1000; -log sigmoid(1000) = 0


# --------------------------------------------------------------------------------------
# Bad input: a ValueError naming the argument, never a silent NaN
# --------------------------------------------------------------------------------------

ONES = torch.ones(2, 3)


@pytest.mark.parametrize(
    "call, argument",
    [
        (lambda: ppo_policy_loss(ONES, ONES, ONES, torch.ones(2, 4)), "mask"),
        (lambda: ppo_policy_loss(ONES, ONES, ONES, torch.zeros(2, 3)), "mask"),
        (lambda: ppo_policy_loss(torch.ones(2, 3, dtype=torch.long), ONES, ONES, ONES), "logprobs"),
        (lambda: ppo_policy_loss(ONES, ONES, torch.ones(3, 2), ONES), "advantages"),
        (lambda: ppo_policy_loss(ONES, ONES, ONES, ONES, clip_eps=-0.1), "clip_eps"),
        (lambda: ppo_policy_loss(ONES, ONES, ONES, ONES, clip_eps_high=-0.1), "clip_eps_high"),
        (lambda: ppo_clip_side(ONES, torch.ones(2)), "advantages"),
        (lambda: a2c_policy_loss(ONES, torch.ones(2, 4), ONES), "advantages"),
        (lambda: a2c_policy_loss(ONES, ONES, [[1, 1, 1]] * 2), "mask"),
        (lambda: value_loss(ONES, ONES, ONES, ONES, clip_range=-0.2), "clip_range"),
        (lambda: value_loss(ONES, ONES, torch.ones(2, 3, dtype=torch.int32), ONES), "returns"),
        (lambda: kl_penalty(ONES, ONES, kind="k4"), "kind"),
        (lambda: kl_penalty(ONES, torch.ones(3, 2)), "ref_logprobs"),
        (lambda: compute_gae(ONES, ONES, ONES, gamma=1.5, lam=0.95), "gamma"),
        (lambda: compute_gae(ONES, ONES, ONES, gamma=float("nan"), lam=0.95), "gamma"),
        (lambda: compute_gae(ONES, ONES, ONES, gamma=1.0, lam=-0.1), "lam"),
        (lambda: compute_gae(ONES, ONES, torch.zeros(2, 3), 1.0, 0.95), "mask"),
        (lambda: shape_rewards(torch.ones(3), ONES, ONES, ONES, 0.1), "scores"),
        (lambda: shape_rewards(torch.ones(2), ONES, ONES, torch.tensor([[1, 1, 0], [0, 0, 0]]), 0.1), "mask"),
        (lambda: shape_rewards(torch.ones(2), ONES, ONES, ONES, kl_coef=-0.1), "kl_coef"),
        (lambda: masked_mean(ONES, torch.zeros(2, 3)), "mask"),
        (lambda: masked_var(ONES, torch.tensor([[1, 0, 0], [0, 0, 0]])), "mask"),
        (lambda: masked_whiten(ONES, torch.ones(3)), "mask"),
        (lambda: explained_variance(ONES, ONES, torch.zeros(2, 3)), "mask"),
        (lambda: logprobs_from_logits(torch.ones(2, 3, 5), torch.zeros(2, 3, dtype=torch.long), temperature=0), "temperature"),
        (lambda: logprobs_from_logits(torch.ones(2, 3, 5), torch.zeros(2, 3)), "labels"),
        (lambda: logprobs_from_logits(torch.ones(2, 3, 5), torch.zeros(2, 4, dtype=torch.long)), "labels"),
        (lambda: logprobs_from_logits(torch.ones(2, 3, 5), torch.full((2, 3), 5)), "labels"),
        (lambda: logprobs_from_logits(torch.ones(2, 3, 5, dtype=torch.long), torch.zeros(2, 3, dtype=torch.long)), "logits"),
        (lambda: entropy_from_logits(torch.ones(5, dtype=torch.int32)), "logits"),
        (lambda: pairwise_reward_loss(torch.ones(3), torch.ones(4)), "rejected_rewards"),
        (lambda: pairwise_reward_loss(torch.ones(3), torch.ones(3), margin=torch.ones(2)), "margin"),
        (lambda: FixedKLController(-1.0), "kl_coef"),
        (lambda: AdaptiveKLController(0.1, target=0.0, horizon=1000), "target"),
        (lambda: AdaptiveKLController(0.1, target=6.0, horizon=0), "horizon"),
        (lambda: AdaptiveKLController(0.1, 6.0, 1000).update(float("nan"), 64), "current_kl"),
    ],
)
def test_bad_input_raises_value_error_naming_the_argument(call, argument):
    with pytest.raises(ValueError, match=rf"\b{argument}\b.*expected"):
        call()
