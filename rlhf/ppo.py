"""The PPO / A2C trainer: a thin loop over typed stages.

One step, top to bottom in `step_once`:

1. sample: this process's prompts from the stream, `rollout.samples_per_prompt` each, through
   the generator seam -> a `Rollout` (`RolloutSampler`; with DAPO's dynamic sampling it
   scores the groups and replaces those without signal);
2. make experience: reward, old and reference log-probs, values, per-token rewards and
   advantages -> an `Experience` (`ExperienceMaker`, the maths in `rlhf.algos`);
3. update: epochs x minibatches x micro-batches of the policy loss named by `ppo.policy_loss`
   and the critic's loss (`Updater`, on the training-engine seam);
4. the KL controller and the schedules move, the generator gets the new weights;
5. metrics, samples; `train()` adds health checks, checkpoints and the final save.
"""

from __future__ import annotations

import logging
import random
from pathlib import Path

import numpy as np
import torch

from rlhf import algos
from rlhf.actor_critic import ActorCritic, load_critic_or_head, load_policy_and_reference
from rlhf.backend import make_backend
from rlhf.checkpoint import TrainerState, latest_checkpoint, restore_run, resume_config, save_checkpoint, save_final
from rlhf.config import Config, ConfigError, save_config, to_dict
from rlhf.data import Prompt, PromptStream, load_prompts, tokenize_prompts
from rlhf.diagnostics import HealthMonitor
from rlhf.engine import check_data_parallel, make_accelerator, make_engine
from rlhf.errors import NonFiniteError, UserInputError
from rlhf.experience_maker import ExperienceMaker
from rlhf.generation import Generator, decode_responses, make_generator
from rlhf.models import load_tokenizer, position_limit, resolve_model
from rlhf.precision import Precision
from rlhf.rewards import Reward, call_text_function, import_function
from rlhf.prefix import shares_prefix
from rlhf.rollout import warn_off_policy
from rlhf.rundir import append_row, own_run_dir
from rlhf.runloop import log_stopped, running, stop_agreed
from rlhf.sampling import RolloutSampler
from rlhf.step_metrics import step_metrics, write_samples
from rlhf.tracking import Trackers
from rlhf.updater import Updater

__all__ = ["PPOTrainer", "NonFiniteError", "latest_checkpoint", "make_accelerator", "check_data_parallel"]

log = logging.getLogger(__name__)


