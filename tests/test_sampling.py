"""DAPO's additions: dynamic sampling (groups without signal dropped, the batch kept at its
size, the bound honoured) and the soft overlong penalty."""

from __future__ import annotations

import json
import textwrap

import pytest
import torch

from rlhf import algos
from rlhf.config import Config, ConfigError, RewardConfig, load_config
from rlhf.data import PromptStream
from rlhf.experience import Rollout
from rlhf.rewards import Reward
from rlhf.sampling import concat_rollouts, zero_variance_groups


def test_overlong_penalty_worked_example():
    # max 20 tokens, buffer 5: no penalty up to 15 tokens, then -0.2 per token down to -1.
    lengths = torch.tensor([0, 10, 15, 16, 18, 20])
    got = algos.overlong_penalty(lengths, max_new_tokens=20, buffer=5, penalty=1.0)
    torch.testing.assert_close(got, torch.tensor([0.0, 0.0, 0.0, -0.2, -0.6, -1.0]))
    torch.testing.assert_close(algos.overlong_penalty(lengths, 20, 5, penalty=0.5), got * 0.5)
    torch.testing.assert_close(algos.overlong_penalty(torch.tensor([20]), 20, 20), torch.tensor([-1.0]))
    with pytest.raises(ValueError, match="buffer: expected a number in \\[1, 20\\]"):
        algos.overlong_penalty(lengths, 20, 21)


def test_overlong_penalty_is_part_of_reward_post_processing():
    reward = Reward(RewardConfig(function="rlhf.verifiable:format_reward", overlong_buffer=4, overlong_penalty=0.5,
                                 clip=None), None, max_new_tokens=8)
    raw, has_eos = torch.tensor([1.0, 1.0, 0.0]), torch.tensor([True, True, False])
    got = reward.process(raw, has_eos, lengths=torch.tensor([4, 6, 8]))
    torch.testing.assert_close(got, torch.tensor([1.0, 0.75, -0.5]))
    torch.testing.assert_close(reward.process(raw, has_eos), raw)  # no lengths: nothing to penalise


def test_dapo_settings_are_checked():
    with pytest.raises(ConfigError, match="reward.overlong_buffer: expected 0 to rollout.max_new_tokens \\(32\\), got 40"):
        load_config(Config, None, ["reward.overlong_buffer=40"])
    with pytest.raises(ConfigError, match="rollout.dynamic_sampling: .*needs rollout.samples_per_prompt >= 2, got 1"):
        load_config(Config, None, ["rollout.dynamic_sampling=true"])
    with pytest.raises(ConfigError, match="rollout.max_sampling_rounds: expected a positive integer, got 0"):
        load_config(Config, None, ["rollout.max_sampling_rounds=0"])


def test_zero_variance_groups():
    scores = torch.tensor([1.0, 1.0, 1.0, 0.0, 1.0, 0.0, 0.5, 0.5 + 1e-8, 0.0, 0.0, 0.0, 0.0])
    assert zero_variance_groups(scores, 3).tolist() == [True, False, False, True]
    assert zero_variance_groups(scores, 2).tolist() == [True, False, False, True, True, True]


def _rollout(prompts: list[list[int]], responses: list[list[int]], pad: int) -> Rollout:
    P, R = max(map(len, prompts)), max(map(len, responses))
    ids = torch.full((len(prompts), P), pad)
    pmask = torch.zeros(len(prompts), P, dtype=torch.long)
    rids, rmask = torch.full((len(prompts), R), pad), torch.zeros(len(prompts), R)
    for i, (p, r) in enumerate(zip(prompts, responses)):
        ids[i, P - len(p):], pmask[i, P - len(p):] = torch.tensor(p), 1
        rids[i, :len(r)], rmask[i, :len(r)] = torch.tensor(r), 1.0
    return Rollout(ids, pmask, rids, rmask, torch.tensor([True] * len(prompts)), rmask * -0.5)


def test_concat_rollouts_pads_prompts_left_and_responses_right():
    a = _rollout([[5, 6]], [[7]], pad=0)
    b = _rollout([[1, 2, 3, 4]], [[8, 9, 10]], pad=0)
    out = concat_rollouts([a, b], pad_id=0)
    assert out.prompt_ids.tolist() == [[0, 0, 5, 6], [1, 2, 3, 4]]
    assert out.prompt_mask.tolist() == [[0, 0, 1, 1], [1, 1, 1, 1]]
    assert out.response_ids.tolist() == [[7, 0, 0], [8, 9, 10]]
    assert out.response_mask.tolist() == [[1, 0, 0], [1, 1, 1]]
    assert out.gen_logprobs.tolist() == [[-0.5, 0, 0], [-0.5, -0.5, -0.5]]
    assert out.sequence_ids.tolist() == [[0, 0, 5, 6, 7, 0, 0], [1, 2, 3, 4, 8, 9, 10]]


REWARDS = '''
def flat_or_length(prompts, responses):
    """Prompts starting with "flat" always score 1 (no signal in their groups); the others
    score their response's length, which varies between samples."""
    return [1.0 if p.startswith("flat") else float(len(r)) for p, r in zip(prompts, responses)]
'''


@pytest.fixture
def workdir(tmp_path, monkeypatch):
    (tmp_path / "ds_rewards.py").write_text(textwrap.dedent(REWARDS))
    monkeypatch.syspath_prepend(str(tmp_path))
    return tmp_path


