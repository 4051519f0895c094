"""Shared prompt prefixes: the samples of one prompt (a group of GRPO, RLOO and the other group
estimators) begin with the same tokens, so those tokens' keys and values are computed once per
distinct prompt and copied to each of its samples, in the generation prefill and in the
log-prob forwards (with gradients too: the copies' gradients add up in the shared prefix).

A forward over (prompt, response) then runs in two calls of the model: the prompt without its
last token, once per distinct prompt, into a KV cache; then the last prompt token and the
response for every row, each layer reading the cache copied to every row (`SharedPrefixLayer`),
whose R logits are exactly the positions that predict the response. Same maths as one forward over the whole sequences; the sums are rounded
in another order (differences of the order of 1e-5 in fp32 log-probs).
"""

from __future__ import annotations

import functools
import inspect
from dataclasses import dataclass

import torch
from torch import nn
from transformers.cache_utils import DynamicLayer


@dataclass
class SharedPrompts:
    """Which rows of a batch share a prompt."""

    first: torch.Tensor
    """(U,) the first row of each distinct prompt."""
    inverse: torch.Tensor
    """(B,) each row's distinct prompt (an index into `first`)."""


def shared_prompts(prompt_ids: torch.Tensor, prompt_mask: torch.Tensor) -> SharedPrompts | None:
    """The distinct prompts of a left-padded batch, or None when no two rows share one (or the
    prompts are a single token: nothing precedes the last token to share)."""
    B, P = prompt_ids.shape
    if B < 2 or P < 2:
        return None
    rows = torch.cat([prompt_ids, prompt_mask.to(prompt_ids.dtype)], dim=1)
    distinct, inverse = torch.unique(rows, dim=0, return_inverse=True)
    if len(distinct) == B:
        return None
    first = torch.full((len(distinct),), B, device=inverse.device).scatter_reduce(
        0, inverse, torch.arange(B, device=inverse.device), reduce="amin")
    # Ordered by first occurrence, so the prefix batch keeps the rows' order.
    order = torch.argsort(first)
    rank = torch.empty_like(order).scatter_(0, order, torch.arange(len(order), device=order.device))
    return SharedPrompts(first[order], rank[inverse])


def supports_shared_prefix(model: nn.Module) -> bool:
    """True for models whose KV cache is transformers' plain dynamic cache on every layer
    (full attention), whose forward takes that cache, and whose rotary frequencies do not
    depend on the sequence's length; sliding-window, recurrent (Mamba, convolution) and other
    caches, and dynamic-NTK or LongRoPE scaling (the prompt's keys would be rotated for the
    prompt's length, not the whole sequence's), keep the plain forward."""
    from transformers import DynamicCache

    base = unwrapped(model)
    config = getattr(base, "config", None)
    if config is None or getattr(base, "_is_stateful", False):
        return False
    params = _forward_parameters(type(base))
    if "cache" not in params and "past_key_values" not in params:
        return False
    default_cache = getattr(type(base), "_supports_default_dynamic_cache", None)
    if default_cache is not None and not default_cache():
        return False
    if any("dynamic" in t or t == "longrope" for t in _rope_types(config)):
        return False
    try:
        cache = DynamicCache(config=config)
    except Exception:  # a config transformers cannot build a cache from
        return False
    return all(type(layer) is DynamicLayer for layer in cache.layers)


def _rope_types(config) -> set[str]:
    """The rotary embedding types a config names (one per layer type where it has several)."""
    config = config.get_text_config() if hasattr(config, "get_text_config") else config
    # transformers 5 keeps them in rope_parameters, 4.x in rope_scaling.
    params = getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None) or {}
    nested = [v for v in params.values() if isinstance(v, dict)]
    return {str(p.get("rope_type", p.get("type", "default"))) for p in nested or [params]}


def unwrapped(model: nn.Module) -> nn.Module:
    """The transformers model inside a DDP wrapper and a peft wrapper."""
    model = getattr(model, "module", model)  # DDP
    return model.get_base_model() if hasattr(model, "get_base_model") else model  # peft


@functools.lru_cache(maxsize=None)
def _forward_parameters(cls: type) -> dict:
    """The parameters of a model class's forward, read once per class (they are asked on
    every forward)."""
    return dict(inspect.signature(cls.forward).parameters)


def takes_logits_to_keep(model: nn.Module) -> bool:
    """Whether the model's forward takes `logits_to_keep` (by name, or in its **kwargs)."""
    params = _forward_parameters(type(unwrapped(model)))
    return "logits_to_keep" in params or any(p.kind is p.VAR_KEYWORD for p in params.values())


def cache_keyword(model: nn.Module) -> str:
    """The keyword under which the model's forward takes a KV cache: `cache` in the
    transformers releases that renamed it, `past_key_values` before."""
    return "cache" if "cache" in _forward_parameters(type(unwrapped(model))) else "past_key_values"


