"""Algorithms chosen by name, and the loss aggregation that makes an update independent of
how its batch is split into micro-batches and processes."""

import json
import textwrap

import pytest
import torch

from rlhf import algos
from rlhf.config import Config, ConfigError, load_config

MODES = algos.LOSS_AGGREGATIONS


def ragged_batch(seed=0, batch=8, width=10):
    """Per-token losses with a gradient, and a mask of responses of lengths 1..width."""
    g = torch.Generator().manual_seed(seed)
    losses = torch.randn(batch, width, generator=g, dtype=torch.float64).requires_grad_()
    lengths = torch.randint(1, width + 1, (batch,), generator=g)
    mask = (torch.arange(width)[None] < lengths[:, None]).double()
    return losses, mask


def test_aggregations_by_hand():
    # Two sequences, of 1 and 3 tokens, in a width of 4.
    losses = torch.tensor([[6.0, 9.0, 9.0, 9.0], [1.0, 2.0, 3.0, 9.0]])
    mask = torch.tensor([[1.0, 0, 0, 0], [1, 1, 1, 0]])
    # token-mean: (6 + 1 + 2 + 3) / 4 tokens; seq-mean-token-mean: (6 + 2) / 2 sequences;
    # seq-mean-token-sum-norm: 12 / (2 sequences * 4 positions).
    expected = {"token-mean": 3.0, "seq-mean-token-mean": 4.0, "seq-mean-token-sum-norm": 1.5}
    for mode, value in expected.items():
        assert algos.aggregate_loss(losses, mask, mode, max_tokens=4).item() == value, mode


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("micro", [1, 2, 3, 8])
@pytest.mark.parametrize("processes", [1, 2, 4])
def test_aggregation_does_not_depend_on_the_split(mode, micro, processes):
    """The shares of every micro-batch of every process add up to the whole batch's loss,
    and so do their gradients."""
    losses, mask = ragged_batch()
    whole = algos.aggregate_loss(losses, mask, mode, max_tokens=10)
    (whole_grad,) = torch.autograd.grad(whole, losses)
    tokens, sequences = mask.sum(), losses.shape[0]
    total = 0.0
    for shard in torch.arange(sequences).chunk(processes):
        for idx in shard.split(micro):
            total = total + algos.aggregate_loss(losses[idx], mask[idx], mode, batch_tokens=tokens,
                                                 batch_sequences=sequences, max_tokens=10)
    (split_grad,) = torch.autograd.grad(total, losses)
    torch.testing.assert_close(total, whole, rtol=1e-12, atol=0)
    torch.testing.assert_close(split_grad, whole_grad, rtol=1e-12, atol=0)
    assert (split_grad[mask == 0] == 0).all()  # padding gets no gradient


def test_the_aggregations_weigh_lengths_differently():
    losses, mask = ragged_batch(seed=1)
    values = {mode: algos.aggregate_loss(losses, mask, mode, max_tokens=10).item() for mode in MODES}
    assert len({round(v, 9) for v in values.values()}) == 3
    with pytest.raises(ValueError, match="mode: expected one of token-mean"):
        algos.aggregate_loss(losses, mask, "sum")
    with pytest.raises(ValueError, match="max_tokens"):
        algos.aggregate_loss(losses, mask, "seq-mean-token-sum-norm")


def test_named_losses_are_the_documented_means():
    g = torch.Generator().manual_seed(2)
    logprobs, old, adv = (torch.randn(4, 6, generator=g) for _ in range(3))
    mask = (torch.arange(6)[None] < torch.tensor([[6], [3], [1], [5]])).float()
    per_token, stats = algos.policy_loss("ppo")(logprobs, old, adv, mask, clip_eps=0.2, clip_eps_high=None)
    loss, same_stats = algos.ppo_policy_loss(logprobs, old, adv, mask)
    assert algos.masked_mean(per_token, mask).item() == loss.item() and stats == same_stats
    per_token, _ = algos.policy_loss("a2c")(logprobs, old, adv, mask)
    assert algos.masked_mean(per_token, mask).item() == algos.a2c_policy_loss(logprobs, adv, mask).item()
    advantages, returns = algos.advantage_estimator("gae")(rewards=adv, values=old, mask=mask, scores=adv[:, 0],
                                                            gamma=0.9, lam=0.8)
    reference = algos.compute_gae(adv, old, mask, 0.9, 0.8)
    assert torch.equal(advantages, reference[0]) and torch.equal(returns, reference[1])


def test_unknown_names_list_the_registered_ones(tmp_path):
    with pytest.raises(ValueError, match="expected one of 'ppo', 'a2c'"):
        algos.policy_loss("grpo-typo")
    with pytest.raises(ValueError, match="expected one of 'gae'"):
        algos.advantage_estimator("nope")
    with pytest.raises(ValueError, match="registered already"):
        algos.register_advantage_estimator("gae")(lambda **_: None)
    path = tmp_path / "c.yaml"
    path.write_text("reward: {function: m:f}\ndata: {prompts: p.txt}\nppo: {advantage: nope}\n")
    with pytest.raises(ConfigError, match="ppo.advantage: expected one of 'gae'"):
        load_config(Config, path)


def test_a_registered_estimator_runs_in_the_trainer_without_touching_the_loop(tmp_path, tiny_policy_dir, monkeypatch):
    """A Monte-Carlo return (REINFORCE without a baseline) registered from outside: the
    trainer calls it by its config name and trains on what it returns."""
    from rlhf.ppo import PPOTrainer

    calls = []

    def returns_to_go(rewards, values, mask, **_):
        calls.append(rewards.shape)
        returns = (rewards * mask).flip(-1).cumsum(-1).flip(-1) * mask
        return returns, returns

    algos.register_advantage_estimator("test-returns-to-go")(returns_to_go)
    try:
        (tmp_path / "reg_rewards.py").write_text(textwrap.dedent('''
            def share_of_a(prompts, responses):
                return [r.count("a") / max(len(r), 1) for r in responses]
        '''))
        (tmp_path / "prompts.txt").write_text("hello there\nthe sea is\ntell me\nwhy\n")
        monkeypatch.syspath_prepend(str(tmp_path))
        cfg = Config()
        cfg.model.policy, cfg.model.critic = str(tiny_policy_dir), "policy"
        cfg.reward.function = "reg_rewards:share_of_a"
        cfg.data.prompts, cfg.data.chat_template = str(tmp_path / "prompts.txt"), False
        cfg.rollout.batch_size, cfg.rollout.max_new_tokens = 4, 6
        cfg.ppo.advantage, cfg.ppo.whiten_advantages, cfg.ppo.lr = "test-returns-to-go", False, 1e-2
        cfg.train.steps, cfg.train.out_dir, cfg.train.progress, cfg.train.report = 2, str(tmp_path / "run"), False, False
        cfg.train.threads = 1
        trainer = PPOTrainer(cfg)
        before = {k: v.clone() for k, v in trainer.models.unwrapped_policy().state_dict().items()}
        trainer.train()
        after = trainer.models.unwrapped_policy().state_dict()
        assert len(calls) == 2 and calls[0][0] == 4
        assert max((after[k] - before[k]).abs().max().item() for k in before) > 1e-5
        rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
        assert [r["step"] for r in rows] == [1, 2]
    finally:
        algos.ADVANTAGE_ESTIMATORS.pop("test-returns-to-go")
