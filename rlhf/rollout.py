"""Generation and the forward passes over (prompt, response) sequences.

Layout of every batch: prompts left-padded to width P, responses right-padded to width R,
concatenated into (B, P + R). The logits that predict response token t sit at position
P - 1 + t; so does the critic's value of the state (x, y_<t).
"""

from __future__ import annotations

import logging
from contextlib import nullcontext
from typing import Callable, ContextManager

import torch
from torch import nn
from transformers.cache_utils import DynamicLayer

from rlhf import algos, prefix
from rlhf.config import RolloutConfig
from rlhf.errors import NonFiniteError, UserInputError
from rlhf.experience import Rollout
from rlhf.precision import FP32, Precision, as_precision

log = logging.getLogger(__name__)


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
    positions = torch.arange(response_ids.shape[1], device=response_ids.device).unsqueeze(0)
    mask = (positions <= first.unsqueeze(1)).float()
    return torch.where(mask.bool(), response_ids, torch.full_like(response_ids, pad_id)), mask, has_eos


def _warpers(cfg: RolloutConfig) -> list:
    """The processors that turn logits into sampling scores: temperature, and top-k / top-p
    only when asked (transformers' own classes, so the filtering is theirs exactly)."""
    from transformers.generation.logits_process import TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper

    warpers = [TemperatureLogitsWarper(cfg.temperature)] if cfg.temperature != 1.0 else []
    if cfg.top_k:
        warpers.append(TopKLogitsWarper(cfg.top_k))
    if cfg.top_p < 1.0:
        warpers.append(TopPLogitsWarper(cfg.top_p))
    return warpers


def _preallocated_cache(config, capacity: int):
    """transformers' dynamic KV cache with its full-attention layers written in place into
    buffers of `capacity` positions: appending a token no longer copies the whole cache
    (torch.cat per layer per token). Keys and
    values keep their own dtypes: under bf16 autocast the rotary makes the keys fp32, which
    transformers' StaticCache cannot hold."""
    from transformers import DynamicCache

    class PreallocatedLayer(DynamicLayer):
        def lazy_initialization(self, key_states, value_states):
            super().lazy_initialization(key_states, value_states)
            batch, heads, _, dim = key_states.shape
            self.key_buffer = key_states.new_empty(batch, heads, capacity, dim)
            self.value_buffer = value_states.new_empty(batch, heads, capacity, value_states.shape[-1])

        def update(self, key_states, value_states, *args, **kwargs):
            if not self.is_initialized:
                self.lazy_initialization(key_states, value_states)
            start, end = self.get_seq_length(), self.get_seq_length() + key_states.shape[-2]
            self.key_buffer[:, :, start:end] = key_states
            self.value_buffer[:, :, start:end] = value_states
            self.keys, self.values = self.key_buffer[:, :, :end], self.value_buffer[:, :, :end]
            return self.keys, self.values

        def select_rows(self, index):
            end = self.get_seq_length()
            self.key_buffer, self.value_buffer = self.key_buffer[index], self.value_buffer[index]
            self.keys, self.values = self.key_buffer[:, :, :end], self.value_buffer[:, :, :end]

    cache = DynamicCache(config=config)
    cache.layers = [PreallocatedLayer() if type(layer) is DynamicLayer else layer for layer in cache.layers]
    return cache


def sample(probs: torch.Tensor, inverse_cdf: bool = True) -> torch.Tensor:
    """One token per row of `probs` (B, V), drawn with probability probs[b, v].

    Inverse CDF: u ~ U[0, 1) scaled to the row's total, and the first v whose cumulative
    sum (float64) exceeds u. Entries of probability 0 (top-k / top-p filtered) are never
    drawn: their cumulative sum equals the one before them. `inverse_cdf=False` uses
    torch.multinomial. Non-finite probabilities raise NonFiniteError."""
    if inverse_cdf:
        cdf = probs.double().cumsum(dim=-1)
        total = cdf[:, -1:]
        if not (torch.isfinite(total).all() and (total > 0).all()):
            raise NonFiniteError("non-finite policy probabilities while sampling; the step was refused")
        u = torch.rand(total.shape, dtype=torch.float64, device=probs.device) * total
        # u < total exactly, also after rounding, so the draw is a token of positive mass.
        u = torch.minimum(u, torch.nextafter(total, torch.zeros_like(total)))
        return torch.searchsorted(cdf, u, right=True).squeeze(1)
    try:
        return torch.multinomial(probs, num_samples=1).squeeze(1)
    except RuntimeError:
        if torch.isfinite(probs).all():
            raise
        raise NonFiniteError("non-finite policy probabilities while sampling; the step was refused") from None


