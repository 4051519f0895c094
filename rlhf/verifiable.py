"""Ready reward functions for verifiable answers: a checker and a format reward.

Use them as `reward.functions: [rlhf.verifiable:final_number, rlhf.verifiable:format_reward]`
with prompts whose JSONL records carry the ground truth in an `answer` field:

    {"prompt": "What is 17 + 25? Answer with just the number.", "answer": 42}

The final number of a response is, in this order of preference: the content of its last
`\\boxed{...}`; the number after its last "Answer:" / "answer is"; its last number. Numbers
are compared as exact fractions after normalisation: thousands separators (`1,234`), a
leading `+`, trailing zeros (`12.0`, `12.50`), a unicode minus, fractions (`3/4`) and the
text around them (`$12`, `12 apples.`) do not matter.
"""

from __future__ import annotations

import re
from fractions import Fraction

from rlhf.errors import UserInputError

__all__ = ["final_number", "format_reward", "extract_final_number", "normalize_number", "parse_number"]

# A number: optional sign (not when it follows a word or a closing bracket: "7-3" is 7 and 3),
# digits with optional thousands separators, an optional decimal part, an optional /denominator.
_NUMBER = re.compile(
    r"(?:(?<![\w)\]])[-+\u2212])?"
    r"(?:\d{1,3}(?:,\d{3})+|\d+)?(?:\.\d+|(?<=\d))"
    r"(?:\s*/\s*\d+)?"
)
_BOXED = re.compile(r"\\boxed\s*\{([^{}]*)\}")
_ANSWER = re.compile(r"(?:answer\s*(?:is|:|=)|answer\s+is\s*:?)\s*", re.IGNORECASE)
_ONLY_NUMBER = re.compile(r"^\s*(?:\\boxed\s*\{\s*)?(?:answer\s*[:=]\s*)?\$?\s*" + _NUMBER.pattern +
                          r"\s*%?\s*\}?\s*\.?\s*$", re.IGNORECASE)


def parse_number(text: str) -> Fraction | None:
    """`text` holding exactly one number (separators, sign, decimals or a fraction) as an
    exact Fraction; None when it is not a number."""
    cleaned = text.strip().replace("\u2212", "-").replace(",", "").replace(" ", "")
    if cleaned.startswith("+"):
        cleaned = cleaned[1:]
    try:
        return Fraction(cleaned)
    except (ValueError, ZeroDivisionError):
        return None


def _numbers(text: str) -> list[str]:
    return [m.group(0) for m in _NUMBER.finditer(text) if any(c.isdigit() for c in m.group(0))]


def extract_final_number(response: str) -> Fraction | None:
    """The response's final answer as a Fraction (see the module docstring for the order of
    preference), or None when it holds no number."""
    boxed = _BOXED.findall(response)
    if boxed:
        found = _numbers(boxed[-1])
        if found:
            return parse_number(found[-1])
    answers = list(_ANSWER.finditer(response))
    if answers:
        found = _numbers(response[answers[-1].end():])
        if found:
            return parse_number(found[0])
    found = _numbers(response)
    return parse_number(found[-1]) if found else None


def normalize_number(value) -> Fraction | None:
    """A ground-truth answer (int, float, or a string such as "1,234", "12.0", "-3/4") as an
    exact Fraction; None when it is not a number."""
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return Fraction(value)
    if isinstance(value, float):
        return Fraction(str(value))  # 0.1 as written, not its binary expansion
    if isinstance(value, str):
        found = _numbers(value)
        return parse_number(found[-1]) if len(found) == 1 else parse_number(value)
    return None


def _answers(metadata: list[dict] | None, n: int, name: str) -> list[Fraction]:
    if metadata is None or len(metadata) != n:
        raise UserInputError(f"rlhf.verifiable:{name}: needs each prompt's record (an `answer` field in the prompts "
                             "JSONL); none was given")
    out = []
    for i, record in enumerate(metadata):
        if "answer" not in record:
            raise UserInputError(f"rlhf.verifiable:{name}: prompt {i} has no `answer` field in its JSONL record "
                                 f"(fields: {sorted(record)})")
        truth = normalize_number(record["answer"])
        if truth is None:
            raise UserInputError(f"rlhf.verifiable:{name}: prompt {i}: `answer` {record['answer']!r} is not a number")
        out.append(truth)
    return out


def final_number(prompts: list[str], responses: list[str], metadata: list[dict] | None = None) -> list[float]:
    """1.0 when the response's final number equals the prompt record's `answer` exactly
    (after normalisation), else 0.0."""
    truths = _answers(metadata, len(responses), "final_number")
    return [float(extract_final_number(r) == t) for r, t in zip(responses, truths)]


def _check_answer(record: dict) -> str | None:
    """What `final_number` cannot use in a prompt's record, or None."""
    if "answer" not in record:
        return f"the record has no `answer` field (fields: {sorted(record)})"
    if normalize_number(record["answer"]) is None:
        return f"`answer` {record['answer']!r} is not a number"
    return None


final_number.check_record = _check_answer  # checked for every prompt when a run starts (Reward.check_prompts)


def format_reward(prompts: list[str], responses: list[str]) -> list[float]:
    """1.0 when the whole response is its answer: a lone number, `Answer: N` or `\\boxed{N}`
    (surrounding spaces and a final full stop allowed), else 0.0."""
    return [float(bool(_ONLY_NUMBER.match(r))) for r in responses]