class PPOTrainer:
    """Build from a `Config`, then `train()`, or `step_once()` for one step's metrics.

    The stages are attributes: `sampler` (`RolloutSampler`), `generator` (a `Generator`),
    `models` (`ActorCritic`), `experience` (`ExperienceMaker`), `updater` (`Updater`) and
    `engine` (the training engine). Replace `generator` to sample another way.
    """

    def __init__(self, cfg: Config, accelerator=None, *, engine=None, generator: Generator | None = None,
                 overwrite: bool = False, _resuming: bool = False):
        """A new run refuses a `train.out_dir` that holds another run unless `overwrite`
        (which removes that run's files); `resume` builds the trainer with `_resuming`."""
        self.cfg = cfg
        cfg.validate(complete=True)  # also configs built or completed in code
        self.engine = engine or make_engine(cfg.train, accelerator)
        self.accelerator = getattr(self.engine, "accelerator", None)
        self.backend = make_backend(self.engine.device, Precision(cfg.model.dtype), cfg.model, cfg.rollout)
        self.backend.setup_process(cfg.train)
        seed_everything(cfg.train.seed + self.engine.rank)  # own samples per process, shared prompt order
        self.out_dir = Path(cfg.train.out_dir)
        self.tokenizer, self.reward, self.models, self.updater = self._build_models()
        self.generator = generator or make_generator(self.models.unwrapped_policy(), cfg, self.tokenizer,
                                                     self.backend, self.engine)
        self.experience = ExperienceMaker(self.models, self.reward, self.engine, self.backend, cfg.ppo, cfg.reward)
        p = cfg.ppo
        self.kl_ctl = (algos.AdaptiveKLController(p.kl_coef, p.kl_target, p.kl_horizon) if p.kl_target
                       else algos.FixedKLController(p.kl_coef))
        self.prompts = load_prompts(cfg.data.prompts, cfg.data.prompt_column)
        self.reward.check_prompts(self.prompts)
        self.prompt_ids = self._tokenize(self.prompts)
        check_sequence_length(self.models.unwrapped_policy(), self.prompt_ids, cfg.rollout.max_new_tokens)
        self.stream = PromptStream(len(self.prompts), cfg.train.seed, self.engine.rank, self.engine.world)
        self.sampler = RolloutSampler(self.stream, self.prompts, self.prompt_ids, cfg.rollout, self.tokenizer,
                                      self.engine, self.experience.score)
        self.judge = import_function(cfg.eval.judge, "eval.judge") if cfg.eval.judge else None
        self.eval_prompts = (load_prompts(cfg.eval.prompts, cfg.data.prompt_column) if cfg.eval.prompts
                             else self.prompts)
        if self.judge is not None and cfg.eval.every and self.eval_prompts is not self.prompts:
            self.reward.check_prompts(self.eval_prompts[:cfg.eval.num_prompts])  # the evaluation scores these too
        self.monitor = HealthMonitor(cfg.diagnostics, kl_target=p.kl_target, max_new_tokens=cfg.rollout.max_new_tokens,
                                     critic_free=not algos.advantage_estimator(p.advantage).needs_critic)
        self.step = 0
        self.stop_signal: str | None = None  # the name of the signal that stopped train() early
        self.state = TrainerState(self)
        warn_off_policy(cfg.rollout)
        if p.policy_loss == "a2c" and p.epochs != 1:
            log.warning("ppo.policy_loss=a2c is one pass over each rollout batch: ppo.epochs=%d is ignored", p.epochs)
        if p.policy_loss == "gspo" and p.clip_eps >= 0.01:
            log.warning("ppo.policy_loss=gspo clips each sequence's ratio, which stays far closer to 1 than a token's: "
                        "ppo.clip_eps=%g clips almost nothing (its paper uses 3e-4 and ppo.clip_eps_high=4e-4)",
                        p.clip_eps)
        # Last: a trainer that failed to build holds no lock and leaves no run behind.
        self.run_lock = own_run_dir(self.engine, self.out_dir, None if _resuming else overwrite,
                                    lambda: save_config(cfg, self.out_dir / "config.yaml"))

    def _build_models(self):
        """Tokenizer, reward, actor-critic and updater, in the order that keeps the random
        state of a run the same (value heads and LoRA adapters draw initial weights)."""
        cfg, backend = self.cfg, self.backend
        policy_path = resolve_model(cfg.model.policy, cfg.model.cache_dir, field="model.policy")
        tokenizer = load_tokenizer(policy_path, "left", cfg.model.trust_remote_code)
        if tokenizer.eos_token_id is None:
            raise UserInputError(f"model.policy: the tokenizer at {policy_path} has no EOS token")
        policy, ref = load_policy_and_reference(cfg, policy_path, backend)
        reward = Reward(cfg.reward, tokenizer, cfg.model.cache_dir, cfg.model.trust_remote_code, backend.device,
                        max_new_tokens=cfg.rollout.max_new_tokens)
        for frozen in (reward.model, policy if cfg.model.lora else None):  # a LoRA policy's base is frozen
            if frozen is not None:
                backend.prepare_frozen(frozen)
        critic, value_head = load_critic_or_head(cfg, policy, policy_path, tokenizer, reward)
        for model in (policy, ref, critic, reward.model):
            if model is not None:
                backend.prepare_model(model, checkpointed=bool(cfg.model.gradient_checkpointing))
        ref = self.engine.prepare_frozen(ref) if ref is not None else None
        sequences = cfg.rollout.batch_size * cfg.rollout.samples_per_prompt
        _, _, micro = Updater.batch_shape(cfg.ppo, sequences)
        models = ActorCritic(policy, critic, value_head, ref, self.engine, backend, cfg.rollout.temperature,
                             checkpointing=bool(cfg.model.gradient_checkpointing), entropy_grad=cfg.ppo.entropy_coef > 0,
                             keep_rollout_forward=cfg.ppo.reuse_rollout_forward and micro == sequences,
                             share_prefix=shares_prefix(cfg, self.engine.unwrap(policy),
                                                        getattr(self.engine, "shards_parameters", False)))
        self.shuffle_rng = torch.Generator().manual_seed(cfg.train.seed + self.engine.rank)
        updater = Updater(models, self.engine, cfg.ppo, cfg.train.steps, cfg.rollout.max_new_tokens, self.shuffle_rng)
        updater.prepare()
        for model in (models.policy, models.critic):
            if model is not None:
                model.eval()  # dropout is off anyway; eval() keeps every module deterministic
        return tokenizer, reward, models, updater

    def _tokenize(self, prompts: list[Prompt]) -> list[list[int]]:
        d = self.cfg.data
        return tokenize_prompts(prompts, self.tokenizer, d.max_prompt_tokens, d.chat_template, d.system_prompt)

    @classmethod
    def resume(cls, run_dir: Path, overrides: list[str] | None = None, accelerator=None) -> "PPOTrainer":
        """Rebuild the trainer from `run_dir/config.yaml` and restore the newest checkpoint that
        verifies: weights, optimisers, schedules, KL controller, random states and the position
        in the prompt stream. Overrides may change what takes effect on resume (train.steps,
        logging, evaluation, diagnostics); others are refused by name. config.yaml is
        rewritten, and the logs cut back to the checkpoint's step, only once it has loaded."""
        run_dir = Path(run_dir)
        cfg = resume_config(run_dir, list(overrides or []))
        trainer = cls(cfg, accelerator, _resuming=True)
        restore_run(trainer, run_dir)
        return trainer

    # One step ---------------------------------------------------------------------

    def step_once(self) -> dict:
        """One iteration; returns the metrics written to metrics.jsonl."""
        cfg, engine, times = self.cfg, self.engine, {}
        start = engine.clock()
        batch = self.sampler.sample(self.generator)  # samples of one prompt sit next to each other
        times["rollout"] = engine.clock() - start

        t = engine.clock()
        prompts, metadata = batch.prompts(self.prompts)
        experience = self.experience.make(batch.rollout, prompts, batch.responses, kl_coef=self.kl_ctl.value,
                                          groups=batch.groups(cfg.rollout.samples_per_prompt), metadata=metadata,
                                          scored=batch.scored)
        times["score"] = engine.clock() - t

        t = engine.clock()
        result = self.updater.update(experience)
        times["update"] = engine.clock() - t

        # The KL controller moves on the rollout's KL (sequence sum of k1, mean over the batch).
        self.kl_ctl.update(engine.mean(experience.sequence_kl).item(), experience.size * engine.world)
        self.updater.schedule_step()
        self.generator.update_weights(self.models.unwrapped_policy())
        self.step += 1
        times["step"] = engine.clock() - start

        metrics = step_metrics(experience, result, engine, self.step, self.updater.lr, times)
        metrics.update(batch.stats)
        metrics.update(self._eval_metrics())
        if engine.is_main and cfg.train.log_samples_every and self.step % cfg.train.log_samples_every == 0:
            write_samples(self.out_dir, self.step, experience, result, self.tokenizer, cfg.train.num_samples,
                          cfg.ppo.clip_eps, cfg.ppo.clip_eps_high, sequence_ratio=cfg.ppo.policy_loss == "gspo")
        return metrics

    def _eval_metrics(self) -> dict:
        e = self.cfg.eval
        out = {"kl/target": self.cfg.ppo.kl_target} if self.cfg.ppo.kl_target else {}
        if self.judge is None or not e.every or self.step % e.every:
            return out
        prompts = self.eval_prompts[: e.num_prompts]
        result = self.evaluate(prompts, seed=self.cfg.train.seed)
        judged = call_text_function(self.judge, [p.text for p in prompts], result["responses"], "eval.judge",
                                    [p.metadata for p in prompts])
        return {**out, "eval/judge_mean": float(np.mean(judged.numpy())), "eval/score_mean": float(np.mean(result["scores"]))}

    @torch.no_grad()
    def evaluate(self, prompts: list[str] | list[Prompt], seed: int = 0) -> dict:
        """Responses to `prompts` (texts, or `Prompt`s with chat messages, rendered as in
        training) sampled with a fixed seed, their raw scores and sequence KL (sum of k1 over
        tokens) to the reference. The global random state is left untouched."""
        prompts = [p if isinstance(p, Prompt) else Prompt(text=p) for p in prompts]
        ids, texts = self._tokenize(prompts), [p.text for p in prompts]
        out = {"responses": [], "scores": [], "kl": []}
        bs, device = self.cfg.rollout.batch_size, self.engine.device
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
            torch.manual_seed(seed)
            for i in range(0, len(prompts), bs):
                rollout = self.generator.generate(ids[i:i + bs])
                responses = decode_responses(self.tokenizer, rollout)
                kl = ((self.models.logprobs(rollout) - self.models.ref_logprobs(rollout)) * rollout.response_mask).sum(-1)
                out["responses"] += responses
                out["scores"] += self.experience.raw_scores(texts[i:i + bs], responses, rollout,
                                                            [p.metadata for p in prompts[i:i + bs]]).tolist()
                out["kl"] += kl.tolist()
        return out

    # The loop ---------------------------------------------------------------------

    def train(self) -> None:
        """Run until train.steps. SIGINT (Ctrl-C), SIGTERM or SIGUSR1 finishes the current step,
        saves a checkpoint and returns with `stop_signal` set; a second signal aborts."""
        from tqdm.auto import tqdm

        cfg = self.cfg.train
        trackers = None
        bar = tqdm(total=cfg.steps, initial=self.step, desc="ppo", disable=not cfg.progress or not self.engine.is_main)
        try:
            with running(self):
                if cfg.report_to and self.engine.is_main:
                    trackers = Trackers(cfg.report_to, self.out_dir, to_dict(self.cfg), self.step)
                while self.step < cfg.steps and not stop_agreed(self):
                    log_step(self, self._checked_step(), bar, trackers)
                    if cfg.save_every and self.step % cfg.save_every == 0 and self.step < cfg.steps:
                        self.save_checkpoint()
                self.save_checkpoint()
                if self.stop_signal is not None:
                    log_stopped(self, "ppo")
                elif self.step >= cfg.steps:
                    self.save_final()
                    if cfg.report and self.engine.is_main:
                        from rlhf.report import write_report

                        write_report(self.out_dir)
        finally:
            bar.close()
            if trackers is not None:
                trackers.finish()

    def _checked_step(self) -> dict:
        try:
            return self.step_once()
        except NonFiniteError as e:
            alert = self.monitor.non_finite(self.step + 1, str(e))
            self._write("alerts.jsonl", alert.as_dict())
            log.error("%s", alert.message)
            raise

    def _write(self, name: str, row: dict) -> None:
        if self.engine.is_main:
            append_row(self.out_dir / name, row)

    def save_checkpoint(self) -> Path:
        """Atomic: written into a temporary directory, renamed when complete."""
        return save_checkpoint(self.engine, self.out_dir, self.step, self.cfg.train.keep_checkpoints,
                               self.state.state_dict())

    def save_final(self) -> Path:
        """final/policy and final/critic (or final/value_head.safetensors), loadable by plain
        transformers; a LoRA policy is saved merged, with final/adapter beside it."""
        return save_final(self.engine, self.out_dir, self.models, self.tokenizer, self.cfg.model.lora)

    # Read-only views kept for callers of the trainer ------------------------------

    @property
    def policy(self):
        return self.models.policy

    @property
    def critic(self):
        return self.models.critic

    @property
    def value_head(self):
        return self.models.value_head

    @property
    def ref(self):
        return self.models.ref


