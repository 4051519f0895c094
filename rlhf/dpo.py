"""Direct preference optimisation: preference pairs -> a policy, without a reward model or
sampling (Rafailov et al., 2023; IPO, Azar et al., 2023, as an option).

`rlhf dpo CONFIG.yaml [key=value ...]` reads the reward model's preference format
(`rlhf.reward_model.load_preferences`: `prompt`/`chosen`/`rejected`, or a ranking
`responses` + `ranks` expanded to its pairs). Each response is laid out as a PPO rollout
is: the prompt as PPO renders it (chat template), then the response and EOS. The loss
compares the policy's sequence log-probs with those of the frozen reference, its starting
weights (under LoRA, the adapter-disabled base: no second copy in memory), computed once
per micro-batch without gradients (`rlhf.algos.dpo_loss`).

metrics.jsonl carries `train/loss` and the implicit rewards beta * (log pi - log pi_ref)
under stable names: `rewards/chosen`, `rewards/rejected`, `rewards/margin` (their mean
difference), `rewards/accuracy` (share of pairs ranked right), `logps/chosen`,
`logps/rejected`; the same on held-out pairs under `eval/`.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, NamedTuple, Optional

import torch

from rlhf import algos
from rlhf.config import ConfigError, PolicyConfig
from rlhf.data import DataError, Prompt, tokenize_prompts
from rlhf.experience import Rollout
from rlhf.offline import (RESUMABLE, OfflineTrainConfig, OfflineTrainer, Tokens, collate, encode_response,
                          prompt_and_response, token_logprobs)
from rlhf.prefix import forwards_share
from rlhf.rollout import policy_forward
from rlhf.reward_model import load_preferences, split_by_line


@dataclass
class DPODataConfig:
    train: str = ""
    """Preferences, JSONL (the format of `rlhf reward-model`): `chosen` and `rejected` with an
    optional `prompt`, or a ranking `responses` + `ranks` (rank 1 is best) expanded to its
    pairs. `margin` and `category` are read and not used."""
    eval: Optional[str] = None
    """Held-out preferences in the same format (default: `eval_fraction` of train's lines,
    drawn with train.seed; the pairs of one ranking stay on one side)."""
    eval_fraction: float = 0.1
    """Share of train's lines held out when `eval` is not given (0: no evaluation)."""
    max_length: int = 512
    """Most tokens of prompt + response (a longer response loses its end)."""
    max_prompt_tokens: int = 256
    """Prompts longer than this keep their last max_prompt_tokens tokens, as in `rlhf ppo`."""
    chat_template: bool = True
    """Render each prompt as one user message in the tokenizer's chat template (as `rlhf
    ppo` renders its prompts), when it has one."""
    system_prompt: Optional[str] = None
    """A system message put before each prompt rendered with the chat template."""


@dataclass
class DPOLossConfig:
    beta: float = 0.1
    """Strength of the pull to the reference: the implicit reward is beta * (log pi - log
    pi_ref); a larger beta keeps the policy closer."""
    loss: Literal["sigmoid", "ipo"] = "sigmoid"
    """`sigmoid`: the DPO loss -log sigmoid(beta * h) on the sequence log-ratio gap h. `ipo`:
    (h - 1/(2 beta))^2 on the token-mean log-probs, which stops at a finite gap."""
    share_prompt: bool = True
    """Compute a pair's prompt once for its chosen and its rejected response (`rlhf.prefix`),
    in the policy's and the reference's forwards. Same maths, the sums rounded in another
    order. Used in a batch only where it computes fewer token positions than the sequences
    right-padded (prompts of very unequal lengths may not), and not under activation
    checkpointing, FSDP2, or for models whose KV cache is not transformers' plain dynamic
    cache on every layer (or whose rotary scaling depends on the length)."""


