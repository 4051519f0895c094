"""Run a few PPO steps on tiny models in several settings and print every metric but the
timings, one JSON line per step: two versions of the code give the same lines when they
compute the same steps (run each, then `diff`).

    python benchmarks/step_equivalence.py > a.jsonl   # one version
    python benchmarks/step_equivalence.py > b.jsonl   # the other
    diff a.jsonl b.jsonl
"""

from __future__ import annotations

import json
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from tiny import save_tiny_policy, tiny_bert_classifier  # noqa: E402

from rlhf.config import Config  # noqa: E402
from rlhf.ppo import PPOTrainer  # noqa: E402

SETTINGS = {
    "ppo": {},
    "ppo_one_minibatch": {"ppo.minibatch_size": None, "ppo.epochs": 1},
    "ppo_micro": {"ppo.micro_batch_size": 2, "ppo.kl_coef": 0.05},
    "a2c": {"ppo.algo": "a2c", "ppo.lr": 3e-2},
    "value_head_lora": {"model.value_head": True, "model.lora": True, "ppo.kl_coef": 0.1},
    "kl_in_loss_k3": {"ppo.kl_in_reward": False, "ppo.kl_estimator": "k3", "ppo.kl_coef": 0.1},
    "adaptive_kl_entropy": {"ppo.kl_target": 1.0, "ppo.kl_coef": 0.1, "ppo.entropy_coef": 0.01},
    "bf16_reward_model": {"model.dtype": "bfloat16", "reward.model": "REWARD", "reward.function": None,
                          "model.critic": "policy"},
    "whiten_rewards_gamma": {"ppo.whiten_rewards": True, "ppo.gamma": 0.9, "ppo.lam": 0.8},
}


def share_of_vowels(prompts, responses):
    return [sum(r.count(c) for c in "aeiou") / max(len(r), 1) for r in responses]


def run(name: str, changes: dict, workdir: Path, policy: Path, reward: Path) -> list[dict]:
    cfg = Config()
    cfg.model.policy, cfg.model.critic = str(policy), "policy"
    cfg.reward.function = "step_equivalence:share_of_vowels"
    cfg.data.prompts, cfg.data.chat_template = str(workdir / "prompts.txt"), False
    cfg.rollout.batch_size, cfg.rollout.max_new_tokens, cfg.rollout.temperature = 8, 12, 1.0
    cfg.ppo.lr, cfg.ppo.epochs, cfg.ppo.minibatch_size, cfg.ppo.kl_coef = 3e-3, 2, 4, 0.02
    cfg.train.out_dir, cfg.train.save_every, cfg.train.progress, cfg.train.report = str(workdir / name), 0, False, False
    cfg.train.threads, cfg.train.steps = 1, 3
    for dotted, value in changes.items():
        section, key = dotted.split(".")
        setattr(getattr(cfg, section), key, str(reward) if value == "REWARD" else value)
    PPOTrainer(cfg).train()
    rows = [json.loads(line) for line in (workdir / name / "metrics.jsonl").read_text().splitlines()]
    return [{"setting": name, **{k: v for k, v in r.items() if not k.startswith(("time/", "throughput/"))}}
            for r in rows]


def main() -> None:
    sys.modules.setdefault("step_equivalence", sys.modules[__name__])
    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp)
        (workdir / "prompts.txt").write_text("\n".join(
            ["hello there", "the sea is", "tell me", "once upon a time", "my cat", "rain falls", "one two", "why"]))
        policy = save_tiny_policy(workdir / "policy")
        reward = tiny_bert_classifier(workdir / "reward")
        for name, changes in SETTINGS.items():
            torch.manual_seed(0)
            for row in run(name, changes, workdir, policy, reward):
                print(json.dumps(row, sort_keys=True), flush=True)


if __name__ == "__main__":
    main()
