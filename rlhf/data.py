"""Prompts: loading from JSONL, text or `datasets` directories, tokenising, streaming in order."""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import torch

from rlhf.errors import UserInputError

log = logging.getLogger(__name__)


class DataError(UserInputError):
    """A data file that cannot be read as the documented format; names file and line."""


@dataclass
class Prompt:
    text: str
    """The prompt as the user wrote it (what a reward function or text reward model sees)."""
    messages: list | None = None
    """Chat messages, when the prompt was given as a conversation."""
    metadata: dict = field(default_factory=dict)
    """The record's other fields (e.g. `answer`, the ground truth a checker compares with):
    what reward functions with a `metadata` keyword get for this prompt."""
    where: str = ""
    """Where the record is ("FILE line N"), for messages; empty for a plain-text prompt."""


def read_jsonl(path: Path, error_cls: type[Exception]) -> Iterator[tuple[int, str, dict]]:
    """Yield `(lineno, where, record)` for each non-blank line of a JSONL file: the 1-based
    line number, "PATH line N" for messages, and the parsed object. A line that is not UTF-8,
    not JSON or not a JSON object raises `error_cls` naming the file and the line."""
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, 1):
            where = f"{path} line {lineno}"
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError:
                raise error_cls(f"{where}: not UTF-8 text") from None
            if not line.strip():
                continue
            try:
                record = json.loads(line.rstrip("\r\n"))  # the line's own end is no part of its JSON
            except json.JSONDecodeError as e:
                raise error_cls(f"{where}: not valid JSON (column {e.colno}: {e.msg.removesuffix(' at')}); expected "
                                "JSONL, one JSON object a line") from None
            if not isinstance(record, dict):
                raise error_cls(f"{where}: expected a JSON object, got {type(record).__name__}")
            yield lineno, where, record


ROLES = ("system", "developer", "user", "assistant", "tool", "ipython")
"""The chat roles that chat templates know; another role would be rendered as written."""


def check_roles(messages: list[dict], where: str) -> None:
    """Each message's role is one of ROLES, else a DataError naming the message."""
    for i, m in enumerate(messages):
        if not isinstance(m["role"], str) or m["role"] not in ROLES:
            raise DataError(f"{where}: messages[{i}].role: expected one of {', '.join(ROLES)}, got {m['role']!r}")


def _prompt_from_record(record: dict, where: str, column: str = "prompt") -> Prompt:
    metadata = {k: v for k, v in record.items() if k not in (column, "messages")}
    if "messages" in record and column == "prompt":
        messages = record["messages"]
        if not isinstance(messages, list) or not messages or not all(
            isinstance(m, dict) and "role" in m and isinstance(m.get("content"), str) for m in messages
        ):
            raise DataError(f"{where}: `messages` must be a non-empty list of {{role, content}} objects")
        check_roles(messages, where)
        return Prompt(text="\n".join(m["content"] for m in messages), messages=messages, metadata=metadata, where=where)
    if column in record:
        if not isinstance(record[column], str) or not record[column].strip():
            raise DataError(f"{where}: `{column}` must be a non-empty string")
        return Prompt(text=record[column], metadata=metadata, where=where)
    fields = "a `prompt` or `messages` field" if column == "prompt" else f"a `{column}` field (data.prompt_column)"
    raise DataError(f"{where}: expected {fields}, found {sorted(record)}")


def read_text_lines(path: Path) -> list[str]:
    """The lines of a UTF-8 text file; a line that is not UTF-8 is named."""
    lines = []
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, 1):
            try:
                lines.append(raw.decode("utf-8").rstrip("\r\n"))
            except UnicodeDecodeError:
                raise DataError(f"{path} line {lineno}: not UTF-8 text") from None
    return lines


TABLES = {".parquet": "parquet", ".csv": "csv", ".tsv": "csv"}
"""Table files read through `datasets`, by suffix."""


def _records(path: Path) -> Iterator[tuple[str, dict]]:
    """(where, record) for each record of a `save_to_disk` directory, a Parquet or CSV table,
    a JSON array or a JSONL file."""
    import datasets

    if path.is_dir() or path.suffix in TABLES:
        try:
            if path.is_dir():
                ds = datasets.load_from_disk(str(path))
            else:
                kwargs = {"delimiter": "\t"} if path.suffix == ".tsv" else {}
                ds = datasets.load_dataset(TABLES[path.suffix], data_files=str(path), split="train", **kwargs)
        except Exception as e:  # datasets raises several types for a file or directory it cannot read
            kind = "a dataset saved with save_to_disk" if path.is_dir() else f"a {TABLES[path.suffix]} table"
            raise DataError(f"data.prompts: {path} is not {kind} ({str(e).splitlines()[0] if str(e) else e!r})") from None
        if isinstance(ds, datasets.DatasetDict):
            ds = ds["train"] if "train" in ds else next(iter(ds.values()))
        for i, record in enumerate(ds):
            yield f"{path} row {i}", record
    elif path.suffix == ".json" and path.read_bytes().lstrip()[:1] == b"[":
        try:
            records = json.loads(path.read_bytes())
        except ValueError as e:
            raise DataError(f"{path}: not valid JSON ({e})") from None
        for i, record in enumerate(records):
            if not isinstance(record, dict):
                raise DataError(f"{path} item {i}: expected a JSON object, got {type(record).__name__}")
            yield f"{path} item {i}", record
    else:
        for _, where, record in read_jsonl(path, DataError):
            yield where, record