@torch.no_grad()
def generate(model, prompt_ids: torch.Tensor, prompt_mask: torch.Tensor, cfg: RolloutConfig,
             eos_id: int, pad_id: int, precision: Precision | str = FP32,
             decoding: Callable[[nn.Module, int], ContextManager] | None = None) -> Rollout:
    """Sample responses from the policy itself (no repetition penalty, no min length).

    A lean loop instead of `model.generate`: the prefill computes logits for the last prompt
    position only, each decoding step one position (inside `decoding(model, batch)`, the
    backend's context for it: prepacked weights on the CPU), and the sampler keeps its own log-probs (no
    (B, R, vocab) score history, no per-token processor machinery). It samples from the
    distribution `generate(do_sample=True)` samples from, the softmax of the processed
    scores; with `rollout.inverse_cdf_sampling` off it draws the very same tokens for the
    same random state (multinomial).
    """
    B, P = prompt_ids.shape
    R = cfg.max_new_tokens
    device = prompt_ids.device
    warpers = _warpers(cfg)
    cache = _preallocated_cache(model.config, P + R)
    # Every slot of the response is attended once written; the causal mask hides the rest.
    mask = torch.cat([prompt_mask, prompt_mask.new_ones(B, R)], dim=1)
    positions = position_ids(mask)
    response_ids = torch.full((B, R), pad_id, dtype=torch.long, device=device)
    gen_logprobs = torch.zeros(B, R, device=device)
    finished = torch.zeros(B, dtype=torch.bool, device=device)
    width = R
    precision = as_precision(precision)
    packed = decoding(model, B) if decoding is not None else nullcontext()
    shared = None
    if prefix.shares_prefill(cfg, model):  # every layer is then a preallocated one
        shared = prefix.shared_prompts(prompt_ids, prompt_mask)
    rows = shared.first if shared is not None else torch.arange(B, device=device)
    cache_arg = {prefix.cache_keyword(model): cache}
    with precision.autocast(device):
        logits = model(input_ids=prompt_ids[rows], attention_mask=mask[rows, :P], position_ids=positions[rows, :P],
                       **cache_arg, cache_position=torch.arange(P, device=device), logits_to_keep=1,
                       use_cache=True).logits[:, -1]
    if not prefix.cache_holds(cache, P):  # the loop below feeds one token a step: the prompt must be there
        raise UserInputError(f"{type(prefix.unwrapped(model)).__name__} did not fill the KV cache its forward was "
                             "given: rlhf's decoding loop needs a causal LM that takes and fills it, as transformers' "
                             "own models do (or rollout.engine=vllm)")
    if shared is not None:  # one prefill per distinct prompt, copied to the samples that share it
        for layer in cache.layers:
            layer.select_rows(shared.inverse)
        logits = logits[shared.inverse]
    with precision.autocast(device), packed:
        for t in range(R):
            scores = logits.float()
            for warp in warpers:
                scores = warp(None, scores)
            token = sample(torch.softmax(scores, dim=-1), cfg.inverse_cdf_sampling)
            if cfg.early_stop:
                # Finished sequences get pad, as in generate(); truncation masks them anyway.
                token = torch.where(finished, pad_id, token)
            response_ids[:, t] = token
            gen_logprobs[:, t] = torch.log_softmax(scores, dim=-1).gather(-1, token[:, None]).squeeze(-1)
            if cfg.early_stop:
                finished |= token == eos_id
                if finished.all():
                    width = t + 1
                    break
            if t + 1 < R:
                logits = model(input_ids=token[:, None], attention_mask=mask[:, :P + t + 1],
                               position_ids=positions[:, P + t:P + t + 1], **cache_arg,
                               cache_position=torch.tensor([P + t], device=device), use_cache=True).logits[:, -1]
    response_ids, response_mask, has_eos = truncate_after_eos(response_ids[:, :width], eos_id, pad_id)
    gen_logprobs = torch.where(response_mask.bool(), gen_logprobs[:, :width], torch.zeros(()))
    return Rollout(prompt_ids, prompt_mask, response_ids, response_mask, has_eos, gen_logprobs)


