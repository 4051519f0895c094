"""`rlhf bench`: time PPO steps phase by phase against this machine's floor.

The floor of a phase is the least time its arithmetic can take here: its matrix FLOPs over
the matmul rate, and for each decoding step the larger of its FLOPs over the matmul rate
and the bytes it must read (all weights, the KV cache) over the memory bandwidth. The
rates are measured when the command starts, with short torch micro-benchmarks, so the
ratios mean the same on another machine.

The work counted is that of the standard PPO step (the setup TRL's numbers describe):
generation; forwards of policy, reference, critic and reward model over the sampled
sequences; per epoch a forward and backward of policy and critic; the AdamW steps. A
trainer that reuses the rollout's forward in the first update pass does less than that:
`floor_min_s` is the floor without the update's first forward. `floor_torch_matmul_s`
counts fp32 matmuls at `torch.matmul`'s rate (MKL) instead of oneDNN's, which the trainer
uses on the CPU.
"""

from __future__ import annotations

import json
import math
import os
import resource
import statistics
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

# Short chat prompts: with SmolLM2's default system message each is 35-39 tokens, about
# the 37 of the TRL measurement this benchmark is compared with.
BENCH_PROMPTS = [
    "Tell me about your morning.", "Write a tweet about rain.", "Describe a quiet city street.",
    "What makes a good friend?", "Give me one tip for sleep.", "Say something kind to me.",
    "Why do cats purr so much?", "Describe the smell of coffee.", "Write a short birthday wish.",
    "What is your favourite season?", "Suggest a name for a dog.", "How do bees make honey?",
    "Write one line about the sea.", "What should I cook tonight?", "Describe a sunset in words.",
    "Tell me a fact about owls.",
]
BENCH_REWARD = "smollm2-135m-reward-bench"


# --------------------------------------------------------------------------------------
# The machine: matmul and memory rates
# --------------------------------------------------------------------------------------


@dataclass
class MachineRates:
    fp32_gflops: float
    """The best fp32 matmul rate of the kernels torch offers here (MKL's and oneDNN's)."""
    bf16_gflops: float
    memory_gbs: float
    fp32_mm_gflops: float
    """fp32 `torch.matmul` alone (MKL on the CPU)."""

    def matmul(self, dtype: str, torch_mm: bool = False) -> float:
        """FLOP/s of the matmuls of a forward in `dtype` (autocast bf16 or plain fp32)."""
        if dtype == "bfloat16":
            return 1e9 * self.bf16_gflops
        return 1e9 * (self.fp32_mm_gflops if torch_mm else self.fp32_gflops)


def _best_seconds(fn, reps: int, device: torch.device = torch.device("cpu")) -> float:
    def run():
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    run()  # warm-up: first-touch pages, kernel selection
    best = math.inf
    for _ in range(reps):
        t = time.perf_counter()
        run()
        best = min(best, time.perf_counter() - t)
    return best


def _matmul_gflops(dtype: torch.dtype, onednn_kernel: bool, device: torch.device) -> float:
    best = 0.0
    for n in ((1024, 2048, 3072) if device.type == "cpu" else (4096, 8192)):
        a, b = torch.randn(n, n, device=device).to(dtype), torch.randn(n, n, device=device).to(dtype)
        if onednn_kernel:
            fn = lambda: torch.ops.mkldnn._linear_pointwise(a, b, None, "none", [], "")  # noqa: E731
        else:
            fn = lambda: a @ b  # noqa: E731
        best = max(best, 2 * n**3 / _best_seconds(fn, 3, device))
    return best / 1e9