@dataclass
class DPOTrainConfig(OfflineTrainConfig):
    """The `train` section of `rlhf dpo`: the shared one with DPO's defaults."""

    out_dir: str = "runs/dpo"
    """Run directory: config.yaml, metrics.jsonl, checkpoints/, final/policy (and
    final/adapter under LoRA), report.html."""
    lr: float = 1.0e-6
    """AdamW learning rate (DPO moves a policy far at small rates)."""


@dataclass
class DPOConfig:
    """Everything `rlhf dpo` needs."""

    model: PolicyConfig = field(default_factory=PolicyConfig)
    data: DPODataConfig = field(default_factory=DPODataConfig)
    dpo: DPOLossConfig = field(default_factory=DPOLossConfig)
    train: DPOTrainConfig = field(default_factory=DPOTrainConfig)

    def validate(self) -> None:
        d = self.data
        if not d.train:
            raise ConfigError("data.train: a JSONL file of preferences is required")
        if not 0 <= d.eval_fraction < 1:
            raise ConfigError(f"data.eval_fraction: expected a value in [0, 1), got {d.eval_fraction}")
        if d.max_prompt_tokens <= 0 or d.max_prompt_tokens >= d.max_length:
            raise ConfigError(f"data.max_prompt_tokens: expected 1 to data.max_length - 1 ({d.max_length - 1}), "
                              f"got {d.max_prompt_tokens}")
        if self.dpo.beta <= 0:
            raise ConfigError(f"dpo.beta: expected > 0, got {self.dpo.beta}")
        self.train.validate()


class Sequences(NamedTuple):
    """Examples right-padded: ids and positions (B, L), and the first position whose token is
    learned in any row (the log-probs start there)."""

    ids: torch.Tensor
    positions: torch.Tensor
    first: int


def _first_learned(t: Tokens) -> int:
    """The position of an example's first learned token (its last token when none is)."""
    return next((i for i, m in enumerate(t.loss_mask) if m), len(t.ids) - 1)


def as_rollout(rows: list[Tokens], pad_id: int, device) -> Rollout:
    """Examples laid out as a PPO rollout: the tokens before the first learned one as the
    prompt (left-padded), the rest as the response (right-padded), its mask the loss mask;
    the rows of one pair then share their prompt. An example with no learned token keeps its
    last token as a masked response. The learned tokens of an example are one run (the
    response attends to what its mask covers). A batch is as wide as its longest prompt plus
    its longest response."""
    from rlhf.data import left_pad

    cuts = [_first_learned(t) for t in rows]
    for t, c in zip(rows, cuts):
        if 0 in t.loss_mask[c:] and 1 in t.loss_mask[t.loss_mask.index(0, c):]:
            raise ValueError("as_rollout: an example's learned tokens must be one run, after its prompt")
    prompt_ids, prompt_mask = left_pad([t.ids[:c] for t, c in zip(rows, cuts)], pad_id)
    width = max(len(t.ids) - c for t, c in zip(rows, cuts))
    response = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width))
    for r, (t, c) in enumerate(zip(rows, cuts)):
        response[r, :len(t.ids) - c] = torch.tensor(t.ids[c:])
        mask[r, :len(t.ids) - c] = torch.tensor(t.loss_mask[c:], dtype=mask.dtype)
    return Rollout(prompt_ids.to(device), prompt_mask.to(device), response.to(device), mask.to(device),
                   torch.zeros(len(rows), dtype=torch.bool, device=device))


class PreferencePair(NamedTuple):
    """One preference, tokenized: the chosen and the rejected prompt + response."""

    chosen: Tokens
    rejected: Tokens
    line: int
    """The line of the file it comes from (the pairs of one ranking share it)."""