class SharedPrefixLayer(DynamicLayer):
    """A cache layer that keeps the prompt's keys and values once per distinct prompt and,
    for the one call that follows, returns them copied to every row (`inverse`) and followed
    by that call's own; it stores nothing more, so a forward without gradients never holds a
    whole-batch cache of every layer at once."""

    @classmethod
    def of(cls, layer: DynamicLayer, inverse: torch.Tensor) -> "SharedPrefixLayer":
        shared = cls.__new__(cls)
        shared.__dict__.update(layer.__dict__)  # keys, values and whatever else this version keeps
        shared.inverse, shared.reads = inverse, 0
        return shared

    def update(self, key_states, value_states, *args, **kwargs):
        self.reads += 1
        return (torch.cat([self.keys.index_select(0, self.inverse), key_states], dim=-2),
                torch.cat([self.values.index_select(0, self.inverse), value_states], dim=-2))


def forward(model: nn.Module, ids: torch.Tensor, mask: torch.Tensor, positions: torch.Tensor, prompt_width: int,
            shared: SharedPrompts, prefix_model: nn.Module | None = None, **kwargs):
    """The model's output at positions prompt_width - 1 .. S - 2 of (B, S) sequences (the R
    positions that predict the response), the prompt computed once per distinct prompt.
    `prefix_model`: the module to run the prefix with (the unwrapped model under DDP, whose
    wrapper expects one forward per backward); `kwargs` go to the second call."""
    from transformers import DynamicCache

    P, S = prompt_width, ids.shape[1]
    prefix_model = prefix_model or model
    cache = DynamicCache(config=prefix_model.config)
    rows = shared.first
    # logits_to_keep=1: the prefix's logits are never used; one position is the least asked.
    key = cache_keyword(prefix_model)
    prefix_model(input_ids=ids[rows, :P - 1], attention_mask=mask[rows, :P - 1],
                 position_ids=positions[rows, :P - 1], **{key: cache}, use_cache=True, logits_to_keep=1)
    if not cache_holds(cache, P - 1):
        raise _cache_ignored(prefix_model)
    cache.layers = [SharedPrefixLayer.of(layer, shared.inverse) for layer in cache.layers]
    out = model(input_ids=ids[:, P - 1:S - 1], attention_mask=mask[:, :S - 1], position_ids=positions[:, P - 1:S - 1],
                **{key: cache}, cache_position=torch.arange(P - 1, S - 1, device=ids.device), use_cache=True,
                **kwargs)
    if any(layer.reads != 1 for layer in cache.layers):
        raise _cache_ignored(model)
    return out


def cache_holds(cache, length: int) -> bool:
    """Whether every attention layer of `cache` holds `length` positions: a model that ignores
    the cache its forward is given leaves them empty."""
    return all(layer.get_seq_length() == length for layer in cache.layers if isinstance(layer, DynamicLayer))


def _cache_ignored(model: nn.Module):
    from rlhf.errors import UserInputError

    return UserInputError(
        f"{type(unwrapped(model)).__name__} did not read the KV cache its forward was given, which sharing a prompt "
        "between samples needs (is activation checkpointing on?): set rollout.share_prompt_prefix=false "
        "(dpo.share_prompt=false for DPO)")


def forwards_share(model: nn.Module, checkpointing: bool, sharded: bool) -> bool:
    """Whether log-prob forwards with gradients can share prompts: no activation
    checkpointing, asked (`checkpointing`) or found on the model (transformers drops the KV
    cache in checkpointed training), not under FSDP2 (`sharded`: its backward gathers a
    layer's weights when the gradient reaches the layer's output, and the prompt's gradient
    enters through the cache, inside), and a model whose cache allows it."""
    checkpointed = any(getattr(m, "gradient_checkpointing", False) is True for m in unwrapped(model).modules())
    return not checkpointing and not checkpointed and not sharded and supports_shared_prefix(model)


def shares_prefix(cfg, model: nn.Module, sharded: bool = False) -> bool:
    """Whether a PPO run's log-prob forwards share prompts: groups of samples, the option on,
    and `forwards_share`."""
    return (cfg.rollout.share_prompt_prefix and cfg.rollout.samples_per_prompt > 1
            and forwards_share(model, bool(cfg.model.gradient_checkpointing), sharded))


def shares_prefill(rollout_cfg, model: nn.Module) -> bool:
    """Whether the decoding loop prefills each distinct prompt once: groups of samples, the
    option on, and a model whose cache allows it."""
    return rollout_cfg.share_prompt_prefix and rollout_cfg.samples_per_prompt > 1 and supports_shared_prefix(model)