def measure_machine(device: torch.device | str = "cpu") -> MachineRates:
    """Peak rates from micro-benchmarks on `device` (best of a few repetitions, about 5 s in
    all): square matmuls by torch.matmul and, on the CPU, by oneDNN; a read and a copy of
    256 MiB."""
    from rlhf import onednn

    device = torch.device(device)
    onednn_here = onednn.available() and device.type == "cpu"
    fp32_mm = _matmul_gflops(torch.float32, False, device)
    fp32 = max(fp32_mm, _matmul_gflops(torch.float32, True, device) if onednn_here else 0.0)
    bf16 = max(_matmul_gflops(torch.bfloat16, False, device),
               _matmul_gflops(torch.bfloat16, True, device) if onednn_here else 0.0)
    # Memory: reading a buffer far larger than the caches (decoding streams the weights).
    x = torch.ones(64 * 2**20, device=device)  # 256 MiB
    read = x.numel() * 4 / _best_seconds(lambda: x.sum(), 5, device)
    y = torch.empty_like(x)
    copy = 2 * x.numel() * 4 / _best_seconds(lambda: y.copy_(x), 5, device)
    return MachineRates(fp32, bf16, max(read, copy) / 1e9, fp32_mm)


# --------------------------------------------------------------------------------------
# The models: FLOPs and bytes
# --------------------------------------------------------------------------------------


@dataclass
class ModelCost:
    """What one transformer costs per token: its trunk's matmul weights, its output head
    (vocabulary or scalar), its attention width and its KV cache width."""

    trunk_params: int
    """Weights of the linear layers of the trunk (embeddings are lookups, not matmuls)."""
    head_params: int
    """Weights of the output projection (vocabulary logits or a scalar head)."""
    layers: int
    attn_width: int
    """heads x head_dim: QK^T and AV each cost 2 x attn_width FLOPs per (query, key) pair."""
    kv_width: int
    """key/value heads x head_dim (the KV cache per token per layer is 2 x kv_width)."""
    adapter_params: int = 0
    """LoRA weights inside the trunk (trained; the trunk itself frozen)."""

    def forward_flops(self, lengths: list[int], head_tokens: int) -> float:
        """One forward over sequences of real `lengths`, the head on `head_tokens` of them;
        causal attention (each token attends to itself and those before it)."""
        tokens = sum(lengths)
        attention = sum(4 * self.layers * self.attn_width * s * (s + 1) / 2 for s in lengths)
        return 2 * (self.trunk_params + self.adapter_params) * tokens + 2 * self.head_params * head_tokens + attention


def model_cost(model: nn.Module) -> ModelCost:
    """Count from the modules themselves: every nn.Linear is a matmul; the one named like
    an output head (lm_head, score, classifier) is the head; LoRA's A and B are adapters."""
    trunk = head = adapter = 0
    for name, module in model.named_modules():
        if isinstance(module, nn.Linear):
            parts = set(name.split("."))
            if parts & {"lm_head", "score", "classifier"}:
                head += module.weight.numel()
            elif parts & {"lora_A", "lora_B"}:
                adapter += module.weight.numel()
            else:
                trunk += module.weight.numel()
    config = model.config
    heads = config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    return ModelCost(trunk, head, config.num_hidden_layers, heads * head_dim, kv_heads * head_dim, adapter)


@dataclass
class StepShape:
    """The real token counts of one step's rollout."""

    prompt_lengths: list[int]
    response_lengths: list[int]
    generated_width: int
    """Decoding positions actually run (max_new_tokens, or fewer with early stop)."""
    distinct_prompt_lengths: list[int] | None = None
    """The lengths of the batch's distinct prompts when several rows share one (groups of
    samples); None when every row has its own."""

    @property
    def batch(self) -> int:
        return len(self.prompt_lengths)

    @property
    def lengths(self) -> list[int]:
        return [p + r for p, r in zip(self.prompt_lengths, self.response_lengths)]

    @property
    def response_tokens(self) -> int:
        return sum(self.response_lengths)


def step_shape(rollout) -> StepShape:
    from rlhf.prefix import shared_prompts

    prompt_lengths = rollout.prompt_mask.sum(-1)
    shared = shared_prompts(rollout.prompt_ids, rollout.prompt_mask)
    return StepShape(prompt_lengths.tolist(), rollout.response_mask.sum(-1).long().tolist(),
                     rollout.response_ids.shape[1], prompt_lengths[shared.first].tolist() if shared else None)


@dataclass
class Floors:
    generation_s: float
    score_s: float
    update_s: float
    update_forward_s: float
    """The part of update_s that is the first epoch's forward (reusable from scoring)."""

    @property
    def step_s(self) -> float:
        return self.generation_s + self.score_s + self.update_s


