"""Rollout -> Experience: scores, old and reference log-probs, values, per-token rewards and
advantages, all under the rollout policy (pi_old)."""

from __future__ import annotations

from typing import NamedTuple

import torch

from rlhf import algos
from rlhf.config import PPOConfig, RewardConfig
from rlhf.errors import NonFiniteError
from rlhf.experience import Experience, Rollout


def check_finite(tensor: torch.Tensor, where: str) -> None:
    if not torch.isfinite(tensor).all():
        raise NonFiniteError(f"non-finite values in {where}; the step was refused before any weight changed")


class Scored(NamedTuple):
    """A rollout batch's reward, before and after post-processing."""

    raw: torch.Tensor
    """(B,) the reward model's or functions' scores."""
    scores: torch.Tensor
    """(B,) the scores the policy is trained on (`Reward.process`)."""
    components: dict[str, torch.Tensor]
    """With `reward.functions`: each function's (B,) scores by its name; empty otherwise."""


class ExperienceMaker:
    def __init__(self, models, reward, engine, backend, ppo: PPOConfig, reward_cfg: RewardConfig):
        self.models, self.reward, self.engine, self.backend = models, reward, engine, backend
        self.ppo, self.reward_cfg = ppo, reward_cfg
        self.estimator = algos.advantage_estimator(ppo.advantage)

    def make(self, rollout: Rollout, prompts: list[str], responses: list[str], kl_coef: float,
             groups: torch.Tensor | None = None, metadata: list[dict] | None = None,
             scored: Scored | None = None) -> Experience:
        """`groups` (B,): each sequence's prompt index (default: one sequence per prompt);
        `metadata`: each sequence's prompt record, for reward functions that read it;
        `scored`: the batch's reward when it was already computed (`score`)."""
        p = self.ppo
        if groups is None:
            groups = torch.arange(len(prompts))
        mask = rollout.response_mask
        old_logprobs, values = self.models.rollout_forward(rollout)
        with torch.no_grad():
            ref_logprobs = self.models.ref_logprobs(rollout)
            raw, scores, components = scored or self.score(rollout, prompts, responses, metadata)
            for tensor, where in ((scores, "reward scores"), (old_logprobs, "policy log-probs"),
                                  (ref_logprobs, "reference log-probs"), (values, "critic values")):
                check_finite(tensor, where)
            rewards = algos.shape_rewards(scores, old_logprobs, ref_logprobs, mask,
                                          kl_coef if p.kl_in_reward else 0.0, p.kl_estimator)
            if p.whiten_rewards:
                rewards = self.engine.whiten(rewards, mask, shift_mean=False)
            advantages, returns = self.estimator(rewards=rewards, values=values, mask=mask, scores=scores,
                                                 groups=groups.to(mask.device), gamma=p.gamma, lam=p.lam)
            whiten = self.estimator.whiten if self.estimator.whiten is not None else p.whiten_advantages
            if whiten:
                advantages = self.engine.whiten(advantages, mask)
        return Experience(rollout=rollout, prompts=prompts, responses=responses, raw_scores=raw, scores=scores,
                          old_logprobs=old_logprobs, ref_logprobs=ref_logprobs, values=values, rewards=rewards,
                          advantages=advantages, returns=returns, kl_coef=kl_coef, groups=groups,
                          reward_components=components)

    @torch.no_grad()
    def score(self, rollout: Rollout, prompts: list[str], responses: list[str],
              metadata: list[dict] | None = None) -> Scored:
        """The reward of a rollout batch: raw, each reward function's share, and processed
        (baseline, normalisation, clipping, EOS and overlong penalties)."""
        raw, components = self.reward.raw_and_components(prompts, responses, rollout.sequence_ids,
                                                         rollout.attention_mask, self.backend.precision, metadata)
        baseline = self.raw_scores(prompts, [""] * len(prompts), metadata=metadata) if self.reward_cfg.baseline else None
        scores = self.reward.process(raw, rollout.has_eos, baseline, lengths=rollout.response_mask.sum(-1))
        return Scored(raw, scores, components)

    def raw_scores(self, prompts: list[str], responses: list[str], rollout: Rollout | None = None,
                   metadata: list[dict] | None = None) -> torch.Tensor:
        """Reward before post-processing; the policy's own token ids are used when the
        reward model shares its tokenizer."""
        if rollout is None:
            return self.reward.raw(prompts, responses, precision=self.backend.precision, metadata=metadata)
        return self.reward.raw(prompts, responses, rollout.sequence_ids, rollout.attention_mask,
                               precision=self.backend.precision, metadata=metadata)
