"""Reward signals: a sequence-classification reward model or Python functions (one, or
several weighted), and the post-processing of their scores (normalisation, clipping,
missing-EOS penalty, baseline, DAPO's overlong penalty)."""

from __future__ import annotations

import importlib
import inspect
import math
from pathlib import Path
from typing import Callable

import torch

from rlhf import algos
from rlhf.config import RewardConfig
from rlhf.errors import UserInputError
from rlhf.models import load_reward_model, load_tokenizer, read_reward_stats, resolve_model
from rlhf.precision import FP32, Precision
from rlhf.rollout import position_ids


class RewardError(UserInputError):
    """A reward function or model that misbehaves; names which and how."""


def import_function(spec: str, field: str) -> Callable:
    """`module:function` -> the callable (the working directory is importable)."""
    import sys

    if ":" not in spec:
        raise RewardError(f"{field}: expected 'module:function', got {spec!r}")
    module_name, func_name = spec.split(":", 1)
    if "" not in sys.path and str(Path.cwd()) not in sys.path:
        sys.path.insert(0, str(Path.cwd()))
    try:
        module = importlib.import_module(module_name)
    except ImportError as e:
        raise RewardError(f"{field}: cannot import module {module_name!r} ({e})") from None
    fn = getattr(module, func_name, None)
    if not callable(fn):
        raise RewardError(f"{field}: {module_name} has no function {func_name!r}")
    return fn


def accepts_metadata(fn: Callable) -> bool:
    """Whether `fn` takes a `metadata` keyword (or any keyword): it then gets each prompt's record."""
    try:
        params = inspect.signature(fn).parameters.values()
    except (TypeError, ValueError):
        return False
    return any(p.name == "metadata" and p.kind != p.POSITIONAL_ONLY or p.kind == p.VAR_KEYWORD for p in params)


def _where(error: BaseException) -> str:
    """ ' (FILE line N, in NAME)': the innermost frame of the error that is the user's code (not
    the Python installation's, not rlhf's), else the innermost one."""
    import sys
    import traceback

    frames = traceback.extract_tb(error.__traceback__)[1:]  # the first is the call here
    installed = [Path(p).resolve() for p in {sys.prefix, sys.base_prefix, Path(__file__).parent}]
    own = [f for f in frames if not any(Path(f.filename).resolve().is_relative_to(p) for p in installed)]
    frame = (own or frames or [None])[-1]
    return f" ({frame.filename} line {frame.lineno}, in {frame.name})" if frame else ""


def call_text_function(fn: Callable, prompts: list[str], responses: list[str], field: str,
                       metadata: list[dict] | None = None) -> torch.Tensor:
    """Call a `(prompts, responses) -> list[float]` function and check what comes back; a
    function that takes a `metadata` keyword also gets `metadata`, one dict per response (the
    fields of its prompt's record, e.g. `answer`)."""
    kwargs = {"metadata": list(metadata)} if metadata is not None and accepts_metadata(fn) else {}
    try:
        out = fn(list(prompts), list(responses), **kwargs)
    except UserInputError:
        raise
    except Exception as e:
        raise RewardError(f"{field}: the function raised {type(e).__name__}: {e}{_where(e)}") from e
    values = real_numbers(out, field)
    if len(values) != len(responses):
        raise RewardError(f"{field}: returned {len(values)} scores for {len(responses)} responses")
    bad = [i for i, v in enumerate(values) if not math.isfinite(v)]
    if bad:
        raise RewardError(f"{field}: non-finite score {values[bad[0]]} for response {bad[0]}: {responses[bad[0]]!r}")
    return torch.tensor(values, dtype=torch.float32)


def _real_number(v) -> float | None:
    """`v` as a float when it is one real number (int, float, a numpy number, a tensor of
    one element), else None: a bool, a string such as "1.5", a container."""
    import numpy as np

    if isinstance(v, (bool, np.bool_)):
        return None
    if isinstance(v, (int, float, np.integer, np.floating)):
        return float(v)
    if isinstance(v, (torch.Tensor, np.ndarray)) and v.ndim == 0 and _real_dtype(v):
        return float(v.item())
    return None


