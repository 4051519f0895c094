"""Which sequences a step trains on: prompts from the stream, each sampled
`rollout.samples_per_prompt` times (a group), and DAPO's dynamic sampling.

With a group baseline (GRPO, RLOO, ...) a group whose scores are all equal has advantage 0
everywhere: it costs a full update and teaches nothing. Dynamic sampling (Yu et al. 2025)
scores each round's groups, keeps those whose scores differ, and draws the next prompts of
the stream until `rollout.batch_size` groups are kept or `rollout.max_sampling_rounds`
rounds have run (each round samples `batch_size` prompts; groups with signal beyond those
needed are not used). The batch keeps its fixed size either way: when the bound is hit, the
remaining places are taken by the latest groups without signal (zero advantage under a group
baseline, as without dynamic sampling), and `rollout/filled_groups` counts them.

Under several processes every process draws its shard of each round's prompts, so the prompt
order stays shared; rounds go on while any process still misses groups.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from rlhf.config import RolloutConfig
from rlhf.data import Prompt
from rlhf.experience import Rollout
from rlhf.experience_maker import Scored
from rlhf.generation import Generator, decode_responses


@dataclass
class SampledBatch:
    """A step's sequences: B = groups x samples_per_prompt, a group's samples adjacent."""

    indices: list[int]
    """(B,) each sequence's index in the prompt list."""
    rollout: Rollout
    """The sampled sequences."""
    responses: list[str]
    """(B,) decoded responses."""
    scored: Scored | None = None
    """The reward, when sampling needed it (dynamic sampling); else the experience maker scores."""
    stats: dict[str, float] = field(default_factory=dict)
    """`rollout/sampling_rounds`, `rollout/dropped_groups`, `rollout/filled_groups` (dynamic sampling)."""

    def groups(self, group_size: int) -> torch.Tensor:
        """(B,) each sequence's group number within the step."""
        return torch.arange(len(self.indices)) // group_size

    def prompts(self, prompts: list[Prompt]) -> tuple[list[str], list[dict]]:
        """(B,) each sequence's prompt text and prompt record (metadata)."""
        return [prompts[i].text for i in self.indices], [prompts[i].metadata for i in self.indices]


def zero_variance_groups(scores: torch.Tensor, group_size: int, tol: float = 1e-6) -> torch.Tensor:
    """(G,) bool: the groups (consecutive runs of `group_size` scores) whose scores are all
    equal within `tol`: no signal under a group baseline."""
    grouped = scores.reshape(-1, group_size)
    return (grouped.max(-1).values - grouped.min(-1).values) <= tol


def concat_rollouts(rollouts: list[Rollout], pad_id: int) -> Rollout:
    """One rollout from several of different widths: prompts left-padded, responses
    right-padded to the widest."""
    if len(rollouts) == 1:
        return rollouts[0]
    P = max(r.prompt_ids.shape[1] for r in rollouts)
    R = max(r.response_ids.shape[1] for r in rollouts)

    def pad(t: torch.Tensor, width: int, value, left: bool) -> torch.Tensor:
        extra = width - t.shape[1]
        return torch.nn.functional.pad(t, (extra, 0) if left else (0, extra), value=value)

    gen = [r.gen_logprobs for r in rollouts]
    return Rollout(
        prompt_ids=torch.cat([pad(r.prompt_ids, P, pad_id, True) for r in rollouts]),
        prompt_mask=torch.cat([pad(r.prompt_mask, P, 0, True) for r in rollouts]),
        response_ids=torch.cat([pad(r.response_ids, R, pad_id, False) for r in rollouts]),
        response_mask=torch.cat([pad(r.response_mask, R, 0.0, False) for r in rollouts]),
        has_eos=torch.cat([r.has_eos for r in rollouts]),
        gen_logprobs=None if any(g is None for g in gen) else torch.cat([pad(g, R, 0.0, False) for g in gen]),
    )


class RolloutSampler:
    """Draws a step's prompts from `stream` and samples them with the generator it is given;
    with `cfg.dynamic_sampling`, scores the groups with `score(rollout, prompts, responses,
    metadata) -> Scored` and keeps those with signal (see the module docstring)."""

    def __init__(self, stream, prompts: list[Prompt], prompt_ids: list[list[int]], cfg: RolloutConfig, tokenizer,
                 engine, score=None):
        self.stream, self.prompts, self.prompt_ids, self.cfg = stream, prompts, prompt_ids, cfg
        self.tokenizer, self.engine, self.score = tokenizer, engine, score

    def sample(self, generator: Generator) -> SampledBatch:
        """This process's `batch_size` groups of `samples_per_prompt` sequences for one step."""
        if not self.cfg.dynamic_sampling:
            return self._round(generator, self.stream.next_batch(self.cfg.batch_size), scored=False)
        return self._dynamic(generator)

    def _round(self, generator: Generator, prompt_indices: list[int], scored: bool) -> SampledBatch:
        indices = [i for i in prompt_indices for _ in range(self.cfg.samples_per_prompt)]
        rollout = generator.generate([self.prompt_ids[i] for i in indices])
        responses = decode_responses(self.tokenizer, rollout)
        batch = SampledBatch(indices, rollout, responses)
        if scored:
            texts, metadata = batch.prompts(self.prompts)
            batch.scored = self.score(rollout, texts, responses, metadata)
        return batch

    def _dynamic(self, generator: Generator) -> SampledBatch:
        want, size = self.cfg.batch_size, self.cfg.samples_per_prompt
        kept: list[SampledBatch] = []   # groups with signal, one SampledBatch each
        spare: list[SampledBatch] = []  # groups without, the latest last
        rounds = dropped = 0
        while rounds < self.cfg.max_sampling_rounds:
            missing = want - len(kept)
            if self.engine.sum(torch.tensor(float(missing), device=self.engine.device)).item() == 0:
                break
            rounds += 1
            prompt_indices = self.stream.next_batch(want)  # every process draws: the order stays shared
            if missing == 0:
                continue
            batch = self._round(generator, prompt_indices, scored=True)
            flat = zero_variance_groups(batch.scored.scores, size)
            for g, flat_group in enumerate(flat.tolist()):
                group = _select(batch, torch.arange(g * size, (g + 1) * size))
                if flat_group:
                    dropped += 1
                    spare.append(group)
                elif len(kept) < want:
                    kept.append(group)
        filled = want - len(kept)
        chosen = kept + spare[len(spare) - filled:] if filled else kept
        out = _merge(chosen, self.tokenizer.pad_token_id)
        dropped, filled = (self.engine.sum(torch.tensor(float(n), device=self.engine.device)).item()
                           for n in (dropped, filled))  # over every process
        out.stats = {"rollout/sampling_rounds": float(rounds), "rollout/dropped_groups": dropped,
                     "rollout/filled_groups": filled}
        return out


def _select(batch: SampledBatch, index: torch.Tensor) -> SampledBatch:
    s = batch.scored
    scored = Scored(s.raw[index], s.scores[index], {k: v[index] for k, v in s.components.items()})
    return SampledBatch([batch.indices[i] for i in index.tolist()], batch.rollout.select(index),
                        [batch.responses[i] for i in index.tolist()], scored)


def _merge(batches: list[SampledBatch], pad_id: int) -> SampledBatch:
    s = [b.scored for b in batches]
    scored = Scored(torch.cat([x.raw for x in s]), torch.cat([x.scores for x in s]),
                    {k: torch.cat([x.components[k] for x in s]) for k in s[0].components})
    return SampledBatch([i for b in batches for i in b.indices], concat_rollouts([b.rollout for b in batches], pad_id),
                        [r for b in batches for r in b.responses], scored)