def phase_floors(shape: StepShape, rates: MachineRates, dtype: str, policy: ModelCost, critic: ModelCost | None,
                 reward: ModelCost | None, epochs: int, trainable_params: int, torch_mm: bool = False,
                 shared_prefill: bool = False, shared_forwards: bool = False, shared_update: bool = False) -> Floors:
    """The floor of each phase of one PPO step.

    `critic` None: the values come from a head on the policy's trunk (no extra pass).
    `reward` None: a reward function (no model pass). The reference costs what the policy's
    frozen part costs. Backward is twice the forward for trained weights; for frozen weights
    (LoRA's base) only the input gradients are needed, once the forward. `torch_mm`: count
    fp32 matmuls at torch.matmul's rate instead of the best kernel's. `shared_prefill`,
    `shared_forwards`, `shared_update`: the generation prefill, the scoring forwards of policy
    and reference, and the update's forwards compute each distinct prompt once
    (`rlhf.prefix`): the floor counts that work. The update shares only when its micro-batch
    is the whole batch; smaller shuffled micro-batches split the groups, and the floor then
    counts the update's work row by row (an upper bound).
    """
    flops_per_s = rates.matmul(dtype, torch_mm)
    weight_bytes = 2 if dtype == "bfloat16" else 4
    B, lengths = shape.batch, shape.lengths

    # Generation: the prefill (head on the last prompt position only), then one decoding
    # step per further token, bounded by compute or by reading every weight and the cache.
    distinct = shape.distinct_prompt_lengths
    prefill = distinct if shared_prefill and distinct is not None else shape.prompt_lengths
    generation = policy.forward_flops(prefill, len(prefill)) / flops_per_s
    for t in range(1, shape.generated_width):
        ctx = [p + t for p in shape.prompt_lengths]
        flops = policy.forward_flops([1] * B, B) + sum(4 * policy.layers * policy.attn_width * c for c in ctx)
        bytes_read = (policy.trunk_params + policy.head_params + policy.adapter_params) * weight_bytes
        bytes_read += sum(ctx) * policy.layers * 2 * policy.kv_width * weight_bytes
        generation += max(flops / flops_per_s, bytes_read / (rates.memory_gbs * 1e9))

    # Scoring: old log-probs (policy), reference log-probs, values, reward.
    frozen = ModelCost(policy.trunk_params, policy.head_params, policy.layers, policy.attn_width, policy.kv_width)
    policy_fwd, ref_fwd = (m.forward_flops(lengths, shape.response_tokens) for m in (policy, frozen))

    def shared(flops: float, model: ModelCost) -> float:
        """A forward whose rows with the same prompt run it, but its last token, once."""
        if distinct is None:
            return flops
        return flops - (model.forward_flops([p - 1 for p in shape.prompt_lengths], 0)
                        - model.forward_flops([p - 1 for p in distinct], 0))

    score_policy, score_ref = ((shared(f, m) if shared_forwards else f) for f, m in ((policy_fwd, policy), (ref_fwd, frozen)))
    critic_fwd = critic.forward_flops(lengths, sum(lengths)) if critic is not None else 0.0
    reward_fwd = reward.forward_flops(lengths, sum(lengths)) if reward is not None else 0.0
    score = (score_policy + score_ref + critic_fwd + reward_fwd) / flops_per_s

    # Update, per epoch: forward, then backward (2x for trained weights, 1x for frozen).
    if shared_update:
        policy_fwd, ref_fwd = shared(policy_fwd, policy), shared(ref_fwd, frozen)
    if policy.adapter_params:
        adapters = policy_fwd - ref_fwd
        policy_bwd = ref_fwd + 2 * adapters
    else:
        policy_bwd = 2 * policy_fwd
    critic_bwd = 2 * critic_fwd
    # AdamW reads parameter, gradient, both moments, writes parameter and moments (fp32),
    # and the gradient clipping reads the gradient once more: 32 bytes a parameter.
    optimizer = 32 * trainable_params / (rates.memory_gbs * 1e9)
    update_forward = (policy_fwd + critic_fwd) / flops_per_s
    update = epochs * ((policy_fwd + critic_fwd + policy_bwd + critic_bwd) / flops_per_s + optimizer)
    return Floors(generation, score, update, update_forward)