def _config(tmp_path, policy_dir, prompts: list[str], rounds: int):
    (tmp_path / "prompts.jsonl").write_text("".join(json.dumps({"prompt": p}) + "\n" for p in prompts))
    cfg = Config()
    cfg.model.policy = str(policy_dir)
    cfg.reward.function = "ds_rewards:flat_or_length"
    cfg.data.prompts, cfg.data.chat_template = str(tmp_path / "prompts.jsonl"), False
    cfg.rollout.batch_size, cfg.rollout.samples_per_prompt, cfg.rollout.max_new_tokens = 3, 4, 10
    cfg.rollout.temperature, cfg.rollout.dynamic_sampling, cfg.rollout.max_sampling_rounds = 1.0, True, rounds
    cfg.ppo.advantage, cfg.ppo.kl_in_reward, cfg.ppo.kl_estimator = "grpo", False, "k3"
    cfg.train.steps, cfg.train.out_dir, cfg.train.save_every = 2, str(tmp_path / "run"), 0
    cfg.train.progress, cfg.train.report, cfg.train.threads = False, False, 1
    return cfg


def test_dynamic_sampling_keeps_only_groups_with_signal(workdir, tiny_policy_dir):
    from rlhf.generation import decode_responses
    from rlhf.ppo import PPOTrainer

    prompts = [f"flat {i}" for i in range(6)] + [f"varied {i}" for i in range(6)]
    trainer = PPOTrainer(_config(workdir, tiny_policy_dir, prompts, rounds=20))
    batch = trainer.sampler.sample(trainer.generator)
    texts, _ = batch.prompts(trainer.prompts)
    assert len(texts) == 12 and all(t.startswith("varied") for t in texts)
    assert texts[::4] == texts[1::4] == texts[2::4] == texts[3::4]  # groups of 4 samples of one prompt
    assert decode_responses(trainer.tokenizer, batch.rollout) == batch.responses  # the merged rollout is intact
    assert batch.scored.scores.tolist() == [float(len(r)) for r in batch.responses]
    stats = batch.stats
    assert stats["rollout/filled_groups"] == 0 and 1 <= stats["rollout/sampling_rounds"] <= 20
    # The same stream, replayed: every flat prompt drawn in those rounds was dropped, and the
    # varied prompts kept are the first three drawn.
    replay = PromptStream(len(prompts), trainer.cfg.train.seed)
    drawn = [prompts[i] for _ in range(int(stats["rollout/sampling_rounds"])) for i in replay.next_batch(3)]
    assert stats["rollout/dropped_groups"] == sum(p.startswith("flat") for p in drawn) > 0
    assert texts[::4] == [p for p in drawn if p.startswith("varied")][:3]
    metrics = trainer.step_once()  # the whole step runs on the merged batch
    assert metrics["rollout/sampling_rounds"] >= 1 and metrics["reward/score_std"] > 0


def test_dynamic_sampling_at_its_bound_fills_the_batch_and_says_so(workdir, tiny_policy_dir):
    from rlhf.ppo import PPOTrainer

    trainer = PPOTrainer(_config(workdir, tiny_policy_dir, [f"flat {i}" for i in range(5)], rounds=3))
    metrics = trainer.step_once()
    assert metrics["rollout/sampling_rounds"] == 3
    assert metrics["rollout/dropped_groups"] == 9 and metrics["rollout/filled_groups"] == 3
    assert trainer.stream.position + 5 * trainer.stream.epoch == 9  # three rounds of three prompts drawn
    assert metrics["reward/score_mean"] == 1.0 and metrics["reward/score_std"] == 0.0


DIST_REWARDS = '''
def flat_or_spread(prompts, responses):
    return [1.0 if p.startswith("flat") else float(sum(map(ord, r)) % 97) for p, r in zip(prompts, responses)]
'''


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["all_flat", "mixed"])
def test_dynamic_sampling_in_two_processes(tmp_path, tiny_policy_dir, kind):
    """Processes sample in lockstep (a process that is full still draws its shard, so the
    prompt order stays shared, and rounds go on while any process misses groups); the counts
    are summed over processes. All groups flat: every round of both processes is dropped and
    the bound fills all 2 x 2 places. Mixed: no process is left short, and nothing hangs."""
    import yaml
    from test_distributed import _launch

    (tmp_path / "dist_ds_rewards.py").write_text(textwrap.dedent(DIST_REWARDS))
    prompts = [f"flat {i}" for i in range(8)] + ([] if kind == "all_flat" else [f"varied {i}" for i in range(8)])
    (tmp_path / "prompts.jsonl").write_text("".join(json.dumps({"prompt": p}) + "\n" for p in prompts))
    rounds = 3 if kind == "all_flat" else 20
    config = {
        "model": {"policy": str(tiny_policy_dir)},
        "reward": {"function": "dist_ds_rewards:flat_or_spread"},
        "data": {"prompts": str(tmp_path / "prompts.jsonl"), "chat_template": False},
        "rollout": {"batch_size": 2, "samples_per_prompt": 2, "max_new_tokens": 6, "temperature": 1.0,
                    "dynamic_sampling": True, "max_sampling_rounds": rounds},
        "ppo": {"advantage": "grpo", "kl_in_reward": False, "kl_estimator": "k3"},
        "train": {"steps": 2, "out_dir": str(tmp_path / "run"), "save_every": 0, "progress": False, "report": False,
                  "threads": 1},
    }
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(config))
    _launch(tmp_path, "-m", "rlhf", "ppo", str(tmp_path / "c.yaml"))
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) == 2
    for row in rows:
        if kind == "all_flat":
            assert (row["rollout/sampling_rounds"], row["rollout/dropped_groups"], row["rollout/filled_groups"]) \
                == (3, 12, 4)
        else:
            assert row["rollout/filled_groups"] == 0 and row["reward/score_std"] > 0
