"""A cheap reward function for the GRPO speed comparison, callable by both trainers.

rlhf calls it as `fn(prompts, responses)` with strings; TRL's GRPOTrainer calls it with
keyword arguments (`prompts=`, `completions=`, ...), where a conversational completion is a
list of messages. The score is the share of letters among the response's characters, so it
varies between samples and costs nothing next to a model forward.
"""


def _text(completion) -> str:
    if isinstance(completion, str):
        return completion
    return "".join(m["content"] for m in completion)


def letter_share(prompts, completions, **kwargs) -> list[float]:
    texts = [_text(c) for c in completions]
    return [sum(ch.isalpha() for ch in t) / max(len(t), 1) for t in texts]
