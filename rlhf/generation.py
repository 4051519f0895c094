"""The generation seam: `generate(prompt_ids) -> Rollout` and `update_weights(policy)`.

`LocalGenerator` samples with the lean decoding loop (`rlhf.rollout.generate`) on the very
module being trained, so its weights are always current. An engine that keeps its own copy
of the weights (vLLM) implements the same two methods and copies them in `update_weights`.
"""

from __future__ import annotations

from typing import Protocol

from torch import nn

from rlhf.config import RolloutConfig
from rlhf.data import left_pad
from rlhf.experience import Rollout
from rlhf.rollout import generate


class Generator(Protocol):
    def generate(self, prompt_ids: list[list[int]]) -> Rollout:
        """Responses to token-id prompts (unpadded lists), sampled from the current policy."""

    def update_weights(self, policy: nn.Module) -> None:
        """Called after every update with the trained policy (unwrapped)."""


class LocalGenerator:
    """The lean decoding loop on the trained policy itself."""

    def __init__(self, policy: nn.Module, cfg: RolloutConfig, tokenizer, backend):
        self.policy, self.cfg, self.backend = policy, cfg, backend
        self.eos_id, self.pad_id = tokenizer.eos_token_id, tokenizer.pad_token_id

    def generate(self, prompt_ids: list[list[int]]) -> Rollout:
        ids, mask = (t.to(self.backend.device) for t in left_pad(prompt_ids, self.pad_id))
        return generate(self.policy, ids, mask, self.cfg, self.eos_id, self.pad_id, self.backend.precision,
                        self.backend.decoding)

    def update_weights(self, policy: nn.Module) -> None:
        self.policy = policy  # the same module: nothing to copy


class RecordingGenerator:
    """Wraps a generator and keeps every rollout it returned (for benchmarks and tests)."""

    def __init__(self, inner: Generator):
        self.inner, self.rollouts = inner, []

    def generate(self, prompt_ids: list[list[int]]) -> Rollout:
        rollout = self.inner.generate(prompt_ids)
        self.rollouts.append(rollout)
        return rollout

    def update_weights(self, policy: nn.Module) -> None:
        self.inner.update_weights(policy)


def make_generator(policy: nn.Module, cfg, tokenizer, backend, engine) -> Generator:
    """The generator `cfg.rollout.engine` names: vLLM, or the lean loop on the trained policy
    (on a gathered whole copy of it when the engine shards parameters)."""
    if cfg.rollout.engine == "vllm":
        from rlhf.vllm_generator import VLLMGenerator

        return VLLMGenerator(policy, cfg.rollout, tokenizer, backend, model_path=policy.config._name_or_path,
                             seed=cfg.train.seed + engine.rank, max_prompt_tokens=cfg.data.max_prompt_tokens)
    if getattr(engine, "shards_parameters", False):
        from rlhf.fsdp_engine import GatheredGenerator

        return GatheredGenerator(engine, policy, cfg.rollout, tokenizer, backend)
    return LocalGenerator(policy, cfg.rollout, tokenizer, backend)


def decode_responses(tokenizer, rollout: Rollout) -> list[str]:
    """Response texts, special tokens skipped, padding never decoded."""
    mask = rollout.response_mask.long()
    return tokenizer.batch_decode(rollout.response_ids * mask + tokenizer.pad_token_id * (1 - mask),
                                  skip_special_tokens=True)


__all__ = ["Generator", "LocalGenerator", "RecordingGenerator", "decode_responses", "make_generator"]
