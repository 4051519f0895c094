"""The PPO / A2C trainer: rollout -> score -> advantages -> update -> metrics / checkpoint.

Orchestration only; every formula lives in `rlhf.algos`. One step:

1. take this process's prompts from the stream and sample responses from the policy;
2. score: reward (model or function), old log-probs (policy), reference log-probs, values;
3. per-token rewards (KL penalty on every token, score on the last), GAE, whitening;
4. `ppo.epochs` passes over shuffled minibatches, each split into micro-batches whose
   gradients accumulate, one optimiser step per minibatch for actor and critic;
5. metrics, samples, health checks, checkpoint.
"""

from __future__ import annotations

import json
import logging
import os
import random
import re
import shutil
import signal
import time
from contextlib import ExitStack
from pathlib import Path

import numpy as np
import torch
from accelerate import Accelerator
from torch import nn

from rlhf import algos, memory, onednn
from rlhf.config import Config, UserInputError, from_dict, apply_overrides, save_config, validate_ppo_config
from rlhf.data import PromptStream, left_pad, load_prompts, tokenize_prompts
from rlhf.diagnostics import HealthMonitor, distinct_n, repeated_ngram_fraction
from rlhf.models import (atomic_save_pretrained, enable_activation_checkpointing, init_value_head, load_critic,
                         load_policy, load_tokenizer, resolve_model)
from rlhf.rewards import Reward, call_text_function, import_function
from rlhf.rollout import (NonFiniteError, Rollout, critic_forward, fp32_attention, frozen_linears_to_bf16, generate,
                          policy_forward, warn_off_policy)

log = logging.getLogger(__name__)


def make_accelerator() -> Accelerator:
    """The Accelerator of this launch; a setup Accelerate cannot build (FSDP asked for on a
    machine without accelerators, say) is a one-line configuration error."""
    try:
        return Accelerator()
    except (RuntimeError, ValueError) as e:
        raise UserInputError(f"accelerate config: {e}") from None


def check_data_parallel(accelerator: Accelerator) -> None:
    """Refuse the Accelerate setups that shard parameters or wrap several models differently
    (FSDP, DeepSpeed, Megatron-LM): generation, the prepacked decoding weights and the final
    save read each model's whole parameters on one process, so such a run would stop deep
    inside a library or hang, not train. Data parallelism (DDP) over CPUs or GPUs is tested."""
    from accelerate.utils import DistributedType

    kind = accelerator.distributed_type
    if kind in (DistributedType.FSDP, DistributedType.DEEPSPEED, DistributedType.MEGATRON_LM):
        raise UserInputError(
            f"accelerate config: distributed type {kind.value} is not supported yet (generation and the final save "
            "read whole parameters, which it shards); use data parallelism: `accelerate launch --multi_gpu` (DDP)")
    if os.environ.get("ACCELERATE_USE_FSDP", "").lower() == "true":
        # On CPUs Accelerate turns an FSDP2 config into data parallelism, while transformers still
        # loads the weights of every process but the first on the meta device for FSDP to fill.
        raise UserInputError(
            "accelerate config: FSDP was asked for, but Accelerate runs it only on accelerators and set up "
            f"{kind.value} here; launch data parallelism instead: `accelerate launch --multi_gpu` (DDP)")


def _check_finite(tensor: torch.Tensor, where: str) -> None:
    if not torch.isfinite(tensor).all():
        raise NonFiniteError(f"non-finite values in {where}; the step was refused before any weight changed")


class TrainerState:
    """What resume needs beyond weights and optimisers (registered with Accelerate)."""

    def __init__(self, trainer: "PPOTrainer"):
        self.trainer = trainer

    def state_dict(self) -> dict:
        """Called on every process (Accelerate saves the main process's copy): the shared
        state, and the minibatch-shuffling generator of every process, in rank order."""
        t = self.trainer
        shuffle = [t.shuffle_rng.get_state()]
        if t.world > 1:
            from accelerate.utils import gather_object

            shuffle = gather_object(shuffle)
        return {"step": t.step, "kl_ctl": t.kl_ctl.state_dict(), "prompts": t.stream.state_dict(),
                "monitor": t.monitor.state_dict(), "shuffle_rng": shuffle}

    def load_state_dict(self, state: dict) -> None:
        t = self.trainer
        t.step = state["step"]
        t.kl_ctl.load_state_dict(state["kl_ctl"])
        t.stream.load_state_dict(state["prompts"])
        t.monitor.load_state_dict(state["monitor"])
        shuffle = state["shuffle_rng"]
        if not isinstance(shuffle, list):  # checkpoints written before states were kept per process
            shuffle = [shuffle]
        if len(shuffle) != t.world and t.rank == 0:
            log.warning("resuming on %d processes a run checkpointed on %d: prompts are sharded and "
                        "samples drawn differently, so it continues the run but does not repeat it exactly",
                        t.world, len(shuffle))
        if t.rank < len(shuffle):
            t.shuffle_rng.set_state(shuffle[t.rank])