def log_step(trainer: PPOTrainer, metrics: dict, bar, trackers: Trackers | None) -> None:
    """metrics.jsonl, the trackers, the health checks (alerts.jsonl; an error stops the
    run) and the progress bar."""
    trainer._write("metrics.jsonl", metrics)
    if trackers is not None:
        trackers.log(metrics)
    for alert in trainer.monitor.observe(metrics):
        trainer._write("alerts.jsonl", alert.as_dict())
        bar.write(f"[{alert.severity}] step {alert.step} {alert.check}: {alert.message}")
        if alert.severity == "error":
            raise NonFiniteError(alert.message)
    bar.update(1)
    bar.set_postfix({"score": f"{metrics['reward/score_mean']:.3f}", "kl": f"{metrics['kl/ref_mean']:.3f}",
                     "len": f"{metrics['response/length_mean']:.1f}"})


def check_sequence_length(policy, prompt_ids: list[list[int]], max_new_tokens: int) -> None:
    """The longest prompt plus max_new_tokens must fit the policy's positions: refused for
    learned position tables (an IndexError deep in the model otherwise), a warning else."""
    limit, learned = position_limit(policy)
    longest = max(map(len, prompt_ids))
    if limit is None or longest + max_new_tokens <= limit:
        return
    message = (f"rollout.max_new_tokens: the longest prompt ({longest} tokens) plus {max_new_tokens} new tokens "
               f"exceeds the policy's {limit} positions")
    if learned:
        raise ConfigError(f"{message}; lower data.max_prompt_tokens or rollout.max_new_tokens")
    log.warning("%s: it was not trained on the positions beyond", message)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
