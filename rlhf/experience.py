"""The data of one training step, in two typed containers.

`Rollout` is what a generator returns; `Experience` is everything the step computes about
that rollout batch before the update. Shapes: B sequences, P prompt positions (left-padded),
R response positions (right-padded). Per-token tensors are (B, R); position t is response
token t, scored under the state (prompt, response[:t]).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

import torch


def _index(value, index: torch.Tensor):
    if value is None:
        return None
    if isinstance(value, torch.Tensor):
        return value[index]
    if isinstance(value, list):
        return [value[i] for i in index.tolist()]
    if isinstance(value, dict):
        return {k: _index(v, index) for k, v in value.items()}
    return value


@dataclass
class Rollout:
    """Sampled responses to a batch of prompts, on the device."""

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
        """(B, P + R) prompt then response."""
        return torch.cat([self.prompt_ids, self.response_ids], dim=1)

    @property
    def attention_mask(self) -> torch.Tensor:
        """(B, P + R) 1 on real tokens."""
        return torch.cat([self.prompt_mask, self.response_mask.long()], dim=1)

    def select(self, index: torch.Tensor) -> "Rollout":
        """The rows `index` (a 1-D long tensor) of every field."""
        return dataclasses.replace(self, **{f.name: _index(getattr(self, f.name), index)
                                            for f in dataclasses.fields(self)})


@dataclass
class Experience:
    """One rollout batch scored and ready for the update: everything is computed under the
    rollout policy (pi_old) and is a constant for the update."""

    rollout: Rollout
    """The sampled sequences."""
    prompts: list[str]
    """(B,) prompt texts, as the reward function sees them."""
    responses: list[str]
    """(B,) decoded responses (special tokens skipped)."""
    raw_scores: torch.Tensor
    """(B,) reward before post-processing (normalisation, clipping, EOS penalty)."""
    scores: torch.Tensor
    """(B,) the reward the policy is trained on."""
    old_logprobs: torch.Tensor
    """(B, R) log pi_old(y_t) at the sampling temperature, 0 on padding."""
    ref_logprobs: torch.Tensor
    """(B, R) log pi_ref(y_t), 0 on padding."""
    values: torch.Tensor
    """(B, R) the critic's V(x, y_<t), 0 on padding."""
    rewards: torch.Tensor
    """(B, R) per-token rewards: score on the last real token, KL penalty on every token
    when it is folded into the reward."""
    advantages: torch.Tensor
    """(B, R) advantage estimates (whitened when configured)."""
    returns: torch.Tensor
    """(B, R) the critic's regression targets."""
    kl_coef: float
    """The KL coefficient this batch was scored with."""
    groups: torch.Tensor | None = None
    """(B,) the index of each sequence's prompt in the step: the samples of one prompt
    (`rollout.samples_per_prompt`) share it."""
    reward_components: dict[str, torch.Tensor] = field(default_factory=dict)
    """With `reward.functions`: each function's (B,) scores by its name (raw_scores is their
    weighted sum); empty otherwise."""

    @property
    def mask(self) -> torch.Tensor:
        """(B, R) 1 on real response tokens."""
        return self.rollout.response_mask

    @property
    def size(self) -> int:
        return self.rollout.response_ids.shape[0]

    @property
    def sequence_kl(self) -> torch.Tensor:
        """(B,) the sum over real tokens of log pi_old - log pi_ref (k1)."""
        return ((self.old_logprobs - self.ref_logprobs) * self.mask).sum(-1)

    def select(self, index: torch.Tensor) -> "Experience":
        """The rows `index` (a 1-D long tensor) of every per-sequence and per-token field."""
        changes = {f.name: _index(getattr(self, f.name), index) for f in dataclasses.fields(self)
                   if f.name not in ("rollout", "kl_coef")}
        return dataclasses.replace(self, rollout=self.rollout.select(index), **changes)
