"""What a step writes: the metrics row (metrics.jsonl) and a few responses with their
per-token numbers (samples.jsonl, tokens.jsonl)."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from rlhf import algos
from rlhf.diagnostics import distinct_n, repeated_ngram_fraction
from rlhf.experience import Experience
from rlhf.updater import UpdateResult


def step_metrics(exp: Experience, result: UpdateResult, engine, step: int, lr: float, times: dict[str, float]) -> dict:
    """The metrics of one step over every process's sequences; `times` holds the phases'
    seconds (`rollout`, `score`, `update`, `step`)."""
    rollout, mask = exp.rollout, exp.mask
    all_scores = engine.gather(exp.scores)
    lengths = mask.sum(-1)
    gap = (rollout.gen_logprobs - exp.old_logprobs).abs() * mask if rollout.gen_logprobs is not None else None
    responses = engine.gather_objects(exp.responses)  # text statistics over every process's responses
    critic = {"value/explained_variance": algos.explained_variance(
        *(engine.gather_tokens(t) for t in (exp.values, exp.returns, mask)))} if "value/loss" in result.stats else {}
    grouped = exp.groups is not None and exp.groups.unique().numel() < exp.size
    # Groups whose scores are all equal give every sample advantage 0 under a group baseline.
    groups = {"reward/zero_std_group_frac": engine.mean(algos.constant_groups(exp.scores, exp.groups).float()).item()
              } if grouped else {}
    return {
        "step": step,
        "reward/score_mean": all_scores.mean().item(),
        "reward/score_std": all_scores.std().item() if all_scores.numel() > 1 else 0.0,
        "reward/raw_mean": engine.mean(exp.raw_scores).item(),
        **{f"reward/{name}_mean": engine.mean(v).item() for name, v in exp.reward_components.items()},
        "reward/total_mean": engine.mean((exp.rewards * mask).sum(-1)).item(),
        **groups,
        "kl/ref_mean": engine.mean(exp.sequence_kl).item(),
        "kl/coef": exp.kl_coef,
        **{k: engine.reduce_mean(v) for k, v in result.stats.items()},
        **critic,
        "policy/logprob_gap": (engine.sum(gap) / engine.sum(mask)).item() if gap is not None else 0.0,
        "response/length_mean": engine.mean(lengths).item(),
        "response/eos_frac": engine.mean(rollout.has_eos.float()).item(),
        "response/distinct2": distinct_n(responses, 2),
        "response/repeat_frac": repeated_ngram_fraction(responses, 4),
        "lr": lr,
        "time/step_s": times["step"],
        "time/rollout_s": times["rollout"],
        "time/score_s": times["score"],
        "time/update_s": times["update"],
        "throughput/tokens_per_s": engine.gather(lengths).sum().item() / times["step"],
    }


def write_samples(out_dir: Path, step: int, exp: Experience, result: UpdateResult, tokenizer, n: int,
                  clip_eps: float, clip_eps_high: float | None, sequence_ratio: bool = False) -> None:
    """`n` responses to samples.jsonl, and the per-token view of two of them to tokens.jsonl
    (the report's token inspector). `sequence_ratio`: the loss clips each sequence's ratio
    (GSPO), shown on each of its tokens."""
    n = min(n, exp.size)
    seq_kl = exp.sequence_kl
    if sequence_ratio:
        ratio = algos.sequence_ratio(result.logprobs, exp.old_logprobs, exp.mask)[:, None] * exp.mask
    else:
        ratio = torch.exp(result.logprobs - exp.old_logprobs)
    clip = algos.ppo_clip_side(ratio, exp.advantages, clip_eps, clip_eps_high)
    with open(out_dir / "samples.jsonl", "a") as f:
        for i in range(n):
            f.write(json.dumps({"step": step, "prompt": exp.prompts[i], "response": exp.responses[i],
                                "score": exp.scores[i].item(), "kl": seq_kl[i].item()}) + "\n")
    per_token = (("logprob", result.logprobs), ("old_logprob", exp.old_logprobs), ("ref_logprob", exp.ref_logprobs),
                 ("ratio", ratio), ("clip", clip), ("advantage", exp.advantages), ("value", exp.values),
                 ("return", exp.returns), ("kl", exp.old_logprobs - exp.ref_logprobs), ("reward", exp.rewards))
    with open(out_dir / "tokens.jsonl", "a") as f:
        for i in range(min(2, n)):
            L = int(exp.mask[i].sum().item())
            row = {"step": step, "prompt": exp.prompts[i], "response": exp.responses[i], "score": exp.scores[i].item(),
                   "tokens": tokenizer.convert_ids_to_tokens(exp.rollout.response_ids[i, :L].tolist())}
            for key, t in per_token:
                row[key] = [round(float(v), 5) for v in t[i, :L].tolist()]
            row["clip"] = [int(v) for v in row["clip"]]
            f.write(json.dumps(row) + "\n")
