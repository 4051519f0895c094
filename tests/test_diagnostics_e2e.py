"""The health checks on real training runs of a tiny model (seconds each).

An easily exploited reward with no KL penalty must raise reward_hacking or collapse; a
sane configuration must raise nothing (no false alarm) over enough steps for every check
to have had its chance (trend checks from step 10, the critic check from 15, the
over-regularisation check from 20). Both outcomes held for train.seed 0..7 when written.
"""

import json
import textwrap

import pytest

from rlhf.config import Config
from rlhf.ppo import PPOTrainer

REWARDS = '''
def letters_a(prompts, responses):
    """Exploitable: lowercase letters score, the letter 'a' most, whatever the text says."""
    return [(sum(c.islower() for c in r) + 3 * r.count("a")) / 8.0 for r in responses]


def variety(prompts, responses):
    """An independent judge: the share of distinct characters (a string of 'a' scores low)."""
    return [len(set(r)) / max(1, len(r)) for r in responses]


def by_prompt(prompts, responses):
    """Sane: set mostly by the prompt (so a critic can learn it), a little by the response."""
    return [(len(p.split()) - 3) / 2 + 0.5 * sum(c.isalpha() for c in r) / max(1, len(r))
            for p, r in zip(prompts, responses)]
'''

PROMPTS = ["Hi", "Say hello", "Name a colour", "Tell me a story", "Write a short poem please",
           "Describe the sea in five words", "What is rain", "Count to three now"]


def _config(tmp_path, policy_dir, name: str, reward: str, **changes) -> Config:
    cfg = Config()
    cfg.model.policy, cfg.model.critic = str(policy_dir), "policy"
    cfg.reward.function = f"diag_e2e_rewards:{reward}"
    cfg.data.prompts = str(tmp_path / "prompts.txt")
    cfg.rollout.batch_size, cfg.rollout.max_new_tokens = 8, 16
    cfg.ppo.epochs = 2
    cfg.train.out_dir = str(tmp_path / name)
    cfg.train.save_every, cfg.train.progress, cfg.train.threads = 0, False, 1
    for dotted, value in changes.items():
        section, key = dotted.split("__")
        setattr(getattr(cfg, section), key, value)
    return cfg


@pytest.fixture
def rewards_module(tmp_path, monkeypatch):
    (tmp_path / "diag_e2e_rewards.py").write_text(textwrap.dedent(REWARDS))
    (tmp_path / "prompts.txt").write_text("\n".join(PROMPTS) + "\n")
    monkeypatch.syspath_prepend(str(tmp_path))


def _alerts(run_dir) -> list[dict]:
    path = run_dir / "alerts.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def test_exploitable_reward_without_kl_penalty_raises_hacking_or_collapse(tmp_path, tiny_policy_dir, rewards_module):
    cfg = _config(tmp_path, tiny_policy_dir, "hack", "letters_a", ppo__kl_coef=0.0, ppo__lr=1e-2, train__steps=20,
                  eval__judge="diag_e2e_rewards:variety", eval__every=5, eval__num_prompts=8)
    PPOTrainer(cfg).train()
    run_dir = tmp_path / "hack"
    alerts = _alerts(run_dir)
    checks = {a["check"] for a in alerts}
    assert checks & {"reward_hacking", "collapse"}, alerts
    hacking_or_collapse = [a for a in alerts if a["check"] in ("reward_hacking", "collapse")]
    assert all("ppo.kl_coef" in a["message"] for a in hacking_or_collapse)
    # The report written at the end of training shows them.
    page = (run_dir / "report.html").read_text()
    assert all(a["check"] in page for a in hacking_or_collapse)


def test_sane_configuration_raises_no_alert(tmp_path, tiny_policy_dir, rewards_module):
    cfg = _config(tmp_path, tiny_policy_dir, "sane", "by_prompt", ppo__kl_coef=0.2, ppo__lr=1e-3, train__steps=30)
    PPOTrainer(cfg).train()
    assert _alerts(tmp_path / "sane") == []
    assert "No health check fired" in (tmp_path / "sane" / "report.html").read_text()