# --------------------------------------------------------------------------------------
# The default setup: SmolLM2-135M-Instruct policy, critic and reward model of its size
# --------------------------------------------------------------------------------------


def bench_reward_model(cache_dir: str | None = None) -> Path:
    """A SmolLM2-sized reward model (the SmolLM2 trunk and a fresh scalar head), built once
    into the cache, so that reward scoring costs what a real reward model of that size costs."""
    from transformers import AutoModelForSequenceClassification

    from rlhf.models import SMOLLM2, atomic_save_pretrained, cache_root, init_scalar_head, load_tokenizer, resolve_model

    target = cache_root(cache_dir) / "models" / BENCH_REWARD
    if (target / "config.json").is_file():
        return target
    source = resolve_model(SMOLLM2, cache_dir)
    torch.manual_seed(0)
    model = AutoModelForSequenceClassification.from_pretrained(source, num_labels=1, dtype=torch.float32)
    init_scalar_head(model.score)
    tokenizer = load_tokenizer(source, "right")
    model.config.pad_token_id = tokenizer.pad_token_id
    atomic_save_pretrained([model, tokenizer], target)
    return target


def default_config_data(workdir: Path, cache_dir: str | None = None) -> dict:
    """The benchmark's default: the TRL comparison's work (fixed-length generation, fp32,
    full fine-tuning, a separate SmolLM2-sized critic and reward model, one PPO epoch)."""
    prompts = workdir / "prompts.txt"
    prompts.write_text("\n".join(BENCH_PROMPTS) + "\n")
    return {
        "model": {"policy": "smollm2-135m-instruct", "critic": "policy", "cache_dir": cache_dir},
        "reward": {"model": str(bench_reward_model(cache_dir))},
        "data": {"prompts": str(prompts)},
        "rollout": {"batch_size": 8, "max_new_tokens": 32, "early_stop": False},
        "ppo": {"epochs": 1},
    }


# --------------------------------------------------------------------------------------
# The command
# --------------------------------------------------------------------------------------


def peak_rss_bytes() -> int:
    """Peak resident memory of this process so far (Linux reports kibibytes)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _bench_config(config: str | None, overrides: list[str] | None, steps: int, workdir: Path):
    """The config to time: a file or the default, with no checkpoints, samples or evaluation."""
    from rlhf.config import Config, apply_overrides, from_dict, read_yaml

    data = default_config_data(workdir) if config is None else read_yaml(config)
    data = apply_overrides(data, list(overrides or []))
    data.setdefault("train", {}).update({"steps": steps, "out_dir": str(workdir / "run"), "save_every": 0,
                                         "report": False, "progress": False, "log_samples_every": 0})
    data.setdefault("eval", {})["every"] = 0
    return from_dict(Config, data)


def _timed_step(trainer, recorder) -> dict:
    t, before = time.perf_counter(), resource.getrusage(resource.RUSAGE_SELF)
    metrics = trainer.step_once()
    after = resource.getrusage(resource.RUSAGE_SELF)
    return {"step_s": time.perf_counter() - t, "generation_s": metrics["time/rollout_s"],
            "score_s": metrics["time/score_s"], "update_s": metrics["time/update_s"],
            "tokens": step_shape(recorder.rollouts[-1]).response_tokens,
            # The kernel's share of a step (mostly page faults on first touch).
            "system_s": after.ru_stime - before.ru_stime, "minor_faults": after.ru_minflt - before.ru_minflt}


def _costs(trainer) -> tuple:
    """(policy, critic or None, reward model or None) costs of the trainer's models."""
    models = trainer.models
    critic = model_cost(trainer.engine.unwrap(models.critic)) if models.critic is not None else None
    reward = model_cost(trainer.reward.model) if trainer.reward.model is not None else None
    return model_cost(models.unwrapped_policy()), critic, reward


def _trainable(trainer) -> int:
    return sum(p.numel() for m in trainer.models.trained.values() for p in m.parameters() if p.requires_grad)


