"""The loop the offline stages share, `rlhf sft` and `rlhf dpo`: the policy learns from a
fixed set of examples instead of its own samples.

One step: this process's `batch_size` examples from a resumable stream, split into
micro-batches whose gradients accumulate (each loss is its share of the global batch, so
the split changes nothing), one optimiser step on the training engine. Held-out
evaluation every `eval_every` steps, atomic checkpoints, resume, and at the end
`final/policy`, which plain transformers loads and `model.policy` of `rlhf ppo` accepts.

The stage supplies the data (`load_items`), the loss of a micro-batch (`micro_batch`) and
its held-out metrics (`evaluate`); the maths is in `rlhf.algos`.

SFT lays sequences out as rows of one or more examples, right-padded: every example's
position ids start at 0 and no attention mask is passed, so transformers builds a causal
mask per example (its packed-sequence masks) and no token attends across an example's
boundary; padding is a segment of its own after every real token. DPO lays each example out
as a PPO rollout instead (`rlhf.dpo.as_rollout`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, NamedTuple, Optional

import torch

from rlhf import algos
from rlhf.actor_critic import load_policy_and_reference, load_trainable_policy
from rlhf.backend import make_backend
from rlhf.checkpoint import restore_run, resume_config, save_checkpoint, save_policy
from rlhf.config import ConfigError, save_config, to_dict
from rlhf.data import PromptStream
from rlhf.engine import AccelerateEngine
from rlhf.errors import NonFiniteError, UserInputError
from rlhf.models import load_tokenizer, resolve_model
from rlhf.optim import lr_schedule, restore_schedule
from rlhf.precision import Precision
from rlhf.prefix import takes_logits_to_keep
from rlhf.rundir import append_row, own_run_dir
from rlhf.runloop import log_stopped, running, stop_agreed
from rlhf.tracking import Trackers, check_tracker_names


@dataclass
class OfflineTrainConfig:
    """The `train` section of `rlhf sft` and `rlhf dpo`."""

    out_dir: str = "runs/sft"
    """Run directory: config.yaml, metrics.jsonl, checkpoints/, final/policy (and
    final/adapter under LoRA), report.html."""
    steps: Optional[int] = None
    """Optimiser steps (null: `epochs` passes over the training examples)."""
    epochs: int = 1
    """Passes over the training data when `steps` is null."""
    batch_size: int = 8
    """Rows per optimiser step and process (`rlhf sft`: packed rows of examples; `rlhf dpo`:
    preference pairs). The global batch is batch_size x processes."""
    micro_batch_size: Optional[int] = None
    """Rows per forward/backward (gradient accumulation inside a step; default: the batch)."""
    lr: float = 2.0e-5
    """AdamW learning rate."""
    weight_decay: float = 0.0
    """AdamW weight decay."""
    adam_eps: float = 1.0e-8
    """AdamW epsilon."""
    fused_adamw: bool = True
    """AdamW as one fused kernel per parameter (CPU and CUDA): the same update, faster."""
    lr_schedule: Literal["constant", "linear"] = "linear"
    """`linear` decays the learning rate to 0 over the run."""
    warmup_steps: int = 0
    """Linear learning-rate warm-up, in optimiser steps."""
    max_grad_norm: float = 1.0
    """Gradient clipping (global norm); 0 turns it off."""
    eval_every: int = 0
    """Held-out evaluation every N steps (0: before training and at the end only)."""
    eval_batch_size: int = 16
    """Rows per forward pass when evaluating."""
    log_every: int = 1
    """Write a line to metrics.jsonl every N steps."""
    save_every: int = 0
    """Write a checkpoint every N steps (0: only at the end)."""
    keep_checkpoints: int = 2
    """Most recent checkpoints kept."""
    seed: int = 0
    """Random seed (data order, held-out split, LoRA initialisation)."""
    threads: Optional[int] = None
    """torch intra-op threads (default: torch's choice)."""
    keep_freed_memory: bool = True
    """Linux/glibc: keep freed memory in the process for the next tensors (rlhf.memory)."""
    report: bool = True
    """Write report.html at the end of training."""
    progress: bool = True
    """Show a progress bar."""
    report_to: list[str] = field(default_factory=list)
    """Experiment trackers that also get the config and every metrics row (same names, same
    steps): any of tensorboard, wandb, mlflow, trackio, comet_ml, aim, clearml, dvclive,
    swanlab (Accelerate's trackers; each needs its package). None by default. TensorBoard
    writes under out_dir/tracking."""

    def validate(self) -> None:
        check_tracker_names(self.report_to)
        for name in ("epochs", "batch_size", "eval_batch_size", "log_every"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"train.{name}: expected a positive integer, got {getattr(self, name)}")
        for name in ("steps", "micro_batch_size"):
            if getattr(self, name) is not None and getattr(self, name) <= 0:
                raise ConfigError(f"train.{name}: expected a positive integer or null, got {getattr(self, name)}")
        if self.lr <= 0:
            raise ConfigError(f"train.lr: expected > 0, got {self.lr}")
        for name in ("warmup_steps", "max_grad_norm", "weight_decay", "eval_every", "save_every", "keep_checkpoints"):
            if getattr(self, name) < 0:
                raise ConfigError(f"train.{name}: expected >= 0, got {getattr(self, name)}")


# --------------------------------------------------------------------------------------
# Token layout
# --------------------------------------------------------------------------------------


class Tokens(NamedTuple):
    """One example as token ids and the mask of the tokens the loss reads (1: learned)."""

    ids: list[int]
    loss_mask: list[int]
    """loss_mask[t] is 1 when the loss reads log pi(ids[t] | ids[:t]); always 0 at t = 0."""


def encode_response(tokenizer, text: str) -> list[int]:
    """A completion's token ids, ending with EOS: the model learns to stop, and the layout is
    that of a PPO rollout (the response sampled after the prompt, up to its EOS)."""
    return tokenizer(text, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]


def prompt_and_response(prompt_ids: list[int], response_ids: list[int], max_length: int | None = None) -> Tokens:
    """prompt + response, cut to `max_length` tokens when given (the response loses its end),
    the loss on the response tokens."""
    ids = (prompt_ids + response_ids)[:max_length]
    mask = ([0] * len(prompt_ids) + [1] * len(response_ids))[:max_length]
    mask[0] = 0
    return Tokens(ids, mask)


def collate(rows: list[list[Tokens]], pad_id: int, device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(ids, position_ids, loss_mask) of rows of examples: ids and positions (B, L), each
    example's positions from 0; the loss mask (B, L - 1) lines up with the log-probs of
    ids[:, 1:]. Padding (after every real token) gets positions of its own from 0."""
    width = max(sum(len(t.ids) for t in row) for row in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    positions = torch.zeros((len(rows), width), dtype=torch.long)
    mask = torch.zeros((len(rows), width))
    for r, row in enumerate(rows):
        start = 0
        for t in row:
            end = start + len(t.ids)
            ids[r, start:end] = torch.tensor(t.ids)
            positions[r, start:end] = torch.arange(len(t.ids))
            mask[r, start:end] = torch.tensor(t.loss_mask, dtype=mask.dtype)
            start = end
        positions[r, start:] = torch.arange(width - start)
    return ids.to(device), positions.to(device), mask[:, 1:].to(device)


def token_logprobs(model, ids: torch.Tensor, positions: torch.Tensor, precision: Precision,
                   first: int = 1) -> torch.Tensor:
    """log pi(ids[:, t] | ids[:, :t]) for t = first .. L - 1, (B, L - first), fp32. With `first`
    past 1, the positions before it skip the vocabulary projection (logits_to_keep)."""
    L = ids.shape[1]
    keep = ({"logits_to_keep": torch.arange(first - 1, L - 1, device=ids.device)}
            if first > 1 and takes_logits_to_keep(model) else {})
    with precision.autocast(ids.device):
        logits = model(input_ids=ids, position_ids=positions, use_cache=False, **keep).logits
    if logits.shape[1] == L:  # every position's logits (a forward that keeps them all)
        logits = logits[:, first - 1:-1]
    return algos.logprobs_from_logits(logits, ids[:, first:])


@torch.no_grad()
def check_packing(model) -> None:
    """Refuse a model whose attention ignores the per-example position ids (no packed-sequence
    masks): two short examples in one row must give the log-probs they give apart."""
    vocab, device = model.get_input_embeddings().num_embeddings, next(model.parameters()).device
    g = torch.Generator().manual_seed(0)
    a, b = (Tokens(torch.randint(vocab, (n,), generator=g).tolist(), [0] + [1] * (n - 1)) for n in (5, 4))
    apart = [token_logprobs(model, *collate([[t]], 0, device)[:2], Precision()) for t in (a, b)]
    packed = token_logprobs(model, *collate([[a, b]], 0, device)[:2], Precision())
    # The packed row's log-probs: a's 4, then the one that predicts b[0] from a (not learned), then b's 3.
    first, second = packed[0, :4], packed[0, 5:]
    if not (torch.allclose(first, apart[0][0], atol=1e-4) and torch.allclose(second, apart[1][0], atol=1e-4)):
        raise UserInputError(f"data.packing: {type(model).__name__} attends across the examples of a packed row "
                             "(its attention does not build masks from position ids); set data.packing=false")


# --------------------------------------------------------------------------------------
# The loop
# --------------------------------------------------------------------------------------


class OfflineState:
    """What resume needs beyond weights and optimiser: the step, the position in the example
    stream and the learning-rate schedule (saved in every checkpoint as JSON)."""

    def __init__(self, trainer: "OfflineTrainer"):
        self.trainer = trainer

    def state_dict(self) -> dict:
        t = self.trainer
        return {"step": t.step, "stream": t.stream.state_dict(), "schedule": t.scheduler.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        t = self.trainer
        t.step = state["step"]
        t.stream.load_state_dict(state["stream"])
        restore_schedule(t.scheduler, state["schedule"])


RESUMABLE = ("train.", "model.cache_dir")
"""What may change when an offline run resumes: how long it runs (train.steps, train.epochs),
how it evaluates, logs, saves and uses the machine."""
FIXED = ("train.seed", "train.out_dir", "train.batch_size", "train.lr", "train.weight_decay", "train.adam_eps",
         "train.lr_schedule", "train.warmup_steps", "train.max_grad_norm")
"""The run's identity (data order) and its optimisation, fixed by the checkpoint."""


class OfflineTrainer:
    """Build from a config with `model`, `data` and `train` sections, then `train()`, or
    `step_once()` for one step's metrics. Subclasses name their command and config class and
    give `load_items`, `micro_batch` and `evaluate`."""

    command = "offline"
    config_cls: type = object
    resumable = RESUMABLE
    """What may change when a run of this command resumes."""
    trackers: Trackers | None = None
    """train.report_to's trackers while `train()` runs (main process)."""
    needs_reference = False
    """True for a stage that compares the policy with its frozen starting point (DPO)."""

    def __init__(self, cfg, accelerator=None, *, engine=None, overwrite: bool = False, _resuming: bool = False):
        """A new run refuses a `train.out_dir` that holds another run unless `overwrite`
        (which removes that run's files); `resume` builds the trainer with `_resuming`."""
        cfg.validate()
        self.cfg, t = cfg, cfg.train
        self.engine = engine or AccelerateEngine(accelerator)
        self.precision = Precision(cfg.model.dtype)
        self.backend = make_backend(self.engine.device, self.precision, cfg.model)
        self.backend.setup_process(t)
        torch.manual_seed(t.seed)  # LoRA's initial weights: the same on every process
        self.out_dir = Path(t.out_dir)
        path = resolve_model(cfg.model.policy, cfg.model.cache_dir, field="model.policy")
        self.tokenizer = load_tokenizer(path, "right", cfg.model.trust_remote_code)
        if self.tokenizer.eos_token_id is None:
            raise UserInputError(f"model.policy: the tokenizer at {path} has no EOS token")
        # The data first: a bad line stops the run before any model is loaded.
        self.train_items, self.eval_items = self.load_items()
        if not self.train_items:
            raise UserInputError(f"data.train: {cfg.data.train} gives no training examples")
        self.policy, self.ref = self._load_models(path)
        self.stream = PromptStream(len(self.train_items), t.seed, self.engine.rank, self.engine.world)
        per_epoch = math.ceil(len(self.train_items) / (t.batch_size * self.engine.world))
        self.total_steps = t.steps or t.epochs * per_epoch
        fused = {"fused": True} if t.fused_adamw else {}
        optimizer = torch.optim.AdamW([q for q in self.policy.parameters() if q.requires_grad], lr=t.lr,
                                      eps=t.adam_eps, weight_decay=t.weight_decay, **fused)
        self.policy, self.optimizer = self.engine.prepare(self.policy, optimizer)
        # Not prepared: Accelerate steps a prepared schedule once per process at each call (it
        # takes the batch to grow with the processes), so N processes would decay it N times faster.
        self.scheduler = lr_schedule(self.optimizer, t.warmup_steps, self.total_steps, t.lr_schedule)
        self.step = 0
        self.stop_signal: str | None = None  # the name of the signal that stopped train() early
        self.state = OfflineState(self)
        # Last: a trainer that failed to build holds no lock and leaves no run behind.
        self.run_lock = own_run_dir(self.engine, self.out_dir, None if _resuming else overwrite,
                                    lambda: save_config(cfg, self.out_dir / "config.yaml"), self.command)

    def _load_models(self, path: Path):
        """The policy to train and, for a stage that needs one, the frozen reference (None
        under LoRA: the adapter-disabled base is the reference), prepared by the backend."""
        m = self.cfg.model
        if self.needs_reference:
            policy, ref = load_policy_and_reference(self.cfg, path, self.backend)
        else:
            policy, ref = load_trainable_policy(self.cfg, path), None
        self.check_model(policy)
        if m.lora:
            self.backend.prepare_frozen(policy)  # the base weights are frozen
        for model in (policy, ref):
            if model is not None:
                self.backend.prepare_model(model, checkpointed=bool(m.gradient_checkpointing))
        return policy, ref

    def check_model(self, policy) -> None:
        """Refuse a policy the stage cannot train, before the backend changes it."""

    def load_items(self) -> tuple[list, list]:
        """(training items, held-out items)."""
        raise NotImplementedError

    def micro_batch(self, items: list, batch_size: float) -> tuple[torch.Tensor, dict[str, float]]:
        """(loss, statistics) of a micro-batch, each as its share of a global batch of
        `batch_size` (rows, tokens or pairs as the stage counts them): shares add up."""
        raise NotImplementedError

    def sequences(self, item) -> list[Tokens]:
        """The token sequences of one item (a row's examples, a pair's two responses)."""
        raise NotImplementedError

    def batch_size(self, items: list) -> float:
        """What the loss of a batch is a mean over, summed over every process."""
        return float(len(items) * self.engine.world)

    def evaluate(self) -> dict[str, float]:
        """Held-out metrics (`eval/...`); empty without held-out data."""
        raise NotImplementedError

    @classmethod
    def resume(cls, run_dir: Path, overrides: list[str] | None = None, accelerator=None):
        """Rebuild the trainer from `run_dir/config.yaml` and restore the newest checkpoint that
        verifies: weights, optimiser, schedule, random states and the position in the example
        stream. Overrides may change how long the run is (train.steps, train.epochs: the
        learning rate of the restored step is taken from the longer schedule), how it
        evaluates, logs and saves; others are refused by name. config.yaml is rewritten, and
        the logs cut back to the checkpoint's step, only once it has loaded."""
        cfg = resume_config(run_dir, list(overrides or []), cls.config_cls, cls.resumable, FIXED)
        trainer = cls(cfg, accelerator, _resuming=True)
        restore_run(trainer, run_dir)
        return trainer

    # One step ---------------------------------------------------------------------

    def step_once(self) -> dict:
        """One optimiser step; returns the metrics row."""
        t, engine = self.cfg.train, self.engine
        start = engine.clock()
        items = [self.train_items[i] for i in self.stream.next_batch(t.batch_size)]
        micro = t.micro_batch_size or len(items)
        chunks = [items[i:i + micro] for i in range(0, len(items), micro)]
        total = self.batch_size(items)
        stats: dict[str, float] = {}
        self.policy.train()  # dropout is 0 (frozen_dropout); transformers checkpoints in training mode only
        for i, chunk in enumerate(chunks):
            with engine.accumulating([self.policy], last=i == len(chunks) - 1):
                loss, row = self.micro_batch(chunk, total)
                if not torch.isfinite(loss):
                    raise NonFiniteError(f"non-finite {self.command} loss at step {self.step + 1}; "
                                         "the step was refused")
                # DDP averages gradients over processes; the shares are of the global batch.
                engine.backward(loss * engine.world if engine.world > 1 else loss)
            for k, v in row.items():
                stats[k] = stats.get(k, 0.0) + v
        engine.apply_gradients({"policy": self.optimizer}, {"policy": self.policy}, t.max_grad_norm)
        lr = self.scheduler.get_last_lr()[0]
        self.scheduler.step()
        self.step += 1
        elapsed = engine.clock() - start
        tokens = engine.sum(torch.tensor(float(sum(len(s.ids) for x in items for s in self.sequences(x))))).item()
        if engine.world > 1:
            stats = {k: engine.reduce_mean(v) * engine.world for k, v in stats.items()}
        return {"step": self.step, **stats, "lr": lr, "time/step_s": elapsed,
                "throughput/tokens_per_s": tokens / max(elapsed, 1e-9)}

    # The loop ---------------------------------------------------------------------

    def train(self) -> dict:
        """Run to the last step; returns the last metrics row, with the final held-out
        metrics. SIGINT (Ctrl-C), SIGTERM or SIGUSR1 finishes the current step, saves a
        checkpoint and returns with `stop_signal` set; a second signal aborts."""
        from tqdm.auto import tqdm

        t = self.cfg.train
        bar = tqdm(total=self.total_steps, initial=self.step, desc=self.command,
                   disable=not t.progress or not self.engine.is_main)
        row: dict = {}
        try:
            with running(self):
                if t.report_to and self.engine.is_main:
                    self.trackers = Trackers(t.report_to, self.out_dir, to_dict(self.cfg), self.step)
                if self.step == 0 and self.eval_items:
                    self._write({"step": 0, **self.evaluate()})
                while self.step < self.total_steps and not stop_agreed(self):
                    row = self.step_once()
                    last = self.step == self.total_steps
                    if self.eval_items and (last or (t.eval_every and self.step % t.eval_every == 0)):
                        row.update(self.evaluate())
                    if last or self.step % t.log_every == 0 or any(k.startswith("eval/") for k in row):
                        self._write(row)
                    bar.update(1)
                    bar.set_postfix({"loss": f"{row['train/loss']:.3f}"})
                    if t.save_every and self.step % t.save_every == 0 and not last:
                        self.save_checkpoint()
                self.save_checkpoint()
                if self.stop_signal is not None:
                    log_stopped(self, self.command)
                elif self.step >= self.total_steps:
                    self.save_final()
                    if t.report and self.engine.is_main:
                        from rlhf.report import write_report

                        write_report(self.out_dir)
        finally:
            bar.close()
            if self.trackers is not None:
                self.trackers.finish()
                self.trackers = None
        return row

    def _write(self, row: dict) -> None:
        """A row of metrics.jsonl, and of the trackers."""
        if self.engine.is_main:
            append_row(self.out_dir / "metrics.jsonl", row)
            if self.trackers is not None:
                self.trackers.log(row)

    def save_checkpoint(self) -> Path:
        """Atomic: written into a temporary directory, renamed when complete."""
        return save_checkpoint(self.engine, self.out_dir, self.step, self.cfg.train.keep_checkpoints,
                               self.state.state_dict())

    def save_final(self) -> Path:
        """final/policy (merged under LoRA, the adapter in final/adapter), with the tokenizer."""
        final = self.out_dir / "final"
        if self.engine.is_main:
            save_policy(final, self.engine.unwrap(self.policy), self.tokenizer, self.cfg.model.lora)
        self.engine.wait()
        return final / "policy"

    def unwrapped_policy(self):
        return self.engine.unwrap(self.policy)