def position_ids(attention_mask: torch.Tensor) -> torch.Tensor:
    """Positions that skip left padding, as generate() uses them."""
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)


def policy_forward(model, rollout: Rollout, temperature: float, precision: Precision | str = FP32,
                   with_entropy: bool = False, with_hidden: bool = False, entropy_grad: bool = True,
                   share_prefix: bool = False, prefix_model=None):
    """Log-probs of the response tokens (and optionally entropy, last hidden states).

    Only the R positions that predict response tokens go through the vocabulary projection
    (logits_to_keep): prompt positions never need logits. The entropy shares the log-probs' logsumexp; with
    `entropy_grad` off (no entropy bonus) it is only logged and builds no graph. `share_prefix`:
    rows with the same prompt compute it once (`rlhf.prefix`; `prefix_model` runs that part).
    """
    ids, mask = rollout.sequence_ids, rollout.attention_mask
    S, R = ids.shape[1], rollout.response_ids.shape[1]
    shared = prefix.shared_prompts(rollout.prompt_ids, rollout.prompt_mask) if share_prefix else None
    with as_precision(precision).autocast(ids.device):
        if not prefix.takes_logits_to_keep(model):
            raise UserInputError(f"{type(prefix.unwrapped(model)).__name__}'s forward takes no logits_to_keep: rlhf "
                                 "needs a causal LM whose forward takes it, as transformers' own models do")
        if shared is not None:
            out = prefix.forward(model, ids, mask, position_ids(mask), S - R, shared, prefix_model,
                                 output_hidden_states=with_hidden)
        else:
            # The positions S-R-1 .. S-2 predict the response tokens: their logits, contiguous.
            out = model(input_ids=ids, attention_mask=mask, position_ids=position_ids(mask),
                        logits_to_keep=torch.arange(S - R - 1, S - 1, device=ids.device),
                        output_hidden_states=with_hidden, use_cache=False)
    logits = out.logits
    if logits.shape[1] != R:
        raise UserInputError(
            f"{type(prefix.unwrapped(model)).__name__} returned logits for {logits.shape[1]} positions where {R} "
            "were asked (logits_to_keep): rlhf needs a causal LM whose forward takes logits_to_keep, as "
            "transformers' own models do")
    if with_entropy:
        logprobs, entropy = algos.logprobs_and_entropy_from_logits(logits, rollout.response_ids, temperature,
                                                                   entropy_grad)
    else:
        logprobs, entropy = algos.logprobs_from_logits(logits, rollout.response_ids, temperature), None
    hidden = None
    if with_hidden:  # the last layer's states at the R positions that predict the response
        hidden = out.hidden_states[-1][:, -R:] if shared is not None else out.hidden_states[-1][:, -R - 1:-1]
    return logprobs, entropy, hidden


def critic_forward(critic, rollout: Rollout, precision: Precision | str = FP32) -> torch.Tensor:
    """V(x, y_<t) for every response position t, from a token-classification critic."""
    ids, mask = rollout.sequence_ids, rollout.attention_mask
    R = rollout.response_ids.shape[1]
    with as_precision(precision).autocast(ids.device):
        out = critic(input_ids=ids, attention_mask=mask, position_ids=position_ids(mask))
    return out.logits[:, -R - 1:-1, 0].float()
