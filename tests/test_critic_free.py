"""Critic-free algorithms (GRPO, Dr. GRPO, RLOO, REINFORCE++) and their loss variants (dual
clip, GSPO): each estimator and loss against a reference written here with loops in float64
and a worked example with its numbers; the presets of `ppo.algo`; the update independent of
how the batch is split; tiny models learning under each preset with no critic built, saved
or resumed."""

import json
import math
import textwrap

import pytest
import torch
import yaml

from rlhf import algos
from rlhf.config import Config, ConfigError, load_config

f64 = torch.float64


def reference_group_advantages(returns, groups, kind):
    """Loops over groups: GRPO (unbiased std, eps 1e-6), Dr. GRPO, RLOO."""
    out = []
    for i, r in enumerate(returns):
        mates = [returns[j] for j in range(len(returns)) if groups[j] == groups[i]]
        mean = sum(mates) / len(mates)
        if kind == "rloo":
            others = [returns[j] for j in range(len(returns)) if groups[j] == groups[i] and j != i]
            out.append(r - sum(others) / len(others))
        elif kind == "dr_grpo":
            out.append(r - mean)
        else:
            std = math.sqrt(sum((m - mean) ** 2 for m in mates) / (len(mates) - 1))
            out.append((r - mean) / (std + 1e-6))
    return out


def test_group_advantages_by_hand():
    # Two prompts, two samples each: returns 1 and 0 (mean 0.5, unbiased std 1/sqrt 2), 3 and 3.
    returns, groups = torch.tensor([1.0, 0.0, 3.0, 3.0], dtype=f64), torch.tensor([0, 0, 1, 1])
    grpo = algos.group_baseline_advantages(returns, groups)
    torch.testing.assert_close(grpo, torch.tensor([1, -1, 0, 0], dtype=f64) / math.sqrt(2), rtol=0, atol=1e-5)
    assert algos.group_baseline_advantages(returns, groups, scale=False).tolist() == [0.5, -0.5, 0.0, 0.0]
    assert algos.group_baseline_advantages(returns, groups, leave_one_out=True).tolist() == [1.0, -1.0, 0.0, 0.0]
    with pytest.raises(ValueError, match="at least 2 samples"):
        algos.group_baseline_advantages(returns, torch.tensor([0, 0, 1, 2]))


@pytest.mark.parametrize("kind", ["grpo", "dr_grpo", "rloo"])
def test_group_estimators_match_the_loops(kind):
    g = torch.Generator().manual_seed(0)
    rewards = torch.randn(12, 7, generator=g, dtype=f64)
    lengths = torch.randint(1, 8, (12,), generator=g)
    mask = (torch.arange(7)[None] < lengths[:, None]).to(f64)
    groups = torch.tensor([3, 3, 3, 0, 0, 0, 0, 5, 5, 1, 1, 1])  # groups of 3, 4, 2 and 3
    advantages, returns = algos.advantage_estimator(kind)(rewards=rewards, values=torch.zeros_like(rewards),
                                                          mask=mask, groups=groups, gamma=1.0, lam=0.95)
    sequence = [sum(rewards[i, t].item() for t in range(7) if mask[i, t]) for i in range(12)]
    expected = reference_group_advantages(sequence, groups.tolist(), kind)
    for i in range(12):
        for t in range(7):
            want = expected[i] if mask[i, t] else 0.0
            assert advantages[i, t].item() == pytest.approx(want, abs=1e-9), (i, t)
    assert torch.equal(advantages, returns)