def load_prompts(path: str | Path, column: str = "prompt") -> list[Prompt]:
    """Prompts from a JSONL or JSON file, a Parquet or CSV table, a `datasets.save_to_disk`
    directory (records with a `column` field, or chat `messages`), or a text file (one a line)."""
    path = Path(path).expanduser()
    if not path.exists():
        raise DataError(f"data.prompts: {path} does not exist")
    if path.is_dir() or path.suffix in (".jsonl", ".json", *TABLES):
        prompts = [_prompt_from_record(record, where, column) for where, record in _records(path)]
    else:
        prompts = [Prompt(text=line) for line in read_text_lines(path) if line.strip()]
    if not prompts:
        raise DataError(f"data.prompts: {path} holds no prompts")
    return prompts


def tokenize_prompts(
    prompts: list[Prompt],
    tokenizer,
    max_tokens: int,
    chat_template: bool = True,
    system_prompt: str | None = None,
) -> list[list[int]]:
    """Token ids of each prompt; the chat template is applied when asked and available.

    Prompts longer than `max_tokens` keep their last `max_tokens` tokens (the end of a prompt
    is what the response continues); one warning says how many were cut.
    """
    use_template = chat_template and getattr(tokenizer, "chat_template", None)
    if not use_template and (system_prompt or any(p.messages for p in prompts)):
        log.warning("no chat template in use (data.chat_template=%s, the tokenizer has %s): chat prompts are their "
                    "contents joined by newlines, without roles, and data.system_prompt is not used",
                    chat_template, "one" if getattr(tokenizer, "chat_template", None) else "none")
    out, truncated, longest = [], 0, 0
    for p in prompts:
        if use_template:
            messages = p.messages or [{"role": "user", "content": p.text}]
            if system_prompt and messages[0]["role"] != "system":
                messages = [{"role": "system", "content": system_prompt}, *messages]
            ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=False)
            if isinstance(ids, dict) or hasattr(ids, "input_ids"):
                ids = ids["input_ids"]
            ids = list(ids)
        else:
            ids = tokenizer(p.text, add_special_tokens=True)["input_ids"]
        if len(ids) > max_tokens:
            truncated, longest = truncated + 1, max(longest, len(ids))
            ids = ids[-max_tokens:]
        out.append(ids)
    if truncated:
        with_template = " (counted with the chat template, whose start is cut too)" if use_template else ""
        log.warning("%d of %d prompts were longer than data.max_prompt_tokens=%d%s and were truncated from the left; "
                    "the longest had %d tokens", truncated, len(prompts), max_tokens, with_template, longest)
    return out


def left_pad(sequences: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-padded ids and attention mask (generation continues from the right edge)."""
    width = max(len(s) for s in sequences)
    ids = torch.full((len(sequences), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(sequences), width), dtype=torch.long)
    for i, s in enumerate(sequences):
        ids[i, width - len(s):] = torch.tensor(s, dtype=torch.long)
        mask[i, width - len(s):] = 1
    return ids, mask


class PromptStream:
    """Shuffled prompts, epoch after epoch, with a position that resumes exactly.

    Every process shares the order (same seed) and takes its own shard of each global batch.
    """

    def __init__(self, n: int, seed: int, rank: int = 0, world_size: int = 1):
        self.n, self.seed, self.rank, self.world_size = n, seed, rank, world_size
        self.epoch, self.position = 0, 0
        self._order = self._permutation()

    def _permutation(self) -> list[int]:
        g = torch.Generator().manual_seed(self.seed * 100003 + self.epoch)
        return torch.randperm(self.n, generator=g).tolist()

    def next_batch(self, batch_size: int) -> list[int]:
        """Indices of this process's `batch_size` prompts for the next step."""
        global_batch = []
        while len(global_batch) < batch_size * self.world_size:
            if self.position == self.n:
                self.epoch, self.position = self.epoch + 1, 0
                self._order = self._permutation()
            global_batch.append(self._order[self.position])
            self.position += 1
        return global_batch[self.rank * batch_size:(self.rank + 1) * batch_size]

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "position": self.position}

    def load_state_dict(self, state: dict) -> None:
        self.epoch, self.position = int(state["epoch"]), int(state["position"])
        self._order = self._permutation()
