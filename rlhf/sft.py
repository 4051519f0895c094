"""Supervised fine-tuning: demonstrations -> a policy that `rlhf ppo` or `rlhf dpo` starts from.

`rlhf sft CONFIG.yaml [key=value ...]` trains a causal LM on JSONL records of two kinds:

- `messages`: a chat, rendered with the tokenizer's chat template; the loss reads the
  assistant turns only (their content and the template's end-of-turn token);
- `prompt` + `completion`: the prompt rendered as PPO renders prompts (a user message with
  the generation prompt, when `data.chat_template` is on and the tokenizer has a template),
  the completion followed by EOS; the loss reads the completion only.

The loss is the mean negative log-likelihood over the learned tokens of a batch
(`rlhf.algos.sft_loss`). Short examples are packed into rows of up to `data.max_length`
tokens, each keeping its own positions and attention (`rlhf.offline`). The run directory
holds config.yaml, metrics.jsonl (`train/loss`, `eval/loss`), checkpoints/ and
final/policy, a model plain transformers loads and `model.policy` accepts.
"""

from __future__ import annotations

import random
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple, Optional

import torch

from rlhf import algos
from rlhf.config import ConfigError, PolicyConfig
from rlhf.data import DataError, Prompt, check_roles, read_jsonl, tokenize_prompts
from rlhf.offline import (OfflineTrainConfig, OfflineTrainer, Tokens, check_packing, collate, encode_response,
                          prompt_and_response, token_logprobs)
from rlhf.reward_model import split_by_line


@dataclass
class SFTDataConfig:
    train: str = ""
    """Demonstrations, JSONL: one object a line with `messages` (a list of {role, content};
    at least one `assistant` turn) or `prompt` and `completion` (strings)."""
    eval: Optional[str] = None
    """Held-out demonstrations in the same format (default: `eval_fraction` of train's
    lines, drawn with train.seed)."""
    eval_fraction: float = 0.05
    """Share of train's lines held out when `eval` is not given (0: no evaluation)."""
    max_length: int = 512
    """Most tokens per example (longer ones lose their end) and per packed row."""
    packing: bool = True
    """Put several short examples into one row of up to max_length tokens; each keeps its
    own positions and attends only to itself. The loss is the same as unpacked, with less
    padding computed."""
    completion_only_loss: bool = True
    """Learn the completion (assistant) tokens only; off: every token but the first."""
    chat_template: bool = True
    """`prompt`/`completion` records: render the prompt as one user message in the
    tokenizer's chat template (as `rlhf ppo` renders its prompts), when it has one."""
    system_prompt: Optional[str] = None
    """A system message put before each `prompt` rendered with the chat template."""


@dataclass
class SFTConfig:
    """Everything `rlhf sft` needs."""

    model: PolicyConfig = field(default_factory=PolicyConfig)
    data: SFTDataConfig = field(default_factory=SFTDataConfig)
    train: OfflineTrainConfig = field(default_factory=OfflineTrainConfig)

    def validate(self) -> None:
        if not self.data.train:
            raise ConfigError("data.train: a JSONL file of demonstrations is required")
        if not 0 <= self.data.eval_fraction < 1:
            raise ConfigError(f"data.eval_fraction: expected a value in [0, 1), got {self.data.eval_fraction}")
        if self.data.max_length < 8:
            raise ConfigError(f"data.max_length: expected at least 8 tokens, got {self.data.max_length}")
        self.train.validate()


# --------------------------------------------------------------------------------------
# Demonstrations -> tokens
# --------------------------------------------------------------------------------------


class Demonstration(NamedTuple):
    """One record, tokenized."""

    tokens: Tokens
    line: int
    """The line of the file it comes from (the held-out split draws lines)."""


def _render(tokenizer, messages: list, generation_prompt: bool) -> str:
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation_prompt)


def assistant_spans(tokenizer, messages: list, where: str) -> tuple[str, list[tuple[int, int]]]:
    """The rendered chat and the character span of each assistant turn in it: from the end of
    the conversation before it rendered with the generation prompt, to the end of the
    conversation up to it (trailing whitespace left out). Every partial rendering must be a
    prefix of the whole: a template that rewrites earlier turns has no such spans."""
    text = _render(tokenizer, messages, False)
    spans = []
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        if i == 0:
            raise DataError(f"{where}: the chat starts with an assistant turn; it needs a turn before it")
        before, upto = _render(tokenizer, messages[:i], True), _render(tokenizer, messages[:i + 1], False)
        if not (upto.startswith(before) and text.startswith(upto)):
            raise DataError(f"{where}: the chat template renders the start of this chat differently from the whole "
                            "chat, so its assistant turns cannot be found; use prompt/completion records")
        spans.append((len(before), len(upto.rstrip())))
    return text, spans


def chat_tokens(tokenizer, messages: list, completion_only: bool, where: str) -> Tokens:
    """A chat's token ids (its chat-template rendering), the loss on its assistant turns."""
    text, spans = assistant_spans(tokenizer, messages, where)
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    ids = enc["input_ids"]
    if completion_only:
        mask = [int(any(a <= start < b for a, b in spans)) for start, _ in enc["offset_mapping"]]
    else:
        mask = [1] * len(ids)
    mask[0] = 0
    return Tokens(ids, mask)


def _check_messages(record: dict, where: str) -> list:
    messages = record["messages"]
    if not isinstance(messages, list) or not messages or not all(
            isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)
            for m in messages):
        raise DataError(f"{where}: `messages` must be a non-empty list of {{role, content}} objects with string values")
    check_roles(messages, where)
    if not any(m["role"] == "assistant" for m in messages):
        raise DataError(f"{where}: `messages` has no assistant turn to learn from")
    return messages