def _real_dtype(x) -> bool:
    import numpy as np

    if isinstance(x, torch.Tensor):
        return x.dtype != torch.bool and not x.dtype.is_complex
    return np.issubdtype(x.dtype, np.integer) or np.issubdtype(x.dtype, np.floating)


def real_numbers(out, field: str) -> list[float]:
    """The scores a function returned, as floats: a list or tuple of real numbers, or a 1-D
    tensor or array of them. Anything else is refused, naming the first bad entry (a string
    or a bool is not silently converted; a dict, a generator or a 2-D tensor is not iterated)."""
    import numpy as np

    if isinstance(out, (torch.Tensor, np.ndarray)):
        if out.ndim != 1 or not _real_dtype(out):
            raise RewardError(f"{field}: expected one real number per response, got a {out.ndim}-D "
                              f"{type(out).__name__} of {out.dtype}")
        return [float(v) for v in out.tolist()]
    if not isinstance(out, (list, tuple)):
        raise RewardError(f"{field}: expected a list of numbers (one per response), got {type(out).__name__}")
    values = []
    for i, v in enumerate(out):
        number = _real_number(v)
        if number is None:
            raise RewardError(f"{field}: response {i}: expected a real number, got {type(v).__name__} {v!r:.60}")
        values.append(number)
    return values


