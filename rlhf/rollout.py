"""Generation and the forward passes over (prompt, response) sequences.

Layout of every batch: prompts left-padded to width P, responses right-padded to width R,
concatenated into (B, P + R). The logits that predict response token t sit at position
P - 1 + t; so does the critic's value of the state (x, y_<t).
"""

from __future__ import annotations

import logging
from contextlib import nullcontext
from dataclasses import dataclass

import torch
from transformers import GenerationConfig

from rlhf import algos
from rlhf.config import RolloutConfig

log = logging.getLogger(__name__)


class NonFiniteError(RuntimeError):
    """A NaN or Inf reached a loss, reward, probability or gradient; the step was refused."""


@dataclass
class Rollout:
    prompt_ids: torch.Tensor
    """(B, P) left-padded prompt ids."""
    prompt_mask: torch.Tensor
    """(B, P) 1 on real prompt tokens."""
    response_ids: torch.Tensor
    """(B, R) sampled tokens up to and including the first EOS, pad after it."""
    response_mask: torch.Tensor
    """(B, R) float, 1 on real response tokens (the EOS included)."""
    has_eos: torch.Tensor
    """(B,) bool: the response ended with EOS within max_new_tokens."""
    gen_logprobs: torch.Tensor | None = None
    """(B, R) log-probs the sampler used, to check against the recomputed ones."""

    @property
    def sequence_ids(self) -> torch.Tensor:
        return torch.cat([self.prompt_ids, self.response_ids], dim=1)

    @property
    def attention_mask(self) -> torch.Tensor:
        return torch.cat([self.prompt_mask, self.response_mask.long()], dim=1)

    def select(self, index: torch.Tensor) -> "Rollout":
        return Rollout(*(None if v is None else v[index] for v in (
            self.prompt_ids, self.prompt_mask, self.response_ids, self.response_mask, self.has_eos, self.gen_logprobs)))


def autocast(dtype: str):
    """bf16 autocast for forwards when asked; log-probs and losses are computed in fp32."""
    if dtype == "bfloat16":
        return torch.autocast("cpu" if not torch.cuda.is_available() else "cuda", dtype=torch.bfloat16)
    return nullcontext()


def warn_off_policy(cfg: RolloutConfig) -> None:
    if cfg.top_k or cfg.top_p < 1.0:
        log.warning(
            "rollout.top_k=%s / rollout.top_p=%s: samples are then not drawn from the policy itself, "
            "the PPO ratio and KL estimates are biased, and a negative KL is the usual symptom",
            cfg.top_k, cfg.top_p)


def truncate_after_eos(response_ids: torch.Tensor, eos_id: int, pad_id: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The EOS trick: keep each response up to and including its first EOS.

    Returns (ids with pad after the first EOS, float mask, has_eos).
    """
    is_eos = response_ids == eos_id
    has_eos = is_eos.any(dim=1)
    first = torch.where(has_eos, is_eos.float().argmax(dim=1), torch.full_like(has_eos, response_ids.shape[1], dtype=torch.long))
    positions = torch.arange(response_ids.shape[1]).unsqueeze(0)
    mask = (positions <= first.unsqueeze(1)).float()
    return torch.where(mask.bool(), response_ids, torch.full_like(response_ids, pad_id)), mask, has_eos


@torch.no_grad()
def generate(model, prompt_ids: torch.Tensor, prompt_mask: torch.Tensor, cfg: RolloutConfig,
             eos_id: int, pad_id: int, dtype: str = "float32") -> Rollout:
    """Sample responses from the policy itself (no repetition penalty, no min length)."""
    # An explicit config, not the checkpoint's generation_config: its top_k/top_p/penalties
    # would make the samples off-policy without anyone noticing.
    gen_cfg = GenerationConfig(
        # top_k=None would fall back to transformers' default of 50: 0 is "off".
        do_sample=True, temperature=cfg.temperature, top_k=cfg.top_k, top_p=cfg.top_p,
        max_new_tokens=cfg.max_new_tokens, min_new_tokens=0, repetition_penalty=1.0,
        # early_stop off: no EOS id, so every sequence runs to max_new_tokens (fixed work).
        eos_token_id=eos_id if cfg.early_stop else None, pad_token_id=pad_id, use_cache=True,
        output_scores=True, return_dict_in_generate=True,
    )
    try:
        with autocast(dtype):
            out = model.generate(input_ids=prompt_ids, attention_mask=prompt_mask, generation_config=gen_cfg)
    except RuntimeError as e:
        if "inf" in str(e) or "nan" in str(e):  # torch.multinomial on a broken distribution
            raise NonFiniteError(f"non-finite policy probabilities during generation ({e})") from None
        raise
    response_ids = out.sequences[:, prompt_ids.shape[1]:]
    response_ids, response_mask, has_eos = truncate_after_eos(response_ids, eos_id, pad_id)
    # The sampler's own log-probs (scores are the processed logits, temperature included).
    scores = torch.stack(out.scores, dim=1).float()
    gen_logprobs = torch.log_softmax(scores, dim=-1).gather(-1, response_ids.unsqueeze(-1)).squeeze(-1)
    gen_logprobs = torch.where(response_mask.bool(), gen_logprobs, torch.zeros_like(gen_logprobs))
    return Rollout(prompt_ids, prompt_mask, response_ids, response_mask, has_eos, gen_logprobs)


def position_ids(attention_mask: torch.Tensor) -> torch.Tensor:
    """Positions that skip left padding, as generate() uses them."""
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)


def policy_forward(model, rollout: Rollout, temperature: float, dtype: str = "float32",
                   with_entropy: bool = False, with_hidden: bool = False):
    """Log-probs of the response tokens (and optionally entropy, last hidden states).

    Only the R + 1 last positions go through the vocabulary projection (logits_to_keep):
    prompt positions never need logits.
    """
    ids, mask = rollout.sequence_ids, rollout.attention_mask
    R = rollout.response_ids.shape[1]
    with autocast(dtype):
        out = model(input_ids=ids, attention_mask=mask, position_ids=position_ids(mask),
                    logits_to_keep=R + 1, output_hidden_states=with_hidden, use_cache=False)
    logits = out.logits[:, :-1]
    logprobs = algos.logprobs_from_logits(logits, rollout.response_ids, temperature)
    entropy = algos.entropy_from_logits(logits.float() / temperature) if with_entropy else None
    hidden = out.hidden_states[-1][:, -R - 1:-1] if with_hidden else None
    return logprobs, entropy, hidden


def critic_forward(critic, rollout: Rollout, dtype: str = "float32") -> torch.Tensor:
    """V(x, y_<t) for every response position t, from a token-classification critic."""
    ids, mask = rollout.sequence_ids, rollout.attention_mask
    R = rollout.response_ids.shape[1]
    with autocast(dtype):
        out = critic(input_ids=ids, attention_mask=mask, position_ids=position_ids(mask))
    return out.logits[:, -R - 1:-1, 0].float()
