"""The update: `ppo.epochs` passes over the experience, each in minibatches (one optimiser
step each) split into micro-batches whose gradients accumulate.

Every loss term is aggregated as its micro-batch's share of the minibatch of all processes
(`algos.aggregate_loss`), so micro-batching and sharding leave the update unchanged; the
non-finite guards refuse a step before any weight changes.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from rlhf import algos
from rlhf.config import PPOConfig
from rlhf.experience import Experience
from rlhf.experience_maker import check_finite
from rlhf.optim import lr_schedule


@dataclass
class UpdateResult:
    stats: dict[str, float]
    """Means over micro-batches of the loss statistics (`policy/*`, `value/*`)."""
    logprobs: torch.Tensor
    """(B, R) each sequence's log-probs at its last forward of the update."""


class Updater:
    def __init__(self, models, engine, ppo: PPOConfig, total_steps: int, max_new_tokens: int,
                 shuffle_rng: torch.Generator):
        self.models, self.engine, self.p = models, engine, ppo
        self.max_new_tokens, self.shuffle_rng = max_new_tokens, shuffle_rng
        self.loss_fn = algos.policy_loss(ppo.policy_loss)
        critic_lr = ppo.critic_lr if ppo.critic_lr is not None else 2 * ppo.lr
        fused = {"fused": True} if ppo.fused_adamw else {}
        lrs = {"policy": ppo.lr, "critic": critic_lr}
        self.optimizers = {
            name: torch.optim.AdamW([q for q in module.parameters() if q.requires_grad], lr=lrs[name],
                                    eps=ppo.adam_eps, weight_decay=ppo.weight_decay, **fused)
            for name, module in models.trained.items()}
        self.total_steps = total_steps
        self.schedulers: dict[str, torch.optim.lr_scheduler.LambdaLR] = {}  # built by prepare()

    def prepare(self) -> None:
        """Wrap models and optimisers for this engine (after the models exist), then build
        the learning-rate schedules on the wrapped optimisers. The schedules are not prepared:
        Accelerate steps a prepared schedule once per process at each call (it takes the
        batch to grow with the processes), so N processes would move it N times faster."""
        trained, names, p = self.models.trained, list(self.optimizers), self.p
        n = len(names)
        prepared = self.engine.prepare(*trained.values(), *self.optimizers.values())
        modules = dict(zip(names, prepared[:n]))
        self.optimizers = dict(zip(names, prepared[n:2 * n]))
        self.schedulers = {name: lr_schedule(opt, p.warmup_steps, self.total_steps, p.lr_schedule)
                           for name, opt in self.optimizers.items()}
        self.models.policy = modules["policy"]
        if self.models.value_head is not None:
            self.models.value_head = modules["critic"]
        elif self.models.critic is not None:
            self.models.critic = modules["critic"]

    @property
    def lr(self) -> float:
        return self.schedulers["policy"].get_last_lr()[0]

    def schedule_step(self) -> None:
        for scheduler in self.schedulers.values():
            scheduler.step()

    @staticmethod
    def batch_shape(p: PPOConfig, batch: int) -> tuple[int, int, int]:
        """(epochs, minibatch size, micro-batch size) for a rollout batch of `batch`."""
        one_pass = p.policy_loss == "a2c"  # no ratio, no clip: one pass over the whole batch
        mb = batch if one_pass else (p.minibatch_size or batch)
        return (1 if one_pass else p.epochs), mb, min(p.micro_batch_size or mb, mb)

    def update(self, exp: Experience) -> UpdateResult:
        B = exp.size
        epochs, mb_size, micro = self.batch_shape(self.p, B)
        stats: dict[str, list[float]] = {}
        logprobs = exp.old_logprobs.clone()
        for _ in range(epochs):
            # A kept scoring pass is in rollout order (one minibatch): no shuffle to draw.
            kept = self.models.holds_forward_of(exp.rollout)
            order = torch.arange(B) if kept else torch.randperm(B, generator=self.shuffle_rng)
            order = order.to(self.engine.device)
            for start in range(0, B, mb_size):
                self._minibatch(exp, order[start:start + mb_size], micro, stats, logprobs)
        return UpdateResult({k: float(np.mean(v)) for k, v in stats.items()}, logprobs)

    def _minibatch(self, exp: Experience, mb: torch.Tensor, micro: int, stats: dict, logprobs: torch.Tensor) -> None:
        engine, trained = self.engine, self.models.trained
        chunks = [mb[i:i + micro] for i in range(0, len(mb), micro)]
        tokens = engine.sum(exp.mask[mb])  # of every process: the loss is a mean over all of them
        for i, idx in enumerate(chunks):
            with engine.accumulating(trained.values(), last=i == len(chunks) - 1):
                out = self.models.train_forward(exp.rollout, idx)
                policy_loss, value_loss, row = self._losses(exp.select(idx), out, tokens, len(mb) * engine.world)
                # DDP averages gradients over processes; the shares are of the global batch.
                scale = engine.world
                engine.backward(policy_loss * scale if scale > 1 else policy_loss)
                if value_loss is not None:
                    engine.backward(value_loss * scale if scale > 1 else value_loss)
            logprobs[idx] = out.logprobs.detach()
            for k, v in row.items():
                stats.setdefault(k, []).append(float(v))
        engine.apply_gradients(self.optimizers, trained, self.p.max_grad_norm)

    def _losses(self, sub: Experience, out, tokens: torch.Tensor, sequences: int):
        """(actor loss, separate critic's loss or None, stats) of one micro-batch, each loss
        its share of the minibatch's."""
        p, m = self.p, sub.mask

        def agg(per_token):
            return algos.aggregate_loss(per_token, m, p.loss_agg, batch_tokens=tokens, batch_sequences=sequences,
                                        max_tokens=self.max_new_tokens)

        pg_tokens, pg_stats = self.loss_fn(out.logprobs, sub.old_logprobs, sub.advantages, m, clip_eps=p.clip_eps,
                                           clip_eps_high=p.clip_eps_high, dual_clip=p.dual_clip)
        if p.tis_cap is not None and sub.rollout.gen_logprobs is not None:
            pg_tokens = pg_tokens * algos.truncated_importance_weights(sub.old_logprobs, sub.rollout.gen_logprobs,
                                                                       p.tis_cap)
        loss = agg(pg_tokens) - p.entropy_coef * agg(out.entropy)
        if not p.kl_in_reward and sub.kl_coef > 0:
            loss = loss + sub.kl_coef * agg(algos.kl_penalty(out.logprobs, sub.ref_logprobs, p.kl_estimator))
        check_finite(loss.detach(), "policy loss")
        row = {"policy/loss": algos.masked_mean(pg_tokens, m).item(),
               "policy/entropy": algos.masked_mean(out.entropy, m).item(), **{f"policy/{k}": v for k, v in pg_stats.items()}}
        if not self.models.has_critic:
            return loss, None, row
        v_tokens, v_stats = algos.value_token_loss(out.values, sub.values, sub.returns, m, p.value_clip)
        value_loss, v_mean = agg(v_tokens), algos.masked_mean(v_tokens, m)
        if self.models.value_head is not None:  # one trunk: one loss
            loss, value_loss = loss + p.vf_coef * value_loss, None
        check_finite(v_mean.detach(), "value loss")
        row.update({"value/loss": v_mean.item(), **{f"value/{k}": v for k, v in v_stats.items()}})
        return loss, value_loss, row
