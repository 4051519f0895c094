"""Where one fp32 rollout's time goes: torch.profiler's top operators, plus transformers'
mask creation and rotary embedding timed by wrappers. SmolLM2-135M-Instruct (converted into
the cache on first use), 8 prompts of 37 random tokens, 32 new tokens,
fixed length, the trainer's decoding settings (oneDNN matmuls, prepacked decoding weights,
heap kept mapped), two threads.

    .venv/bin/python benchmarks/profile_generation.py [ROWS]
"""

import sys
import time

import torch
import transformers.models.llama.modeling_llama as llama
from torch.profiler import ProfilerActivity, profile

from rlhf import onednn
from rlhf.config import RolloutConfig
from rlhf.memory import keep_freed_memory
from rlhf.models import load_policy, resolve_model
from rlhf.rollout import generate

torch.set_num_threads(2)
keep_freed_memory()
model = load_policy(resolve_model("smollm2-135m-instruct")).eval().requires_grad_(False)
onednn.use_onednn(model)
wrapped = {"mask creation": 0.0, "rotary": 0.0}


def timed(name, fn):
    def call(*args, **kwargs):
        t = time.perf_counter()
        out = fn(*args, **kwargs)
        wrapped[name] += time.perf_counter() - t
        return out
    return call


llama.create_causal_mask = timed("mask creation", llama.create_causal_mask)
model.model.rotary_emb.forward = timed("rotary", model.model.rotary_emb.forward)
cfg = RolloutConfig(max_new_tokens=32, early_stop=False, temperature=1.0)
ids = torch.randint(100, 40000, (8, 37), generator=torch.Generator().manual_seed(0))
mask = torch.ones_like(ids)


def rollout() -> float:
    for name in wrapped:
        wrapped[name] = 0.0
    t = time.perf_counter()
    generate(model, ids, mask, cfg, eos_id=2, pad_id=0)
    return time.perf_counter() - t


for _ in range(2):
    rollout()
times = [rollout() for _ in range(3)]
print(f"rollout: {', '.join(f'{t:.3f}' for t in times)} s;",
      ", ".join(f"{name} {seconds * 1e3:.1f} ms" for name, seconds in wrapped.items()), "(last rollout)")
with profile(activities=[ProfilerActivity.CPU]) as prof:
    rollout()
print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=int(sys.argv[1]) if len(sys.argv) > 1 else 15))