def load_pairs(path: str, tokenizer, cfg: DPODataConfig) -> list[PreferencePair]:
    """Tokenized preference pairs; a malformed line, or a pair that the length limit makes
    the same tokens, stops with its file and line."""
    prefs = load_preferences(path)
    prompts = sorted({p.prompt for p in prefs})
    prompt_ids = dict(zip(prompts, tokenize_prompts([Prompt(text=p) for p in prompts], tokenizer,
                                                    cfg.max_prompt_tokens, cfg.chat_template, cfg.system_prompt)))
    responses = sorted({r for p in prefs for r in (p.chosen, p.rejected)})
    response_ids = {r: encode_response(tokenizer, r) for r in responses}
    pairs = []
    for p in prefs:
        where, ids = f"{Path(path).expanduser()} line {p.line}", prompt_ids[p.prompt]
        if not ids:
            raise DataError(f"{where}: the prompt is empty and the tokenizer adds no BOS, so the response's first "
                            "token has nothing to follow; give a prompt or turn data.chat_template on")
        chosen = prompt_and_response(ids, response_ids[p.chosen], cfg.max_length)
        rejected = prompt_and_response(ids, response_ids[p.rejected], cfg.max_length)
        if chosen.ids == rejected.ids:
            raise DataError(f"{where}: `chosen` and `rejected` are the same once cut to data.max_length="
                            f"{cfg.max_length} tokens (a tie given as a preference); raise data.max_length")
        pairs.append(PreferencePair(chosen, rejected, p.line))
    return pairs


class PairTerms(NamedTuple):
    """The DPO terms of B pairs."""

    losses: torch.Tensor
    """(B,) per-pair loss."""
    chosen: torch.Tensor
    """(B,) implicit rewards of the chosen responses, beta * (log pi - log pi_ref), detached."""
    rejected: torch.Tensor
    """(B,) implicit rewards of the rejected responses, detached."""
    logps: torch.Tensor
    """(2B,) the policy's sequence log-probs, chosen then rejected, detached."""
    ref: torch.Tensor
    """(2B,) the reference's sequence log-probs, in the same order."""