def test_returns_to_go_and_reinforce_pp_match_the_loops():
    g = torch.Generator().manual_seed(1)
    rewards = torch.randn(5, 6, generator=g, dtype=f64)
    mask = (torch.arange(6)[None] < torch.tensor([[6], [1], [4], [3], [5]])).to(f64)
    gamma = 0.9
    got = algos.returns_to_go(rewards, mask, gamma)
    for i in range(5):
        for t in range(6):
            want = sum(gamma ** (k - t) * rewards[i, k].item() for k in range(t, 6) if mask[i, k]) if mask[i, t] else 0.0
            assert got[i, t].item() == pytest.approx(want, abs=1e-12)
    # Worked example: rewards 1, 2, 3 with gamma 0.5 -> 1 + 0.5 * (2 + 0.5 * 3) = 2.75, 3.5, 3.
    rtg = algos.returns_to_go(torch.tensor([[1.0, 2.0, 3.0]], dtype=f64), torch.ones(1, 3), 0.5)
    assert rtg.tolist() == [[2.75, 3.5, 3.0]]
    adv, ret = algos.advantage_estimator("reinforce_pp")(rewards=rewards, values=None, mask=mask, gamma=gamma)
    assert torch.equal(adv, got) and algos.advantage_estimator("reinforce_pp").whiten is True
    groups = torch.tensor([0, 0, 1, 1, 1])
    adv, _ = algos.advantage_estimator("reinforce_pp_baseline")(rewards=rewards, values=None, mask=mask,
                                                                 groups=groups, gamma=gamma)
    sequence = (rewards * mask).sum(-1)
    for i in range(5):
        mean = sequence[groups == groups[i]].mean()
        torch.testing.assert_close(adv[i][mask[i] > 0], (got[i] - mean)[mask[i] > 0])