def _result(cfg, config, overrides, rows, shapes, floors, mm_floors, rates, device, trainer_has_critic,
            shared: dict) -> dict:
    """Medians over the steps after the first, against the machine's floors."""
    kept, kept_floors, kept_shapes = rows[1:], floors[1:], shapes[1:]
    median = lambda key: statistics.median(r[key] for r in kept)  # noqa: E731
    fmed = lambda attr: statistics.median(getattr(f, attr) for f in kept_floors)  # noqa: E731
    phases = {}
    for name, attr in (("generation", "generation_s"), ("score", "score_s"), ("update", "update_s")):
        measured, floor = median(f"{name}_s"), fmed(attr)
        phases[name] = {"median_s": measured, "floor_s": floor, "ratio": measured / floor}
    step_s, floor_s = median("step_s"), fmed("step_s")
    floor_min_s = floor_s - fmed("update_forward_s")
    floor_mm_s = statistics.median(f.step_s for f in mm_floors[1:])
    result = {
        "setup": {
            "config": config or "default (SmolLM2-135M-Instruct, TRL comparison)",
            "overrides": list(overrides or []),
            "algo": cfg.ppo.algo,
            "advantage": cfg.ppo.advantage,
            "critic": trainer_has_critic,
            "batch_size": cfg.rollout.batch_size,
            "samples_per_prompt": cfg.rollout.samples_per_prompt,
            "prompt_tokens_mean": statistics.mean(t for s in kept_shapes for t in s.prompt_lengths),
            "response_tokens_mean": statistics.mean(t for s in kept_shapes for t in s.response_lengths),
            "max_new_tokens": cfg.rollout.max_new_tokens,
            "early_stop": cfg.rollout.early_stop,
            **shared,
            "dtype": cfg.model.dtype,
            "lora": cfg.model.lora,
            "value_head": cfg.model.value_head,
            "gradient_checkpointing": cfg.model.gradient_checkpointing,
            "epochs": cfg.ppo.epochs,
            "threads": torch.get_num_threads(),
            "keep_freed_memory": cfg.train.keep_freed_memory,
            "thp_mem_alloc": os.environ.get("THP_MEM_ALLOC_ENABLE", "0") not in ("", "0"),
        },
        "machine": {"fp32_gflops": rates.fp32_gflops, "bf16_gflops": rates.bf16_gflops,
                    "memory_gbs": rates.memory_gbs, "fp32_torch_matmul_gflops": rates.fp32_mm_gflops},
        "steps_timed": len(kept),
        "median_step_s": step_s,
        "phases": phases,
        "tokens_per_s": statistics.median(r["tokens"] / r["step_s"] for r in kept),
        "peak_rss_gb": peak_rss_bytes() / 1e9,
        "peak_rss_gib": peak_rss_bytes() / 2**30,
        "device": str(device),
        "peak_device_memory_gb": (torch.cuda.max_memory_allocated(device) / 1e9
                                  if device.type == "cuda" else None),
        "floor_s": floor_s,
        "floor_ratio": step_s / floor_s,
        "floor_min_s": floor_min_s,
        "floor_min_ratio": step_s / floor_min_s,
        "floor_torch_matmul_s": floor_mm_s,
        "floor_torch_matmul_ratio": step_s / floor_mm_s,
        "step_times_s": [r["step_s"] for r in rows],
        "median_step_system_s": median("system_s"),
        "median_step_minor_faults": median("minor_faults"),
    }
    return result