def _check_pair(record: dict, where: str) -> tuple[str, str]:
    for key in ("prompt", "completion"):
        if key not in record:
            raise DataError(f"{where}: missing field `{key}` (expected `messages`, or `prompt` and `completion`; "
                            f"found {sorted(record)})")
        if not isinstance(record[key], str):
            raise DataError(f"{where}: `{key}` must be a string, got {type(record[key]).__name__}")
    if not record["completion"].strip():
        raise DataError(f"{where}: `completion` is empty")
    return record["prompt"], record["completion"]


def load_demonstrations(path: str, tokenizer, cfg: SFTDataConfig) -> list[Demonstration]:
    """Tokenized demonstrations of a JSONL file; a malformed line, or one whose learned tokens
    the length limit cuts entirely, stops with its file and line."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise DataError(f"{path}: demonstrations file not found")
    chats, pairs = [], []
    for lineno, where, record in read_jsonl(path, DataError):
        if "messages" in record:
            if not getattr(tokenizer, "chat_template", None):
                raise DataError(f"{where}: `messages` need a chat template and the tokenizer has none; "
                                "use prompt/completion records")
            if not tokenizer.is_fast:
                raise DataError(f"{where}: `messages` need a fast tokenizer (character offsets of tokens)")
            chats.append((lineno, where, chat_tokens(tokenizer, _check_messages(record, where),
                                                     cfg.completion_only_loss, where)))
        else:
            pairs.append((lineno, where, *_check_pair(record, where)))
    # Prompts are not cut here: the length limit applies to the whole example below.
    prompt_ids = tokenize_prompts([Prompt(text=p) for _, _, p, _ in pairs], tokenizer, sys.maxsize,
                                  cfg.chat_template, cfg.system_prompt) if pairs else []
    for (lineno, where, _, completion), ids in zip(pairs, prompt_ids):
        tokens = prompt_and_response(ids, encode_response(tokenizer, completion))
        if not cfg.completion_only_loss:
            tokens = Tokens(tokens.ids, [0] + [1] * (len(tokens.ids) - 1))
        chats.append((lineno, where, tokens))
    out = []
    for lineno, where, tokens in sorted(chats, key=lambda c: c[0]):
        cut = Tokens(tokens.ids[:cfg.max_length], tokens.loss_mask[:cfg.max_length])
        if not any(cut.loss_mask):
            raise DataError(f"{where}: data.max_length={cfg.max_length} cuts every learned token (the example has "
                            f"{len(tokens.ids)} tokens, the first learned one at {tokens.loss_mask.index(1)})")
        out.append(Demonstration(cut, lineno))
    if not out:
        raise DataError(f"{path}: holds no demonstrations")
    return out


def pack(examples: list[Tokens], max_length: int, packing: bool) -> list[list[Tokens]]:
    """Rows of examples in the given order: with packing, each row takes the next examples
    while they fit in max_length tokens; without, one example a row."""
    if not packing:
        return [[t] for t in examples]
    rows: list[list[Tokens]] = []
    used = 0
    for t in examples:
        if not rows or used + len(t.ids) > max_length:
            rows.append([])
            used = 0
        rows[-1].append(t)
        used += len(t.ids)
    return rows


# --------------------------------------------------------------------------------------
# The trainer
# --------------------------------------------------------------------------------------


class SFTTrainer(OfflineTrainer):
    """`rlhf sft`: the items are rows of packed demonstrations; the loss is their token mean."""

    command = "sft"
    config_cls = SFTConfig

    def load_items(self) -> tuple[list, list]:
        d, seed = self.cfg.data, self.cfg.train.seed
        demos = load_demonstrations(d.train, self.tokenizer, d)
        if d.eval:
            train, held = demos, load_demonstrations(d.eval, self.tokenizer, d)
        else:
            train, held = split_by_line(demos, d.eval_fraction, seed)
        random.Random(seed).shuffle(train)  # rows mix examples from across the file
        return pack([x.tokens for x in train], d.max_length, d.packing), \
            pack([x.tokens for x in held], d.max_length, d.packing)

    def check_model(self, policy) -> None:
        if self.cfg.data.packing:
            check_packing(policy)

    def sequences(self, item) -> list[Tokens]:
        return item

    def batch_size(self, items: list) -> float:
        learned = sum(sum(t.loss_mask) for row in items for t in row)
        return self.engine.sum(torch.tensor(float(learned), device=self.engine.device)).item()

    def micro_batch(self, items: list, batch_size: float) -> tuple[torch.Tensor, dict[str, float]]:
        ids, positions, mask = collate(items, self.tokenizer.pad_token_id, self.engine.device)
        loss = algos.sft_loss(token_logprobs(self.policy, ids, positions, self.precision), mask, batch_size)
        return loss, {"train/loss": loss.item(), "train/tokens": mask.sum().item()}

    @torch.no_grad()
    def evaluate(self) -> dict[str, float]:
        """eval/loss: the mean negative log-likelihood per learned held-out token."""
        if not self.eval_items:
            return {}
        model, bs = self.unwrapped_policy().eval(), self.cfg.train.eval_batch_size
        total = float(sum(sum(t.loss_mask) for row in self.eval_items for t in row))
        loss = 0.0
        for start in range(0, len(self.eval_items), bs):
            ids, positions, mask = collate(self.eval_items[start:start + bs], self.tokenizer.pad_token_id,
                                           self.engine.device)
            loss += algos.sft_loss(token_logprobs(model, ids, positions, self.precision), mask, total).item()
        return {"eval/loss": loss}