class Reward:
    """Scores responses: `raw(prompts, responses, ...)` from a reward model or from reward
    functions (`reward.function`, or `reward.functions` weighted and summed), and
    `process(raw, has_eos, ...)`, the scores the policy is trained on.

    With reward functions, `model`, `path`, `tokenizer` and `stats` are None and
    `same_tokenizer` is False; `functions` lists `(name, function, weight)`."""

    def __init__(self, cfg: RewardConfig, policy_tokenizer, cache_dir: str | None = None, trust_remote_code: bool = False,
                 device: torch.device | str = "cpu", max_new_tokens: int | None = None):
        self.cfg = cfg
        self.device = torch.device(device)
        self.max_new_tokens = max_new_tokens
        self.fn = self.model = self.path = self.tokenizer = self.stats = None
        self.functions: list[tuple[str, Callable, float]] = []
        self.same_tokenizer = False
        if cfg.function:
            self.fn = import_function(cfg.function, "reward.function")
        elif cfg.functions:
            weights = cfg.weights if cfg.weights is not None else [1.0] * len(cfg.functions)
            self.functions = [(spec.rsplit(":", 1)[-1], import_function(spec, f"reward.functions[{i}]"), float(w))
                              for i, (spec, w) in enumerate(zip(cfg.functions, weights))]
        else:
            self.path = resolve_model(cfg.model, cache_dir, field="reward.model")
            self.model = load_reward_model(self.path, trust_remote_code).eval().requires_grad_(False).to(self.device)
            self.tokenizer = load_tokenizer(self.path, padding_side="right", trust_remote_code=trust_remote_code)
            self.tokenizer.truncation_side = "left"  # keep the end of the response, as in the model's training
            self.model.config.pad_token_id = self.tokenizer.pad_token_id
            self.stats = read_reward_stats(self.path)
            # Same vocabulary: score the policy's own tokens, no decode and re-tokenise.
            self.same_tokenizer = self.tokenizer.get_vocab() == policy_tokenizer.get_vocab()

    def raw(self, prompts: list[str], responses: list[str], sequence_ids: torch.Tensor | None = None,
            sequence_mask: torch.Tensor | None = None, precision: Precision = FP32,
            metadata: list[dict] | None = None) -> torch.Tensor:
        """Unprocessed scores, one per response (float32, on the reward's device).

        With a reward model, the input is the prompt text followed by the response text
        (`reward.include_prompt`), or, when the reward model shares the policy's tokenizer, the
        policy's own token ids (`sequence_ids`, left-padded prompt + response). Reward
        functions that take a `metadata` keyword get `metadata` (one dict per response).
        """
        return self.raw_and_components(prompts, responses, sequence_ids, sequence_mask, precision, metadata)[0]

    def check_prompts(self, prompts: list) -> None:
        """Refuse, before training, prompts whose records a reward function cannot score (a
        function's `check_record(record) -> problem or None`, as `rlhf.verifiable`'s checker
        has), naming the record's file and line."""
        named = ([("reward.function", self.fn)] if self.fn is not None
                 else [(f"reward.functions: {name}", fn) for name, fn, _ in self.functions])
        for field, fn in named:
            check = getattr(fn, "check_record", None)
            for i, prompt in enumerate(prompts if check is not None else []):
                problem = check(prompt.metadata)
                if problem:
                    raise RewardError(f"{prompt.where or f'prompt {i + 1}'}: {field}: {problem}")

    @torch.no_grad()
    def raw_and_components(self, prompts: list[str], responses: list[str], sequence_ids: torch.Tensor | None = None,
                           sequence_mask: torch.Tensor | None = None, precision: Precision = FP32,
                           metadata: list[dict] | None = None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """`raw(...)` and, with `reward.functions`, each function's own scores by its name
        (the weighted sum of which is the raw score); an empty dict otherwise."""
        if self.fn is not None:
            return call_text_function(self.fn, prompts, responses, "reward.function", metadata).to(self.device), {}
        if self.functions:
            components = {name: call_text_function(fn, prompts, responses, f"reward.functions: {name}", metadata)
                          .to(self.device) for name, fn, _ in self.functions}
            total = sum(w * components[name] for name, _, w in self.functions)
            return total, components
        return self._model_scores(prompts, responses, sequence_ids, sequence_mask, precision), {}

    def _model_scores(self, prompts, responses, sequence_ids, sequence_mask, precision) -> torch.Tensor:
        scores = []
        bs = self.cfg.batch_size
        use_ids = self.same_tokenizer and sequence_ids is not None and self.cfg.include_prompt
        for i in range(0, len(responses), bs):
            if use_ids:
                ids, mask = sequence_ids[i:i + bs], sequence_mask[i:i + bs]
                # Position ids follow the attention mask, as in generation (left padding).
                batch = {"input_ids": ids, "attention_mask": mask, "position_ids": position_ids(mask)}
            else:
                texts = [(p + r) if self.cfg.include_prompt else r for p, r in zip(prompts[i:i + bs], responses[i:i + bs])]
                batch = self.tokenizer(texts, return_tensors="pt", padding=True, truncation=True,
                                       max_length=self.cfg.max_length).to(self.device)
            with precision.autocast(self.device):
                logits = self.model(**batch).logits
            scores.append(logits[:, 0].float())
        return torch.cat(scores)

    def process(self, raw: torch.Tensor, has_eos: torch.Tensor, baseline: torch.Tensor | None = None,
                lengths: torch.Tensor | None = None) -> torch.Tensor:
        """Raw scores -> the scores PPO optimises: baseline, normalisation, clipping, EOS
        penalty, and DAPO's overlong penalty (`reward.overlong_buffer`, from the responses'
        `lengths` in tokens).

        A reward model's scale sets the effective KL coefficient, so scores are centred and
        scaled by the statistics saved with it (pitfall: clip or normalise raw scores).
        """
        scores = raw.clone()
        if baseline is not None:
            scores = scores - baseline
        if self.cfg.normalize and self.stats is not None:
            mean = 0.0 if baseline is not None else self.stats["mean"]
            scores = (scores - mean) / max(self.stats["std"], 1e-6)
        if self.cfg.clip is not None:
            scores = scores.clamp(-self.cfg.clip, self.cfg.clip)
        if self.cfg.missing_eos_penalty is not None:
            scores = torch.where(has_eos, scores, torch.full_like(scores, self.cfg.missing_eos_penalty))
        if self.cfg.overlong_buffer and lengths is not None:
            if self.max_new_tokens is None:
                raise ValueError("Reward: reward.overlong_buffer needs max_new_tokens (given at construction)")
            scores = scores + algos.overlong_penalty(lengths.to(scores.device), self.max_new_tokens,
                                                     self.cfg.overlong_buffer, self.cfg.overlong_penalty)
        return scores