def run_bench(config: str | None = None, overrides: list[str] | None = None, steps: int = 4,
              as_json: bool = False) -> dict:
    """Run `steps` PPO steps, drop the first (warm-up), report medians; print them as text or
    as one JSON object, and return that object."""
    from rlhf.errors import UserInputError
    from rlhf.engine import AccelerateEngine
    from rlhf.generation import RecordingGenerator
    from rlhf.ppo import PPOTrainer

    if steps < 2:
        raise UserInputError(f"--steps: expected at least 2 (the first step is excluded), got {steps}")
    with tempfile.TemporaryDirectory(prefix="rlhf-bench-") as tmp:
        cfg = _bench_config(config, overrides, steps, Path(tmp))
        if cfg.train.threads:
            torch.set_num_threads(cfg.train.threads)
        engine = AccelerateEngine()
        rates = measure_machine(engine.device)  # with the threads the steps will have
        trainer = PPOTrainer(cfg, engine=engine)
        trainer.generator = recorder = RecordingGenerator(trainer.generator)
        rows = [_timed_step(trainer, recorder) for _ in range(steps)]
        shapes = [step_shape(r) for r in recorder.rollouts]
        from rlhf.prefix import shares_prefill
        from rlhf.updater import Updater

        sequences = cfg.rollout.batch_size * cfg.rollout.samples_per_prompt
        whole_batch = Updater.batch_shape(cfg.ppo, sequences)[2] == sequences
        shared = {"shared_prefill": cfg.rollout.engine == "hf" and shares_prefill(cfg.rollout,
                                                                                 trainer.models.unwrapped_policy()),
                  "shared_forwards": trainer.models.share_prefix,
                  "shared_update": trainer.models.share_prefix and whole_batch}
        floors, mm_floors = ([phase_floors(s, rates, cfg.model.dtype, *_costs(trainer), cfg.ppo.epochs,
                                           _trainable(trainer), torch_mm=mm, **shared) for s in shapes]
                             for mm in (False, True))

    result = _result(cfg, config, overrides, rows, shapes, floors, mm_floors, rates, engine.device,
                     trainer.models.has_critic, shared)
    print(json.dumps(result, indent=2) if as_json else format_result(result))
    return result


def format_result(r: dict) -> str:
    s, m = r["setup"], r["machine"]
    lines = [
        f"machine: fp32 matmul {m['fp32_gflops']:.0f} GFLOP/s (torch.matmul {m['fp32_torch_matmul_gflops']:.0f}), "
        f"bf16 {m['bf16_gflops']:.0f} GFLOP/s, memory {m['memory_gbs']:.0f} GB/s, {s['threads']} threads",
        f"setup: {s['config']} {' '.join(s['overrides'])}".rstrip(),
        f"  ppo.algo={s['algo']} (advantage {s['advantage']}, critic: {'yes' if s['critic'] else 'none'}), "
        f"batch {s['batch_size']} prompts x {s['samples_per_prompt']} samples, prompt {s['prompt_tokens_mean']:.1f} "
        f"tokens, response "
        f"{s['response_tokens_mean']:.1f} tokens (max {s['max_new_tokens']}, early_stop={s['early_stop']}), "
        f"dtype {s['dtype']}, lora={s['lora']}, value_head={s['value_head']}, epochs {s['epochs']}, "
        f"prompts shared in groups: prefill {s['shared_prefill']}, scoring {s['shared_forwards']}, "
        f"update {s['shared_update']}",
        f"median of {r['steps_timed']} steps (first excluded):",
        f"  {'phase':<12}{'median s':>10}{'floor s':>10}{'ratio':>8}",
    ]
    for name, p in r["phases"].items():
        lines.append(f"  {name:<12}{p['median_s']:>10.3f}{p['floor_s']:>10.3f}{p['ratio']:>8.2f}")
    lines.append(f"  {'step':<12}{r['median_step_s']:>10.3f}{r['floor_s']:>10.3f}{r['floor_ratio']:>8.2f}")
    lines += [
        f"  floor without the update's first forward (reused from scoring): {r['floor_min_s']:.3f} s, "
        f"ratio {r['floor_min_ratio']:.2f}",
        f"  floor at torch.matmul's fp32 rate (the issue's definition): {r['floor_torch_matmul_s']:.3f} s, "
        f"ratio {r['floor_torch_matmul_ratio']:.2f}",
        f"generated tokens/s: {r['tokens_per_s']:.1f}",
        f"peak resident memory: {r['peak_rss_gb']:.2f} GB ({r['peak_rss_gib']:.2f} GiB)",
        f"kernel time per step: {r['median_step_system_s']:.2f} s of system CPU time, "
        f"{r['median_step_minor_faults']:.0f} minor page faults",
    ]
    if r.get("peak_device_memory_gb") is not None:
        lines.append(f"peak {r['device']} memory allocated: {r['peak_device_memory_gb']:.2f} GB")
    return "\n".join(lines)