class DPOTrainer(OfflineTrainer):
    """`rlhf dpo`: the items are preference pairs; the loss is their mean DPO (or IPO) loss."""

    command = "dpo"
    config_cls = DPOConfig
    resumable = RESUMABLE + ("dpo.share_prompt",)  # a switch of speed that keeps the maths
    needs_reference = True

    def __init__(self, cfg: DPOConfig, accelerator=None, **options):
        self._eval_ref: dict[int, torch.Tensor] = {}  # held-out batch -> the reference's log-probs
        super().__init__(cfg, accelerator, **options)

    def load_items(self) -> tuple[list, list]:
        d = self.cfg.data
        pairs = load_pairs(d.train, self.tokenizer, d)
        if d.eval:
            return pairs, load_pairs(d.eval, self.tokenizer, d)
        return split_by_line(pairs, d.eval_fraction, self.cfg.train.seed)

    def sequences(self, item) -> list[Tokens]:
        return [item.chosen, item.rejected]

    def _logprobs(self, model, batch: "Rollout | Sequences", prefix_model) -> torch.Tensor:
        """Log-probs of the learned tokens' positions of `batch` (`_layout`)."""
        if isinstance(batch, Rollout):
            return policy_forward(model, batch, 1.0, self.precision, share_prefix=True, prefix_model=prefix_model)[0]
        return token_logprobs(model, batch.ids, batch.positions, self.precision, batch.first)

    def _layout(self, rows: list[Tokens]) -> tuple["Rollout | Sequences", torch.Tensor]:
        """(batch, loss mask of its log-probs): a rollout whose prompts are computed once per
        distinct prompt (`as_rollout`) where sharing is on and that computes fewer positions;
        else the sequences right-padded, the vocabulary projection from the first learned
        token on (no batch is wider than its longest sequence)."""
        pad, device = self.tokenizer.pad_token_id, self.engine.device
        cuts = [_first_learned(t) for t in rows]
        if self.share_prompt:
            distinct = len({tuple(t.ids[:c]) for t, c in zip(rows, cuts)})
            shared = distinct * (max(cuts) - 1) + len(rows) * (max(len(t.ids) - c for t, c in zip(rows, cuts)) + 1)
            if shared < len(rows) * max(len(t.ids) for t in rows):
                rollout = as_rollout(rows, pad, device)
                return rollout, rollout.response_mask
        ids, positions, mask = collate([[t] for t in rows], pad, device)
        first = min(cuts)
        return Sequences(ids, positions, first), mask[:, first - 1:]

    @torch.no_grad()
    def _reference_logprobs(self, batch: "Rollout | Sequences") -> torch.Tensor:
        if self.ref is not None:
            return self._logprobs(self.ref, batch, self.ref)
        policy = self.unwrapped_policy()
        with policy.disable_adapter():
            return self._logprobs(policy, batch, policy)

    @functools.cached_property
    def share_prompt(self) -> bool:
        """dpo.share_prompt where the forwards can share (`rlhf.prefix.forwards_share`)."""
        return self.cfg.dpo.share_prompt and forwards_share(self.unwrapped_policy(),
                                                            bool(self.cfg.model.gradient_checkpointing),
                                                            getattr(self.engine, "shards_parameters", False))

    def _pair_terms(self, model, items: list[PreferencePair], ref: torch.Tensor | None = None) -> PairTerms:
        """The DPO terms of pairs, chosen sequences first, then rejected, in one forward of the
        policy (two calls of it when the pairs' prompts are shared) and of the reference,
        unless its sequence log-probs `ref` are given."""
        batch, mask = self._layout([p.chosen for p in items] + [p.rejected for p in items])
        average = self.cfg.dpo.loss == "ipo"
        if ref is None:
            ref = algos.sequence_logprobs(self._reference_logprobs(batch), mask, average)
        logps = algos.sequence_logprobs(self._logprobs(model, batch, self.unwrapped_policy()), mask, average)
        n = len(items)
        losses, chosen, rejected = algos.dpo_loss(logps[:n], logps[n:], ref[:n], ref[n:], self.cfg.dpo.beta,
                                                  self.cfg.dpo.loss)
        return PairTerms(losses, chosen, rejected, logps.detach(), ref)

    @staticmethod
    def _shares(terms: PairTerms, total: float, prefix: str = "") -> dict[str, float]:
        """Sums of the pair statistics divided by `total` (the pairs they are a mean over)."""
        n, chosen, rejected = len(terms.chosen), terms.chosen, terms.rejected
        values = {"loss": terms.losses.detach(), "rewards/chosen": chosen, "rewards/rejected": rejected,
                  "rewards/margin": chosen - rejected, "rewards/accuracy": (chosen > rejected).float(),
                  "logps/chosen": terms.logps[:n], "logps/rejected": terms.logps[n:]}
        sums = torch.stack([v.sum() for v in values.values()]).div(total).tolist()
        return {prefix + k: s for k, s in zip(values, sums)}

    def micro_batch(self, items: list, batch_size: float) -> tuple[torch.Tensor, dict[str, float]]:
        terms = self._pair_terms(self.policy, items)
        shares = self._shares(terms, batch_size)
        shares["train/loss"] = shares.pop("loss")
        return terms.losses.sum() / batch_size, shares

    @torch.no_grad()
    def evaluate(self) -> dict[str, float]:
        """The held-out pairs' mean loss and implicit-reward statistics, under `eval/`. The
        reference's log-probs of the held-out pairs never change: computed at the first call."""
        if not self.eval_items:
            return {}
        model, bs, out = self.unwrapped_policy().eval(), self.cfg.train.eval_batch_size, {}
        for b, start in enumerate(range(0, len(self.eval_items), bs)):
            terms = self._pair_terms(model, self.eval_items[start:start + bs], self._eval_ref.get(b))
            self._eval_ref[b] = terms.ref
            for k, v in self._shares(terms, len(self.eval_items), prefix="eval/").items():
                out[k] = out.get(k, 0.0) + v
        return out