class PPOTrainer:
    """Build from a `Config`, then `train()` (or `step()` one at a time)."""

    def __init__(self, cfg: Config, accelerator: Accelerator | None = None):
        self.cfg = cfg = validate_ppo_config(cfg)
        self.accelerator = acc = accelerator or make_accelerator()
        check_data_parallel(acc)
        self.rank, self.world = acc.process_index, acc.num_processes
        if cfg.train.threads:
            torch.set_num_threads(cfg.train.threads)
        if cfg.train.keep_freed_memory:
            memory.keep_freed_memory()
        # Different sampling seed per process, shared prompt order (pitfalls).
        seed = cfg.train.seed
        random.seed(seed + self.rank)
        np.random.seed(seed + self.rank)
        torch.manual_seed(seed + self.rank)
        self.out_dir = Path(cfg.train.out_dir)
        if acc.is_main_process:
            self.out_dir.mkdir(parents=True, exist_ok=True)
            save_config(cfg, self.out_dir / "config.yaml")

        # Policy, reference and critic.
        policy_path = resolve_model(cfg.model.policy, cfg.model.cache_dir, field="model.policy")
        self.policy_path = policy_path
        self.tokenizer = tok = load_tokenizer(policy_path, "left", cfg.model.trust_remote_code)
        if tok.eos_token_id is None:
            raise UserInputError(f"model.policy: the tokenizer at {policy_path} has no EOS token")
        policy = load_policy(policy_path, cfg.model.trust_remote_code)
        enable_activation_checkpointing(policy, cfg.model.gradient_checkpointing)
        self.ref = None
        if cfg.model.lora:
            from peft import LoraConfig, get_peft_model

            lora = LoraConfig(r=cfg.model.lora_r, lora_alpha=cfg.model.lora_alpha, lora_dropout=cfg.model.lora_dropout,
                              target_modules="all-linear", task_type="CAUSAL_LM")
            policy = get_peft_model(policy, lora)  # the reference is the adapter-disabled base
        else:
            self.ref = load_policy(policy_path, cfg.model.trust_remote_code).eval().requires_grad_(False)
            self.ref.to(acc.device)  # frozen: not prepared, placed by hand
        self.reward = Reward(cfg.reward, tok, cfg.model.cache_dir, cfg.model.trust_remote_code, acc.device)
        if cfg.model.dtype == "bfloat16":
            for frozen in (self.ref, self.reward.model, policy if cfg.model.lora else None):
                if frozen is not None:
                    frozen_linears_to_bf16(frozen)

        self.value_head = None
        critic = None
        if cfg.model.value_head:
            self.value_head = nn.Linear(policy.config.hidden_size, 1)
            init_value_head(self.value_head)
        else:
            critic_from_reward = cfg.model.critic == "reward"
            if critic_from_reward:
                if self.reward.model is None or not self.reward.same_tokenizer:
                    raise UserInputError(
                        "model.critic=reward needs a reward model with the policy's tokenizer (values are read "
                        "per policy token); use model.critic=policy or a directory")
                critic_path = self.reward.path
            elif cfg.model.critic == "policy":
                critic_path = policy_path
            else:
                critic_path = resolve_model(cfg.model.critic, cfg.model.cache_dir, field="model.critic")
            critic = load_critic(critic_path, critic_from_reward, cfg.model.trust_remote_code)
            enable_activation_checkpointing(critic, cfg.model.gradient_checkpointing)
            if load_tokenizer(critic_path, "left").get_vocab() != tok.get_vocab():
                raise UserInputError(f"model.critic: {critic_path} has another tokenizer than the policy")

        for model in (policy, self.ref, critic, self.reward.model):
            if model is not None and cfg.model.dtype == "float32" and cfg.model.onednn_matmul:
                onednn.use_onednn(model, lean_mlp=not cfg.model.gradient_checkpointing)
            if model is not None and cfg.model.dtype == "bfloat16" and cfg.model.fp32_attention:
                fp32_attention(model)

        # Optimisers and schedules: actor and critic apart, each with its own learning rate.
        p = cfg.ppo
        critic_lr = p.critic_lr if p.critic_lr is not None else 2 * p.lr
        actor_params = [q for q in policy.parameters() if q.requires_grad]
        critic_module = self.value_head if self.value_head is not None else critic
        fused = {"fused": True} if p.fused_adamw else {}
        self.actor_opt = torch.optim.AdamW(actor_params, lr=p.lr, eps=p.adam_eps, weight_decay=p.weight_decay, **fused)
        self.critic_opt = torch.optim.AdamW(critic_module.parameters(), lr=critic_lr, eps=p.adam_eps,
                                            weight_decay=p.weight_decay, **fused)
        schedule = self._lr_lambda
        self.actor_sched = torch.optim.lr_scheduler.LambdaLR(self.actor_opt, schedule)
        self.critic_sched = torch.optim.lr_scheduler.LambdaLR(self.critic_opt, schedule)
        (self.policy, critic_module, self.actor_opt, self.critic_opt, self.actor_sched, self.critic_sched) = acc.prepare(
            policy, critic_module, self.actor_opt, self.critic_opt, self.actor_sched, self.critic_sched)
        if self.value_head is not None:
            self.value_head, self.critic = critic_module, None
        else:
            self.critic = critic_module
        self.policy.eval()  # dropout is off anyway; eval() keeps every module deterministic
        if self.critic is not None:
            self.critic.eval()

        self.kl_ctl = (algos.AdaptiveKLController(p.kl_coef, p.kl_target, p.kl_horizon) if p.kl_target
                       else algos.FixedKLController(p.kl_coef))
        # Prompts.
        self.prompts = load_prompts(cfg.data.prompts)
        self.prompt_ids = tokenize_prompts(self.prompts, tok, cfg.data.max_prompt_tokens, cfg.data.chat_template,
                                           cfg.data.system_prompt)
        self.stream = PromptStream(len(self.prompts), seed, self.rank, self.world)
        self.shuffle_rng = torch.Generator().manual_seed(seed + self.rank)
        self.judge = import_function(cfg.eval.judge, "eval.judge") if cfg.eval.judge else None
        self.eval_prompts = load_prompts(cfg.eval.prompts) if cfg.eval.prompts else self.prompts
        self.monitor = HealthMonitor(cfg.diagnostics, kl_target=p.kl_target, max_new_tokens=cfg.rollout.max_new_tokens)
        self.step = 0
        self._stop_requested = False
        acc.register_for_checkpointing(TrainerState(self))
        warn_off_policy(cfg.rollout)
        if p.algo == "a2c" and p.epochs != 1:
            log.warning("ppo.algo=a2c is one pass over each rollout batch: ppo.epochs=%d is ignored", p.epochs)

    # ----------------------------------------------------------------------------------
    # Construction helpers
    # ----------------------------------------------------------------------------------

    def _lr_lambda(self, step: int) -> float:
        p, total = self.cfg.ppo, self.cfg.train.steps
        warm = min(1.0, (step + 1) / p.warmup_steps) if p.warmup_steps else 1.0
        decay = max(0.0, 1.0 - step / total) if p.lr_schedule == "linear" else 1.0
        return warm * decay

    @classmethod
    def resume(cls, run_dir: Path, overrides: list[str] | None = None, accelerator: Accelerator | None = None):
        """Rebuild the trainer from `run_dir/config.yaml` (plus overrides, e.g. train.steps) and
        restore the latest complete checkpoint: weights, optimisers, schedules, KL controller,
        random states and the position in the prompt stream."""
        import yaml

        config_path = Path(run_dir) / "config.yaml"
        if not config_path.is_file():
            raise UserInputError(f"--resume {run_dir}: no config.yaml there; is it a run directory?")
        data = apply_overrides(yaml.safe_load(config_path.read_text()), list(overrides or []))
        data["train"]["out_dir"] = str(run_dir)
        trainer = cls(from_dict(Config, data), accelerator)
        checkpoint = latest_checkpoint(Path(run_dir))
        if checkpoint is None:
            raise UserInputError(f"--resume {run_dir}: no complete checkpoint under checkpoints/")
        trainer.accelerator.load_state(str(checkpoint))
        log.info("resumed from %s at step %d", checkpoint, trainer.step)
        return trainer

    # ----------------------------------------------------------------------------------
    # Rollout and scoring
    # ----------------------------------------------------------------------------------

    def _unwrapped_policy(self):
        return self.accelerator.unwrap_model(self.policy)

    def _rollout(self, indices: list[int]) -> Rollout:
        return self._generate([self.prompt_ids[i] for i in indices])

    def _generate(self, prompt_ids: list[list[int]]) -> Rollout:
        """Responses of the current policy to token-id prompts, left-padded on the device."""
        ids, mask = (t.to(self.accelerator.device) for t in left_pad(prompt_ids, self.tokenizer.pad_token_id))
        return generate(self._unwrapped_policy(), ids, mask, self.cfg.rollout, self.tokenizer.eos_token_id,
                        self.tokenizer.pad_token_id, self.cfg.model.dtype)

    def _decode(self, rollout: Rollout) -> list[str]:
        return self.tokenizer.batch_decode(rollout.response_ids * rollout.response_mask.long()
                                           + self.tokenizer.pad_token_id * (1 - rollout.response_mask.long()),
                                           skip_special_tokens=True)

    @torch.no_grad()
    def _ref_logprobs(self, rollout: Rollout) -> torch.Tensor:
        T, dtype = self.cfg.rollout.temperature, self.cfg.model.dtype
        if self.ref is not None:
            return policy_forward(self.ref, rollout, T, dtype)[0]
        with self._unwrapped_policy().disable_adapter():
            return policy_forward(self.policy, rollout, T, dtype)[0]

    @torch.no_grad()
    def _values(self, rollout: Rollout, hidden: torch.Tensor | None = None) -> torch.Tensor:
        if self.value_head is not None:
            return self.value_head(hidden.float()).squeeze(-1)
        return critic_forward(self.critic, rollout, self.cfg.model.dtype)

    def _raw_scores(self, prompts: list[str], responses: list[str], rollout: Rollout | None = None) -> torch.Tensor:
        dtype = torch.bfloat16 if self.cfg.model.dtype == "bfloat16" else None
        if rollout is None:
            return self.reward.raw(prompts, responses, dtype=dtype)
        return self.reward.raw(prompts, responses, rollout.sequence_ids, rollout.attention_mask, dtype)

    # ----------------------------------------------------------------------------------
    # One PPO step
    # ----------------------------------------------------------------------------------

    def _clock(self) -> float:
        """time.perf_counter() once the device has run its queued work (CUDA is asynchronous:
        without this a phase's time would land in whichever phase next waits on a result)."""
        if self.accelerator.device.type == "cuda":
            torch.cuda.synchronize(self.accelerator.device)
        return time.perf_counter()

    def step_once(self) -> dict:
        """One iteration; returns the metrics written to metrics.jsonl."""
        cfg, p, acc = self.cfg, self.cfg.ppo, self.accelerator
        t0 = self._clock()
        indices = self.stream.next_batch(cfg.rollout.batch_size)
        rollout = self._rollout(indices)
        t_rollout = self._clock() - t0

        # Scoring: everything computed under the rollout policy (pi_old).
        t1 = self._clock()
        prompts = [self.prompts[i].text for i in indices]
        responses = self._decode(rollout)
        mask = rollout.response_mask
        # With one minibatch covering the batch, the first update pass would run the policy
        # and critic on the same sequences with the same weights: run them once, with
        # gradients, and keep that pass for the update.
        kept = self._loss_forward(rollout) if self._reuses_rollout_forward() else None
        with torch.no_grad():
            if kept is not None:
                old_logprobs, old_values = kept[0].detach(), kept[2].detach() * mask
            else:
                old_logprobs, _, hidden = policy_forward(self.policy, rollout, cfg.rollout.temperature,
                                                         cfg.model.dtype, with_hidden=self.value_head is not None)
                old_values = self._values(rollout, hidden) * mask
            ref_logprobs = self._ref_logprobs(rollout)
            raw = self._raw_scores(prompts, responses, rollout)
            baseline = self._raw_scores(prompts, [""] * len(prompts)) if cfg.reward.baseline else None
            scores = self.reward.process(raw, rollout.has_eos, baseline)
            _check_finite(scores, "reward scores")
            _check_finite(old_logprobs, "policy log-probs")
            _check_finite(ref_logprobs, "reference log-probs")
            _check_finite(old_values, "critic values")
            kl_coef = self.kl_ctl.value
            rewards = algos.shape_rewards(scores, old_logprobs, ref_logprobs, mask,
                                          kl_coef if p.kl_in_reward else 0.0, p.kl_estimator)
            if p.whiten_rewards:
                rewards = self._whiten(rewards, mask, shift_mean=False)
            advantages, returns = algos.compute_gae(rewards, old_values, mask, p.gamma, p.lam)
            if p.whiten_advantages:
                advantages = self._whiten(advantages, mask)
        t_score = self._clock() - t1

        t2 = self._clock()
        update_stats, new_logprobs = self._update(rollout, old_logprobs, ref_logprobs, old_values, advantages, returns,
                                                  kept)
        t_update = self._clock() - t2

        # KL controller moves on the KL of the rollout (sequence sum of k1, mean over batch).
        seq_kl = ((old_logprobs - ref_logprobs) * mask).sum(-1)
        self.kl_ctl.update(self._mean(seq_kl).item(), cfg.rollout.batch_size * self.world)
        for sched in (self.actor_sched, self.critic_sched):
            sched.step()
        self.step += 1
        step_s = self._clock() - t0
        metrics = self._metrics(rollout, responses, raw, scores, rewards, seq_kl, kl_coef, old_logprobs, old_values,
                                returns, update_stats, t_rollout, t_score, t_update, step_s)
        self._log_samples(prompts, responses, rollout, scores, seq_kl, old_logprobs, ref_logprobs, new_logprobs,
                          advantages, old_values, returns, rewards)
        return metrics

    def _whiten(self, x: torch.Tensor, mask: torch.Tensor, shift_mean: bool = True) -> torch.Tensor:
        """Masked whitening over the global batch (all processes)."""
        if self.world == 1:
            return algos.masked_whiten(x, mask, shift_mean)
        xs, ms = self._gather_tokens(x), self._gather_tokens(mask)
        mean, var = algos.masked_mean(xs, ms), algos.masked_var(xs, ms)
        out = (x - mean) * torch.rsqrt(var + 1e-8)
        if not shift_mean:
            out = out + mean
        return out * mask

    def _mean(self, x: torch.Tensor) -> torch.Tensor:
        """Mean of a per-sequence tensor over all processes."""
        return self.accelerator.gather(x).float().mean()

    def _sum(self, x: torch.Tensor) -> torch.Tensor:
        """Sum of a tensor over all its elements and all processes."""
        return self.accelerator.reduce(x.sum(), "sum") if self.world > 1 else x.sum()

    def _gather_tokens(self, x: torch.Tensor) -> torch.Tensor:
        """A per-token (B, R) tensor of every process, padded to the widest R (with zeros)."""
        if self.world == 1:
            return x
        return self.accelerator.gather(self.accelerator.pad_across_processes(x, dim=1))

    def _reuses_rollout_forward(self) -> bool:
        """True when the first update pass is one forward over the whole rollout batch."""
        p, B = self.cfg.ppo, self.cfg.rollout.batch_size
        mb_size = B if p.algo == "a2c" else (p.minibatch_size or B)
        return p.reuse_rollout_forward and mb_size == B and (p.micro_batch_size or mb_size) >= B

    def _loss_forward(self, rollout: Rollout):
        """Log-probs, entropy and values with gradients: what the losses need."""
        cfg = self.cfg
        # transformers checkpoints only in training mode; dropout is already 0.
        trained = [m for m in (self.policy, self.critic) if m is not None] if cfg.model.gradient_checkpointing else []
        for model in trained:
            model.train()
        logprobs, entropy, hidden = policy_forward(
            self.policy, rollout, cfg.rollout.temperature, cfg.model.dtype, with_entropy=True,
            entropy_grad=cfg.ppo.entropy_coef > 0, with_hidden=self.value_head is not None)
        if self.value_head is not None:
            values = self.value_head(hidden.float()).squeeze(-1)
        else:
            values = critic_forward(self.critic, rollout, cfg.model.dtype)
        for model in trained:
            model.eval()
        return logprobs, entropy, values

    def _update(self, rollout, old_logprobs, ref_logprobs, old_values, advantages, returns, kept=None):
        """`kept`: (logprobs, entropy, values) with gradients from the scoring pass, used for
        the first minibatch instead of a new forward (see _reuses_rollout_forward)."""
        cfg, p, acc = self.cfg, self.cfg.ppo, self.accelerator
        B = rollout.response_ids.shape[0]
        mb_size = B if p.algo == "a2c" else (p.minibatch_size or B)
        micro = p.micro_batch_size or mb_size
        micro = min(micro, mb_size)
        epochs = 1 if p.algo == "a2c" else p.epochs
        stats: dict[str, list[float]] = {}
        new_logprobs = old_logprobs.clone()
        for _ in range(epochs):
            # The kept pass is in rollout order; it is one minibatch, so no shuffle is lost.
            order = torch.arange(B) if kept is not None else torch.randperm(B, generator=self.shuffle_rng)
            order = order.to(acc.device)
            for start in range(0, B, mb_size):
                mb = order[start:start + mb_size]
                chunks = [mb[i:i + micro] for i in range(0, len(mb), micro)]
                # The losses are token means over the minibatch of all processes: each chunk
                # weighs its share of those tokens (times the world size, as DDP averages the
                # gradients), so that sharding and micro-batching do not change the update.
                mb_tokens = self._sum(rollout.response_mask[mb])
                for i, idx in enumerate(chunks):
                    sub = rollout.select(idx)
                    m = sub.response_mask
                    weight = m.sum() * self.world / mb_tokens
                    # Accumulate micro-batch gradients locally; DDP syncs on the last one.
                    sync = ExitStack()
                    if i < len(chunks) - 1 and self.world > 1:
                        for module in (self.policy, self.critic if self.critic is not None else self.value_head):
                            sync.enter_context(acc.no_sync(module))
                    with sync:
                        if kept is not None:
                            (logprobs, entropy, values), kept = kept, None
                        else:
                            logprobs, entropy, values = self._loss_forward(sub)
                        if p.algo == "ppo":
                            pg_loss, pg_stats = algos.ppo_policy_loss(logprobs, old_logprobs[idx], advantages[idx], m,
                                                                      p.clip_eps, p.clip_eps_high)
                        else:
                            pg_loss = algos.a2c_policy_loss(logprobs, advantages[idx], m)
                            pg_stats = {}
                        entropy_mean = algos.masked_mean(entropy, m)
                        loss = pg_loss - p.entropy_coef * entropy_mean
                        if not p.kl_in_reward and self.kl_ctl.value > 0:
                            loss = loss + self.kl_ctl.value * algos.masked_mean(
                                algos.kl_penalty(logprobs, ref_logprobs[idx], p.kl_estimator), m)
                        v_loss, v_stats = algos.value_loss(values, old_values[idx], returns[idx], m, p.value_clip)
                        if self.value_head is not None:
                            loss = loss + p.vf_coef * v_loss
                        _check_finite(loss.detach(), "policy loss")
                        _check_finite(v_loss.detach(), "value loss")
                        acc.backward(loss * weight)
                        if self.value_head is None:
                            acc.backward(v_loss * weight)
                    new_logprobs[idx] = logprobs.detach()
                    _append(stats, {"policy/loss": pg_loss.item(), "policy/entropy": entropy_mean.item(),
                                    "value/loss": v_loss.item(), **{f"policy/{k}": v for k, v in pg_stats.items()},
                                    **{f"value/{k}": v for k, v in v_stats.items()}})
                self._optimizer_step()
        return {k: float(np.mean(v)) for k, v in stats.items()}, new_logprobs

    def _optimizer_step(self) -> None:
        p, acc = self.cfg.ppo, self.accelerator
        for opt, module, name in ((self.actor_opt, self.policy, "policy"),
                                  (self.critic_opt, self.value_head if self.value_head is not None else self.critic, "critic")):
            params = [q for q in module.parameters() if q.grad is not None]
            norm = acc.clip_grad_norm_(params, p.max_grad_norm) if p.max_grad_norm else torch.nn.utils.get_total_norm(
                [q.grad for q in params])
            if not torch.isfinite(torch.as_tensor(norm)):
                for o in (self.actor_opt, self.critic_opt):
                    o.zero_grad(set_to_none=True)
                raise NonFiniteError(f"non-finite {name} gradient norm; the optimiser step was refused")
        self.actor_opt.step()
        self.critic_opt.step()
        self.actor_opt.zero_grad(set_to_none=True)
        self.critic_opt.zero_grad(set_to_none=True)

    # ----------------------------------------------------------------------------------
    # Metrics, samples, checkpoints
    # ----------------------------------------------------------------------------------

    def _metrics(self, rollout, responses, raw, scores, rewards, seq_kl, kl_coef, old_logprobs, old_values, returns,
                 update_stats, t_rollout, t_score, t_update, step_s) -> dict:
        acc, mask = self.accelerator, rollout.response_mask
        all_scores = acc.gather(scores)
        lengths = mask.sum(-1)
        gap = (rollout.gen_logprobs - old_logprobs).abs() * mask if rollout.gen_logprobs is not None else None
        if self.world > 1:  # text statistics over every process's responses
            from accelerate.utils import gather_object

            responses = gather_object(responses)
        metrics = {
            "step": self.step,
            "reward/score_mean": all_scores.mean().item(),
            "reward/score_std": all_scores.std().item() if all_scores.numel() > 1 else 0.0,
            "reward/raw_mean": self._mean(raw).item(),
            "reward/total_mean": self._mean((rewards * mask).sum(-1)).item(),
            "kl/ref_mean": self._mean(seq_kl).item(),
            "kl/coef": kl_coef,
            **{k: acc.reduce(torch.tensor(v, device=acc.device), "mean").item() for k, v in update_stats.items()},
            "value/explained_variance": algos.explained_variance(*(self._gather_tokens(t) for t in (old_values, returns,
                                                                                                   mask))),
            "policy/logprob_gap": (self._sum(gap) / self._sum(mask)).item() if gap is not None else 0.0,
            "response/length_mean": self._mean(lengths).item(),
            "response/eos_frac": self._mean(rollout.has_eos.float()).item(),
            "response/distinct2": distinct_n(responses, 2),
            "response/repeat_frac": repeated_ngram_fraction(responses, 4),
            "lr": self.actor_sched.get_last_lr()[0],
            "time/step_s": step_s,
            "time/rollout_s": t_rollout,
            "time/score_s": t_score,
            "time/update_s": t_update,
            "throughput/tokens_per_s": acc.gather(lengths).sum().item() / step_s,
        }
        if self.cfg.ppo.kl_target:
            metrics["kl/target"] = self.cfg.ppo.kl_target
        if self.judge is not None and self.cfg.eval.every and self.step % self.cfg.eval.every == 0:
            prompts = [p.text for p in self.eval_prompts[: self.cfg.eval.num_prompts]]
            result = self.evaluate(prompts, seed=self.cfg.train.seed)
            metrics["eval/judge_mean"] = float(np.mean(call_text_function(self.judge, prompts, result["responses"], "eval.judge").numpy()))
            metrics["eval/score_mean"] = float(np.mean(result["scores"]))
        return metrics

    def _log_samples(self, prompts, responses, rollout, scores, seq_kl, old_logprobs, ref_logprobs, new_logprobs,
                     advantages, values, returns, rewards) -> None:
        cfg = self.cfg.train
        if not self.accelerator.is_main_process or not cfg.log_samples_every or self.step % cfg.log_samples_every:
            return
        n = min(cfg.num_samples, len(prompts))
        p = self.cfg.ppo
        ratio = torch.exp(new_logprobs - old_logprobs)
        clip = algos.ppo_clip_side(ratio, advantages, p.clip_eps, p.clip_eps_high)
        with open(self.out_dir / "samples.jsonl", "a") as f:
            for i in range(n):
                f.write(json.dumps({"step": self.step, "prompt": prompts[i], "response": responses[i],
                                    "score": scores[i].item(), "kl": seq_kl[i].item()}) + "\n")
        with open(self.out_dir / "tokens.jsonl", "a") as f:
            for i in range(min(2, n)):
                L = int(rollout.response_mask[i].sum().item())
                ids = rollout.response_ids[i, :L].tolist()
                row = {"step": self.step, "prompt": prompts[i], "response": responses[i], "score": scores[i].item(),
                       "tokens": self.tokenizer.convert_ids_to_tokens(ids)}
                for key, t in (("logprob", new_logprobs), ("old_logprob", old_logprobs), ("ref_logprob", ref_logprobs),
                               ("ratio", ratio), ("clip", clip), ("advantage", advantages), ("value", values),
                               ("return", returns), ("kl", old_logprobs - ref_logprobs), ("reward", rewards)):
                    row[key] = [round(float(v), 5) for v in t[i, :L].tolist()]
                row["clip"] = [int(v) for v in row["clip"]]
                f.write(json.dumps(row) + "\n")

    def _write(self, name: str, row: dict) -> None:
        if self.accelerator.is_main_process:
            with open(self.out_dir / name, "a") as f:
                f.write(json.dumps(row) + "\n")

    def save_checkpoint(self) -> Path:
        """Atomic: written into a temporary directory, renamed when complete."""
        acc = self.accelerator
        ckpt_root = self.out_dir / "checkpoints"
        target = ckpt_root / f"step-{self.step:06d}"
        tmp = ckpt_root / f".tmp-step-{self.step:06d}"
        if acc.is_main_process:
            ckpt_root.mkdir(parents=True, exist_ok=True)
            shutil.rmtree(tmp, ignore_errors=True)
        acc.wait_for_everyone()
        acc.save_state(str(tmp), safe_serialization=True)
        acc.wait_for_everyone()
        if acc.is_main_process:
            shutil.rmtree(target, ignore_errors=True)
            tmp.rename(target)
            for old in sorted(_checkpoints(ckpt_root))[: -self.cfg.train.keep_checkpoints or None]:
                shutil.rmtree(old[1], ignore_errors=True)
        acc.wait_for_everyone()
        return target

    def save_final(self) -> Path:
        """final/policy and final/critic, loadable by plain transformers."""
        final = self.out_dir / "final"
        if not self.accelerator.is_main_process:
            return final
        policy = self._unwrapped_policy()
        if self.cfg.model.lora:
            # Plain transformers has no adapter to load: save the merged weights, and the
            # adapter alone beside them.
            atomic_save_pretrained([policy], final / "adapter")
            import copy

            policy = copy.deepcopy(policy).merge_and_unload()
        atomic_save_pretrained([policy, self.tokenizer], final / "policy")
        if self.critic is not None:
            atomic_save_pretrained([self.accelerator.unwrap_model(self.critic), self.tokenizer], final / "critic")
        else:
            from safetensors.torch import save_file

            save_file(self.accelerator.unwrap_model(self.value_head).state_dict(), str(final / "value_head.safetensors"))
        return final

    # ----------------------------------------------------------------------------------
    # Loop and evaluation
    # ----------------------------------------------------------------------------------

    def train(self) -> None:
        """Run until train.steps; Ctrl-C finishes the current step, saves and exits cleanly."""
        from tqdm.auto import tqdm

        cfg = self.cfg.train
        previous = signal.getsignal(signal.SIGINT)

        def request_stop(signum, frame):
            if self._stop_requested:  # a second Ctrl-C stops at once
                raise KeyboardInterrupt
            self._stop_requested = True
            log.warning("stopping after this step (Ctrl-C again to abort without saving)")

        try:
            signal.signal(signal.SIGINT, request_stop)
        except ValueError:  # not the main thread
            previous = None
        bar = tqdm(total=cfg.steps, initial=self.step, desc="ppo", disable=not cfg.progress or not self.accelerator.is_main_process)
        try:
            while self.step < cfg.steps and not self._stop_requested:
                try:
                    metrics = self.step_once()
                except NonFiniteError as e:
                    alert = self.monitor.non_finite(self.step + 1, str(e))
                    self._write("alerts.jsonl", _asdict(alert))
                    log.error("%s", alert.message)
                    raise
                self._write("metrics.jsonl", metrics)
                for alert in self.monitor.observe(metrics):
                    self._write("alerts.jsonl", _asdict(alert))
                    bar.write(f"[{alert.severity}] step {alert.step} {alert.check}: {alert.message}")
                    if alert.severity == "error":
                        raise NonFiniteError(alert.message)
                bar.update(1)
                bar.set_postfix({"score": f"{metrics['reward/score_mean']:.3f}", "kl": f"{metrics['kl/ref_mean']:.3f}",
                                 "len": f"{metrics['response/length_mean']:.1f}"})
                if cfg.save_every and self.step % cfg.save_every == 0 and self.step < cfg.steps:
                    self.save_checkpoint()
            self.save_checkpoint()
            if self.step >= cfg.steps:
                self.save_final()
                if cfg.report and self.accelerator.is_main_process:
                    from rlhf.report import write_report

                    write_report(self.out_dir)
        finally:
            bar.close()
            if previous is not None:
                signal.signal(signal.SIGINT, previous)

    @torch.no_grad()
    def evaluate(self, prompts: list[str], seed: int = 0) -> dict:
        """Responses to `prompts` sampled with a fixed seed, their raw scores and sequence KL
        (sum of k1 over tokens) to the reference. The global random state is left untouched."""
        from rlhf.data import Prompt

        ids = tokenize_prompts([Prompt(text=t) for t in prompts], self.tokenizer, self.cfg.data.max_prompt_tokens,
                               self.cfg.data.chat_template, self.cfg.data.system_prompt)
        out = {"responses": [], "scores": [], "kl": []}
        bs = self.cfg.rollout.batch_size
        device = self.accelerator.device
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
            torch.manual_seed(seed)
            for i in range(0, len(prompts), bs):
                rollout = self._generate(ids[i:i + bs])
                responses = self._decode(rollout)
                logprobs = policy_forward(self.policy, rollout, self.cfg.rollout.temperature, self.cfg.model.dtype)[0]
                kl = ((logprobs - self._ref_logprobs(rollout)) * rollout.response_mask).sum(-1)
                out["responses"] += responses
                out["scores"] += self._raw_scores(prompts[i:i + bs], responses, rollout).tolist()
                out["kl"] += kl.tolist()
        return out


def _checkpoints(root: Path) -> list[tuple[int, Path]]:
    found = []
    for d in root.glob("step-*"):
        m = re.fullmatch(r"step-(\d+)", d.name)
        if m and d.is_dir():
            found.append((int(m.group(1)), d))
    return found


def latest_checkpoint(run_dir: Path) -> Path | None:
    """The newest complete checkpoint (temporary directories of interrupted saves are ignored)."""
    found = _checkpoints(run_dir / "checkpoints")
    return max(found)[1] if found else None


def _append(stats: dict, new: dict) -> None:
    for k, v in new.items():
        stats.setdefault(k, []).append(float(v))


def _asdict(alert) -> dict:
    import dataclasses

    return dataclasses.asdict(alert)