def test_group_estimators_refuse_groups_of_one(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("ppo: {advantage: grpo}\n")
    with pytest.raises(ConfigError, match="rollout.samples_per_prompt: ppo.advantage=grpo .* at least 2, got 1"):
        load_config(Config, path)
    assert load_config(Config, path, ["rollout.samples_per_prompt=4"]).rollout.samples_per_prompt == 4
    with pytest.raises(ConfigError, match="ppo.minibatch_size: 3 must divide the rollout's 8 sequences"):
        load_config(Config, None, ["rollout.batch_size=2", "rollout.samples_per_prompt=4", "ppo.minibatch_size=3"])


def test_group_worked_example_one_right_answer_in_three():
    """A checker's rewards 1, 0, 0 for three samples of one prompt (mean 1/3, unbiased std
    1/sqrt 3)."""
    returns, groups = torch.tensor([1.0, 0.0, 0.0], dtype=f64), torch.tensor([0, 0, 0])
    s3 = math.sqrt(3)
    # GRPO: (2/3) / (1/sqrt 3) = 2/sqrt 3 = 1.1547 for the right answer, -1/sqrt 3 = -0.5774 for each wrong one.
    torch.testing.assert_close(algos.group_baseline_advantages(returns, groups),
                               torch.tensor([2 / s3, -1 / s3, -1 / s3], dtype=f64), rtol=0, atol=1e-5)
    # Dr. GRPO: the centred rewards 2/3, -1/3, -1/3.
    torch.testing.assert_close(algos.group_baseline_advantages(returns, groups, scale=False),
                               torch.tensor([2 / 3, -1 / 3, -1 / 3], dtype=f64), rtol=0, atol=1e-15)
    # RLOO: 1 - mean(0, 0) = 1; 0 - mean(1, 0) = -0.5.
    torch.testing.assert_close(algos.group_baseline_advantages(returns, groups, leave_one_out=True),
                               torch.tensor([1.0, -0.5, -0.5], dtype=f64), rtol=0, atol=1e-15)


def test_reinforce_pp_worked_example_returns_whitened_over_the_batch():
    """Two responses: rewards 0, 0, 1 (score at the end) and 0, 0. Returns to go (gamma 1) are
    1, 1, 1 and 0, 0; over the 5 real tokens the mean is 0.6 and the unbiased variance
    (3 x 0.16 + 2 x 0.36) / 4 = 0.3, so the advantages are 0.4 / sqrt 0.3 = 0.7303 and
    -0.6 / sqrt 0.3 = -1.0954."""
    rewards = torch.tensor([[0.0, 0.0, 1.0], [0.0, 0.0, 0.0]], dtype=f64)
    mask = torch.tensor([[1.0, 1, 1], [1, 1, 0]], dtype=f64)
    estimator = algos.advantage_estimator("reinforce_pp")
    advantages, _ = estimator(rewards=rewards, values=None, mask=mask, gamma=1.0)
    assert estimator.whiten is True and advantages.tolist() == [[1, 1, 1], [0, 0, 0]]
    white = algos.masked_whiten(advantages, mask)
    a, b = 0.4 / math.sqrt(0.3 + 1e-8), -0.6 / math.sqrt(0.3 + 1e-8)
    torch.testing.assert_close(white, torch.tensor([[a, a, a], [b, b, 0.0]], dtype=f64), rtol=0, atol=1e-12)


def test_reinforce_pp_baseline_matches_a_loop():
    g = torch.Generator().manual_seed(4)
    rewards = torch.randn(6, 5, generator=g, dtype=f64)
    mask = (torch.arange(5)[None] < torch.tensor([[5], [2], [4], [1], [3], [5]])).to(f64)
    groups = [0, 0, 0, 1, 1, 1]
    adv, ret = algos.advantage_estimator("reinforce_pp_baseline")(
        rewards=rewards, values=None, mask=mask, groups=torch.tensor(groups), gamma=0.8)
    for i in range(6):
        sequence = {j: sum(rewards[j, k].item() for k in range(5) if mask[j, k]) for j in range(6)}
        baseline = sum(sequence[j] for j in range(6) if groups[j] == groups[i]) / 3
        for t in range(5):
            to_go = sum(0.8 ** (k - t) * rewards[i, k].item() for k in range(t, 5) if mask[i, k])
            assert adv[i, t].item() == pytest.approx(to_go - baseline if mask[i, t] else 0.0, abs=1e-12)
            assert ret[i, t].item() == pytest.approx(to_go if mask[i, t] else 0.0, abs=1e-12)


def test_constant_groups_match_a_loop():
    scores = torch.tensor([1.0, 1.0, 0.0, 0.0, 0.5, 0.5 + 1e-7, 3.0, 2.0])
    groups = torch.tensor([0, 0, 1, 1, 2, 2, 3, 3])
    expected = [max(scores[groups == g]).item() - min(scores[groups == g]).item() <= 1e-6 for g in range(4)]
    assert algos.constant_groups(scores, groups).tolist() == expected == [True, True, True, False]


# -- policy losses: dual clip and GSPO ---------------------------------------------------


def reference_surrogate(ratio, advantage, eps_low, eps_high, dual):
    """One token's clipped surrogate loss, written out case by case."""
    clipped_ratio = min(max(ratio, 1 - eps_low), 1 + eps_high)
    loss = -min(ratio * advantage, clipped_ratio * advantage)
    if dual is not None and advantage < 0:
        loss = min(loss, -dual * advantage)
    return loss


def test_dual_clip_worked_example():
    """A = -1, clip 0.2, dual clip c = 3. Ratio 5: PPO's loss is -min(-5, -1.2) = 5 and
    grows with the ratio; the dual clip caps it at c |A| = 3 and removes the gradient.
    Ratio 2: the loss 2 is under the cap and keeps the gradient of rho * A. A = +1 at ratio 5:
    the dual clip does not apply (PPO's cap 1.2 does)."""
    logprobs = torch.log(torch.tensor([[5.0, 2.0, 5.0]], dtype=f64)).requires_grad_()
    old, adv, mask = torch.zeros(1, 3, dtype=f64), torch.tensor([[-1.0, -1.0, 1.0]], dtype=f64), torch.ones(1, 3)
    loss, stats = algos.policy_loss("ppo")(logprobs, old, adv, mask, clip_eps=0.2, dual_clip=3.0)
    assert loss.tolist()[0] == pytest.approx([3.0, 2.0, -1.2])
    (grad,) = torch.autograd.grad(loss.sum(), logprobs)
    assert grad.tolist()[0] == pytest.approx([0.0, 2.0, 0.0])  # d(-rho A)/d log pi = -rho A = 2
    assert stats["clipfrac_dual"] == pytest.approx(1 / 3) and stats["clipfrac_high"] == pytest.approx(1 / 3)
    assert stats["clipfrac_low"] == 0.0 and stats["clipfrac"] == pytest.approx(2 / 3)
    without, _ = algos.policy_loss("ppo")(logprobs, old, adv, mask, clip_eps=0.2)
    assert without.tolist()[0] == pytest.approx([5.0, 2.0, -1.2])


@pytest.mark.parametrize("dual", [None, 3.0])
def test_ppo_loss_and_clip_fractions_match_the_loop(dual):
    g = torch.Generator().manual_seed(5)
    logprobs, old = (torch.randn(6, 7, generator=g, dtype=f64) * 0.6 for _ in range(2))
    adv = torch.randn(6, 7, generator=g, dtype=f64)
    mask = (torch.arange(7)[None] < torch.tensor([[7], [3], [1], [6], [5], [2]])).to(f64)
    loss, stats = algos.policy_loss("ppo")(logprobs, old, adv, mask, clip_eps=0.2, clip_eps_high=0.28,
                                           dual_clip=dual)
    counts, n = {"high": 0, "low": 0}, 0
    for i in range(6):
        for t in range(7):
            if not mask[i, t]:
                assert loss[i, t].item() == 0.0
                continue
            rho, a = math.exp(logprobs[i, t].item() - old[i, t].item()), adv[i, t].item()
            assert loss[i, t].item() == pytest.approx(reference_surrogate(rho, a, 0.2, 0.28, dual), abs=1e-12)
            n += 1
            counts["high"] += rho > 1.28 and a > 0
            counts["low"] += rho < 0.8 and a < 0
    assert stats["clipfrac_high"] == pytest.approx(counts["high"] / n)
    assert stats["clipfrac_low"] == pytest.approx(counts["low"] / n)
    assert counts["high"] > 0 and counts["low"] > 0


def test_gspo_sequence_ratio_worked_example():
    """Token log-ratios 0.1, -0.3, 0.5: their mean is 0.1, so the sequence ratio is
    e^0.1 = 1.10517 on every token (a token ratio would be 1.105, 0.741, 1.649). With the
    paper's clip range (3e-4, 4e-4) and A = +1 the sequence is clipped as a whole: loss
    -1.0004 on each token, no gradient. With A = -1 the unclipped branch is selected: loss
    1.10517, and under seq-mean-token-mean each token's log-prob gets s / 3 = 0.36839."""
    old = torch.zeros(1, 4, dtype=f64)
    logprobs = torch.tensor([[0.1, -0.3, 0.5, 7.0]], dtype=f64).requires_grad_()
    mask = torch.tensor([[1.0, 1, 1, 0]])  # the 7.0 is padding and changes nothing
    s = math.exp(0.1)
    assert algos.sequence_ratio(logprobs, old, mask).item() == pytest.approx(s)
    gspo = algos.policy_loss("gspo")
    loss, stats = gspo(logprobs, old, torch.ones(1, 4, dtype=f64), mask, clip_eps=3e-4, clip_eps_high=4e-4)
    assert loss.tolist()[0] == pytest.approx([-1.0004] * 3 + [0.0])
    assert stats["clipfrac_high"] == 1.0 and stats["ratio_mean"] == pytest.approx(s)
    (grad,) = torch.autograd.grad(algos.aggregate_loss(loss, mask, "seq-mean-token-mean"), logprobs)
    assert grad.abs().max().item() == 0.0
    loss, stats = gspo(logprobs, old, -torch.ones(1, 4, dtype=f64), mask, clip_eps=3e-4, clip_eps_high=4e-4)
    assert loss.tolist()[0] == pytest.approx([s] * 3 + [0.0]) and stats["clipfrac"] == 0.0
    (grad,) = torch.autograd.grad(algos.aggregate_loss(loss, mask, "seq-mean-token-mean"), logprobs)
    assert grad.tolist()[0] == pytest.approx([s / 3] * 3 + [0.0])


def test_gspo_token_form_equals_the_sequence_objective_in_value_and_gradient():
    """With one advantage per sequence and seq-mean-token-mean, GSPO-token's loss and gradient
    are those of the sequence-level loss mean_i -min(s_i A_i, clip(s_i) A_i), s_i computed here
    from a loop over each sequence's tokens."""
    g = torch.Generator().manual_seed(6)
    logprobs = (torch.randn(5, 6, generator=g, dtype=f64) * 0.02).requires_grad_()
    old = torch.randn(5, 6, generator=g, dtype=f64) * 0.02
    lengths = [6, 2, 4, 1, 5]
    mask = (torch.arange(6)[None] < torch.tensor(lengths)[:, None]).to(f64)
    seq_adv = torch.tensor([1.0, -0.5, 2.0, -1.5, 0.7], dtype=f64)
    loss, _ = algos.policy_loss("gspo")(logprobs, old, seq_adv[:, None].expand(5, 6), mask, clip_eps=3e-3,
                                        clip_eps_high=4e-3)
    ours = algos.aggregate_loss(loss, mask, "seq-mean-token-mean")
    reference = 0.0
    for i, n in enumerate(lengths):
        s = torch.exp(sum(logprobs[i, t] - old[i, t] for t in range(n)) / n)
        a = seq_adv[i]
        reference = reference - torch.minimum(s * a, s.clamp(1 - 3e-3, 1 + 4e-3) * a) / 5
    torch.testing.assert_close(ours, reference, rtol=1e-12, atol=0)
    grads = [torch.autograd.grad(x, logprobs, retain_graph=True)[0] for x in (ours, reference)]
    torch.testing.assert_close(grads[0], grads[1], rtol=1e-10, atol=1e-14)
    clipped = [(grads[0][i, :n] == 0).all().item() for i, n in enumerate(lengths)]
    assert 0 < sum(clipped) < 5  # some sequences clipped as a whole, some not


@pytest.mark.parametrize("loss_name", ["ppo", "gspo", "a2c"])
@pytest.mark.parametrize("mode", algos.LOSS_AGGREGATIONS)
def test_every_loss_and_aggregation_is_independent_of_the_micro_batches(loss_name, mode):
    """Each micro-batch's share, summed, is the whole batch's loss, and so are the gradients:
    every policy loss reads only its own sequence."""
    g = torch.Generator().manual_seed(7)
    logprobs = (torch.randn(8, 6, generator=g, dtype=f64) * 0.1).requires_grad_()
    old = torch.randn(8, 6, generator=g, dtype=f64) * 0.1
    adv = torch.randn(8, 1, generator=g, dtype=f64).expand(8, 6)
    mask = (torch.arange(6)[None] < torch.randint(1, 7, (8, 1), generator=g)).to(f64)
    fn = algos.policy_loss(loss_name)

    def share(idx, **batch):
        per_token, _ = fn(logprobs[idx], old[idx], adv[idx], mask[idx], clip_eps=0.05, clip_eps_high=0.08,
                          dual_clip=2.0)
        return algos.aggregate_loss(per_token, mask[idx], mode, max_tokens=6, **batch)

    whole = share(torch.arange(8))
    split = sum(share(idx, batch_tokens=mask.sum(), batch_sequences=8) for idx in torch.arange(8).split(3))
    torch.testing.assert_close(split, whole, rtol=1e-12, atol=0)
    grads = [torch.autograd.grad(x, logprobs, retain_graph=True)[0] for x in (whole, split)]
    torch.testing.assert_close(grads[1], grads[0], rtol=1e-12, atol=1e-15)


# -- presets ----------------------------------------------------------------------------


def test_presets_fill_the_parts_left_unset(tmp_path):
    parts = ("advantage", "policy_loss", "loss_agg", "kl_in_reward", "kl_estimator")
    ppo = load_config(Config).ppo  # the default: PPO as before
    assert [getattr(ppo, k) for k in parts] == ["gae", "ppo", "token-mean", True, "k1"]
    a2c = load_config(Config, None, ["ppo.algo=a2c"]).ppo
    assert [getattr(a2c, k) for k in parts] == ["gae", "a2c", "token-mean", True, "k1"]
    grpo = load_config(Config, None, ["ppo.algo=grpo", "rollout.samples_per_prompt=4"]).ppo
    assert [getattr(grpo, k) for k in parts] == ["grpo", "ppo", "seq-mean-token-mean", False, "k3"]
    dr = load_config(Config, None, ["ppo.algo=dr_grpo", "rollout.samples_per_prompt=4"]).ppo
    assert [getattr(dr, k) for k in parts] == ["dr_grpo", "ppo", "seq-mean-token-sum-norm", False, "k3"]
    for name in ("rloo", "reinforce_pp"):
        p = load_config(Config, None, [f"ppo.algo={name}", "rollout.samples_per_prompt=2"]).ppo
        assert [getattr(p, k) for k in parts] == [name, "ppo", "token-mean", True, "k1"]
    # A part set by the user wins over the preset; DAPO is grpo with token-mean and clip-higher.
    dapo = load_config(Config, None, ["ppo.algo=grpo", "rollout.samples_per_prompt=4", "ppo.loss_agg=token-mean",
                                      "ppo.clip_eps_high=0.28", "ppo.policy_loss=gspo"]).ppo
    assert (dapo.advantage, dapo.loss_agg, dapo.policy_loss, dapo.kl_estimator) == ("grpo", "token-mean", "gspo", "k3")


def test_the_resolved_parts_are_saved_and_reload_the_same(tmp_path):
    from rlhf.config import save_config

    cfg = load_config(Config, None, ["ppo.algo=rloo", "rollout.samples_per_prompt=2", "ppo.kl_estimator=k2"])
    save_config(cfg, tmp_path / "config.yaml")
    saved = yaml.safe_load((tmp_path / "config.yaml").read_text())["ppo"]
    assert (saved["advantage"], saved["policy_loss"], saved["loss_agg"], saved["kl_in_reward"],
            saved["kl_estimator"]) == ("rloo", "ppo", "token-mean", True, "k2")
    assert load_config(Config, tmp_path / "config.yaml") == cfg


def test_preset_errors_name_the_field(tmp_path):
    with pytest.raises(ConfigError, match="rollout.samples_per_prompt: ppo.advantage=rloo .* at least 2, got 1"):
        load_config(Config, None, ["ppo.algo=rloo"])
    with pytest.raises(ConfigError, match=r"ppo.algo: expected one of 'ppo', 'a2c', 'grpo', .* got 'grp'"):
        load_config(Config, None, ["ppo.algo=grp"])
    with pytest.raises(ConfigError, match=r"ppo.policy_loss: expected one of 'ppo', 'a2c', 'gspo', got 'clip'"):
        load_config(Config, None, ["ppo.policy_loss=clip"])
    with pytest.raises(ConfigError, match=r"ppo.dual_clip: expected a finite number > 1, got 1.0"):
        load_config(Config, None, ["ppo.dual_clip=1"])
    with pytest.raises(ConfigError, match=r"ppo.loss_agg: expected one of 'token-mean'"):
        load_config(Config, None, ["ppo.loss_agg=sum"])


def test_a_registered_policy_loss_named_as_algo_is_the_ppo_preset_with_that_loss():
    algos.register_policy_loss("test-half-a2c")(lambda logprobs, old, adv, mask, **_: (-0.5 * logprobs * adv, {}))
    try:
        p = load_config(Config, None, ["ppo.algo=test-half-a2c"]).ppo
        assert (p.advantage, p.policy_loss, p.loss_agg, p.kl_in_reward) == ("gae", "test-half-a2c", "token-mean", True)
    finally:
        algos.POLICY_LOSSES.pop("test-half-a2c")


REWARDS = '''
def share_of_vowels(prompts, responses):
    return [sum(r.count(c) for c in "aeiou") / max(len(r), 1) for r in responses]
'''


def _config(tmp_path, policy_dir, name, algo, steps, seed=0):
    cfg = Config()
    cfg.model.policy = str(policy_dir)
    cfg.reward.function = "cf_rewards:share_of_vowels"
    cfg.data.prompts, cfg.data.chat_template = str(tmp_path / "prompts.txt"), False
    cfg.rollout.batch_size, cfg.rollout.samples_per_prompt, cfg.rollout.max_new_tokens = 4, 4, 12
    cfg.rollout.temperature = 1.0
    cfg.ppo.algo, cfg.ppo.kl_coef = algo, 0.01  # the preset fills the parts when the trainer validates
    cfg.ppo.lr, cfg.ppo.epochs, cfg.ppo.minibatch_size = 3e-3, 2, 8
    cfg.train.steps, cfg.train.out_dir, cfg.train.save_every = steps, str(tmp_path / name), 0
    cfg.train.progress, cfg.train.report, cfg.train.threads, cfg.train.seed = False, False, 1, seed
    return cfg


@pytest.fixture
def workdir(tmp_path, monkeypatch):
    (tmp_path / "cf_rewards.py").write_text(textwrap.dedent(REWARDS))
    (tmp_path / "prompts.txt").write_text("hello there\nthe sea is\ntell me\nonce upon a time\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    return tmp_path


def _rows(run_dir):
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("algo, changes", [
    ("grpo", {}), ("dr_grpo", {}), ("rloo", {}), ("reinforce_pp", {}), ("reinforce_pp_baseline", {}),
    ("grpo", {"policy_loss": "gspo", "clip_eps": 3e-4, "clip_eps_high": 4e-4}),
    ("grpo", {"loss_agg": "token-mean", "clip_eps_high": 0.28, "dual_clip": 3.0}),  # DAPO's loss, dual clip
], ids=["grpo", "dr_grpo", "rloo", "reinforce_pp", "reinforce_pp_baseline", "gspo", "dapo-dual-clip"])
def test_each_preset_learns_without_a_critic(workdir, tiny_policy_dir, algo, changes):
    """A random tiny policy writes about 2 % vowels; 25 steps of 16 samples must raise the
    share at least four-fold, with no critic built, trained, logged or saved."""
    from rlhf.ppo import PPOTrainer

    cfg = _config(workdir, tiny_policy_dir, "run", algo, 25)
    for key, value in changes.items():
        setattr(cfg.ppo, key, value)
    trainer = PPOTrainer(cfg)
    assert trainer.models.critic is None and trainer.models.value_head is None
    assert list(trainer.updater.optimizers) == ["policy"]
    trainer.train()
    rows = _rows(workdir / "run")
    first, last = (sum(r["reward/score_mean"] for r in part) / 5 for part in (rows[:5], rows[-5:]))
    assert last > 4 * first and last > 0.08, (first, last)
    assert not any(k.startswith("value/") for k in rows[0])
    assert {"policy/clipfrac_high", "policy/clipfrac_low", "reward/zero_std_group_frac"} <= set(rows[0])
    assert sorted(p.name for p in (workdir / "run" / "final").iterdir()) == ["policy"]
    saved = yaml.safe_load((workdir / "run" / "config.yaml").read_text())["ppo"]
    assert saved["advantage"] == algo and saved["policy_loss"] == changes.get("policy_loss", "ppo")
    if changes.get("policy_loss") == "gspo":  # the token inspector shows the ratio GSPO clips: one per sequence
        rows = [json.loads(line) for line in (workdir / "run" / "tokens.jsonl").read_text().splitlines()]
        assert all(len(set(r["ratio"])) == 1 for r in rows) and any(r["ratio"][0] != 1.0 for r in rows)


def test_a_critic_free_run_resumes_exactly(workdir, tiny_policy_dir):
    from rlhf.ppo import PPOTrainer

    PPOTrainer(_config(workdir, tiny_policy_dir, "straight", "grpo", 4)).train()
    PPOTrainer(_config(workdir, tiny_policy_dir, "stopped", "grpo", 2)).train()
    PPOTrainer.resume(workdir / "stopped", overrides=["train.steps=4"]).train()
    straight, resumed = _rows(workdir / "straight"), _rows(workdir / "stopped")
    assert len(resumed) == 4
    for a, b in zip(straight, resumed):
        for k in a:
            if not k.startswith(("time/", "throughput/")):
                assert a[k] == pytest.approx(b[k], rel=1e-5, abs=1e-6), (a["step"], k)


def test_bench_times_a_critic_free_preset(workdir, tiny_policy_dir, capsys):
    """`rlhf bench ppo.algo=grpo rollout.samples_per_prompt=2`: no critic is built or counted."""
    from rlhf.bench import format_result, run_bench

    config = workdir / "bench.yaml"
    config.write_text(yaml.safe_dump({
        "model": {"policy": str(tiny_policy_dir), "critic": "policy"},
        "reward": {"function": "cf_rewards:share_of_vowels"},
        "data": {"prompts": str(workdir / "prompts.txt"), "chat_template": False},
        "rollout": {"batch_size": 2, "max_new_tokens": 4, "early_stop": False},
        "train": {"threads": 1},
    }))
    result = run_bench(str(config), ["ppo.algo=grpo", "rollout.samples_per_prompt=2"], steps=2, as_json=True)
    setup = json.loads(capsys.readouterr().out)["setup"]
    assert (setup["algo"], setup["advantage"], setup["critic"], setup["samples_per_prompt"]) == ("grpo", "grpo", False, 2)
    assert result["median_step_s"] > 0 and set(result["phases"]) == {"generation", "score", "update"}
    assert "ppo.algo=grpo (advantage grpo, critic: none), batch 2 prompts x 2 samples" in format_result(result)


@pytest.mark.slow
@pytest.mark.parametrize("algo", ["grpo", "reinforce_pp"])
def test_two_processes_make_the_update_of_one_process(tmp_path, tiny_policy_dir, algo):
    """Two CPU processes under `accelerate launch`, each with half the prompts and their whole
    groups, make the update of one process on all of them: GRPO's per-sequence aggregation
    over the global batch, REINFORCE++'s whitening with the statistics of every process."""
    import sys

    from safetensors.torch import load_file
    from test_distributed import WORKER, _config as dist_config, _launch, _run, _write_inputs

    _write_inputs(tmp_path)
    paths = {}
    for name, batch in (("one", 4), ("two", 2)):
        path = dist_config(tmp_path, tiny_policy_dir, batch, name)
        data = yaml.safe_load(path.read_text())
        data["ppo"]["algo"], data["rollout"]["samples_per_prompt"] = algo, 2
        path.write_text(yaml.safe_dump(data))
        paths[name] = path
    one, two = tmp_path / "one.pt", tmp_path / "two.pt"
    _run([sys.executable, str(WORKER), str(paths["one"]), str(one)], tmp_path)
    _launch(tmp_path, str(WORKER), str(paths["two"]), str(two))
    one, two = torch.load(one), torch.load(two)
    assert (one["world"], two["world"], one["critic"], two["critic"]) == (1, 2, {}, {})
    initial = load_file(str(tiny_policy_dir / "model.safetensors"))
    assert max((one["policy"][k] - initial[k]).abs().max().item() for k in initial) > 1e-4
    for name, weight in one["policy"].items():
        torch.testing.assert_close(two["policy"][name], weight, rtol=0, atol=2e-6, msg=name)
    for key in ("reward/score_mean", "reward/zero_std_group_frac", "kl/ref_mean", "response/length_mean"):
        assert two["metrics"][key] == pytest.approx(one["metrics"][key], rel=1e-5, abs=1e-6), key
