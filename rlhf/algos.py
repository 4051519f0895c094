"""The mathematics of RLHF as pure functions over tensors.

No models, no I/O, no config objects: log-probs, masked statistics, KL estimators, the
advantage estimators (GAE, and the critic-free GRPO, Dr. GRPO, RLOO, REINFORCE++), and the
losses of PPO (with clip-higher and dual clip), GSPO, A2C, the critic and the Bradley-Terry
reward model.

Conventions used throughout:

- Per-token tensors have shape (batch, response_len).
- `mask` is 1 on real response tokens and 0 on padding; bool, integer and float masks are
  accepted and any nonzero entry counts as real. Padding never changes a number on a real
  token or a statistic: padded inputs are replaced by 0 *before* any arithmetic (a large or
  non-finite value times a 0 mask would still be NaN), and padded outputs are 0.
- Bad input (mismatched shapes, integer log-probs, an all-zero mask, an out-of-range
  hyper-parameter) raises a ValueError that names the argument, never a silent NaN.
"""

from __future__ import annotations

import math
from typing import Callable

import torch
import torch.nn.functional as F

KL_KINDS = ("k1", "k2", "k3", "abs")

# logprobs_from_logits / entropy_from_logits convert at most this many logits to fp32 at a
# time (4 MiB, about 20 positions of a 50k vocabulary): a bf16 (batch, len, vocab) tensor
# never gets a full fp32 twin, and the temporaries of a chunk stay in the CPU's cache.
_FP32_CHUNK_ELEMENTS = 2**20


# --------------------------------------------------------------------------------------
# Input checks, written once
# --------------------------------------------------------------------------------------


def _check_tensors(mask: torch.Tensor | None = None, **tensors: torch.Tensor) -> torch.Tensor | None:
    """Check that `tensors` are floating point and share one shape, and that `mask` has that
    shape and at least one real token. Returns the mask as bool (None if none was given)."""
    shape, first = None, None
    for name, t in tensors.items():
        if not isinstance(t, torch.Tensor):
            raise ValueError(f"{name}: expected a torch.Tensor, got {type(t).__name__}")
        if not t.is_floating_point():
            raise ValueError(f"{name}: expected a floating-point tensor, got dtype {t.dtype}")
        if shape is None:
            shape, first = t.shape, name
        elif t.shape != shape:
            raise ValueError(
                f"{name}: expected shape {tuple(shape)} (the shape of {first}), got {tuple(t.shape)}"
            )
    if mask is None:
        return None
    if not isinstance(mask, torch.Tensor):
        raise ValueError(f"mask: expected a torch.Tensor, got {type(mask).__name__}")
    if mask.shape != shape:
        raise ValueError(
            f"mask: expected shape {tuple(shape)} (the shape of {first}), got {tuple(mask.shape)}"
        )
    mask = mask != 0
    if not mask.any():
        raise ValueError("mask: expected at least one real token (a nonzero entry), got all zeros")
    return mask


def _check_number(
    name: str, value: float, low: float, high: float = math.inf, low_open: bool = False
) -> float:
    """Check `low <= value <= high` (`low < value` if `low_open`); NaN never passes."""
    try:
        value = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"{name}: expected a number, got {value!r}") from None
    ok = (low < value if low_open else low <= value) and value <= high
    if not ok:
        interval = f"{'(' if low_open else '['}{low}, {high}{']' if high < math.inf else ')'}"
        raise ValueError(f"{name}: expected a number in {interval}, got {value}")
    return value


def _zero_padding(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """x on real tokens, 0 on padding (bool mask). Doing this first keeps padded garbage
    out of every later exp/square, and out of the gradient: where() routes no gradient to
    the branch it did not pick."""
    return torch.where(mask, x, torch.zeros((), dtype=x.dtype, device=x.device))


def _masked_mean(x: torch.Tensor, mask: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    """masked_mean without the input checks, for callers that already made them."""
    if dim is None:
        return _zero_padding(x, mask).sum() / mask.sum()
    return _zero_padding(x, mask).sum(dim) / mask.sum(dim).clamp(min=1)


def _masked_var(x: torch.Tensor, mask: torch.Tensor, unbiased: bool = True) -> torch.Tensor:
    """masked_var without the input checks."""
    n = mask.sum()
    centred = _zero_padding(x - _masked_mean(x, mask), mask)
    var = (centred**2).sum() / n
    if unbiased:
        if n < 2:
            raise ValueError("mask: expected at least 2 real tokens for an unbiased variance, got 1")
        var = var * n / (n - 1)
    return var


def _as_bool(mask: torch.Tensor) -> torch.Tensor:
    return mask if mask.dtype == torch.bool else mask != 0


def _to_floats(**values: torch.Tensor) -> dict[str, float]:
    """Detached 0-d tensors -> python floats with one device sync instead of one per value."""
    numbers = torch.stack([v.detach().float() for v in values.values()]).tolist()
    return dict(zip(values.keys(), numbers))


# --------------------------------------------------------------------------------------
# Log-probabilities and entropy from logits
# --------------------------------------------------------------------------------------


def _fp32_chunks(logits: torch.Tensor):
    """Yield (rows, fp32 copy of logits[rows]) over the rows of a 2-D (positions, vocab)
    tensor, a bounded number of elements at a time. No rows still yields one (empty) chunk
    so callers can torch.cat.

    The chunks come from one `split`, whose backward concatenates their gradients once; a
    slice per chunk would build a zero tensor of the whole input for each chunk and add
    them up."""
    n = logits.shape[0]
    rows = max(1, _FP32_CHUNK_ELEMENTS // max(1, logits.shape[-1]))
    if n == 0:
        yield slice(0, 0), logits.float()
        return
    for start, chunk in zip(range(0, n, rows), logits.split(rows)):
        yield slice(start, start + rows), chunk.float()


def _check_logits_labels(logits: torch.Tensor, labels: torch.Tensor, temperature: float) -> float:
    """The checks of logprobs_from_logits; returns the temperature as a float."""
    _check_tensors(logits=logits)
    if logits.ndim < 2:
        raise ValueError(f"logits: expected shape (..., vocab), got {tuple(logits.shape)}")
    if not isinstance(labels, torch.Tensor) or labels.is_floating_point() or labels.dtype == torch.bool:
        got = getattr(labels, "dtype", type(labels).__name__)
        raise ValueError(f"labels: expected an integer tensor of token ids, got {got}")
    if labels.shape != logits.shape[:-1]:
        raise ValueError(
            f"labels: expected shape {tuple(logits.shape[:-1])} (logits without the vocab "
            f"dimension), got {tuple(labels.shape)}"
        )
    vocab = logits.shape[-1]
    if ((labels < 0) | (labels >= vocab)).any():
        raise ValueError(f"labels: expected token ids in [0, {vocab}), got values outside it")
    return _check_number("temperature", temperature, 0.0, low_open=True)


def logprobs_from_logits(
    logits: torch.Tensor, labels: torch.Tensor, temperature: float = 1.0
) -> torch.Tensor:
    """Per-token log-probabilities of `labels` under softmax(logits / temperature).

        log pi(y_t) = z_{y_t} / T - logsumexp_v(z_v / T)

    logits: (B, T, V), any float dtype; labels: (B, T) token ids. Returns fp32 (B, T).

    Computed as the label's logit minus the logsumexp, in fp32, a chunk of the batch at a
    time: the full log_softmax (B, T, V) tensor is never built, and bf16 logits never get
    a full fp32 copy at once. Pass the sampling temperature: recomputing log-probs at T=1
    for samples drawn at T != 1 makes the KL grow faster than it should.
    """
    temperature = _check_logits_labels(logits, labels, temperature)
    out = []
    flat_labels = labels.reshape(-1)
    for rows, z in _fp32_chunks(logits.reshape(-1, logits.shape[-1])):
        if temperature != 1.0:
            z = z / temperature
        label_logits = z.gather(-1, flat_labels[rows].unsqueeze(-1)).squeeze(-1)
        out.append(label_logits - torch.logsumexp(z, dim=-1))
    return torch.cat(out).reshape(labels.shape)


def logprobs_and_entropy_from_logits(
    logits: torch.Tensor, labels: torch.Tensor, temperature: float = 1.0, entropy_grad: bool = True
) -> tuple[torch.Tensor, torch.Tensor]:
    """logprobs_from_logits(logits, labels, T) and entropy_from_logits(logits / T) in one
    pass over the vocabulary, sharing one logsumexp per position:

        z = (logits - max) / T          (shift-invariant; keeps large logits exact)
        log pi(y_t) = z_{y_t} - logsumexp(z)
        H_t         = sum_v pi_v * (logsumexp(z) - z_v),   pi_v = exp(z_v - logsumexp(z))

    Every term of H is >= 0, so the sum has no cancellation. With `entropy_grad` off the
    entropy is computed from detached logits: logged, with no graph and no backward through
    a full-vocabulary softmax (the entropy bonus is off).
    """
    temperature = _check_logits_labels(logits, labels, temperature)
    logprobs, entropies = [], []
    flat_labels = labels.reshape(-1)
    for rows, z in _fp32_chunks(logits.reshape(-1, logits.shape[-1])):
        z = z - z.amax(dim=-1, keepdim=True).detach()
        if temperature != 1.0:
            z = z / temperature
        lse = torch.logsumexp(z, dim=-1, keepdim=True)
        logprobs.append((z.gather(-1, flat_labels[rows].unsqueeze(-1)) - lse).squeeze(-1))
        with torch.set_grad_enabled(entropy_grad and torch.is_grad_enabled()):
            gap = lse - z if entropy_grad else (lse - z).detach()
            # A -inf logit has pi = 0 and gap = inf; clamping makes 0 * inf a 0, not NaN.
            entropies.append((torch.exp(-gap) * gap.clamp(max=torch.finfo(gap.dtype).max)).sum(-1))
    return torch.cat(logprobs).reshape(labels.shape), torch.cat(entropies).reshape(labels.shape)


def entropy_from_logits(logits: torch.Tensor) -> torch.Tensor:
    """Per-position entropy of softmax(logits), in fp32: (B, T, V) -> (B, T).

        H = logsumexp(z) - sum_v softmax(z)_v * z_v

    The logits are first shifted so that the largest is 0 (H does not change): with
    logits of size 1e4 the two terms would otherwise be two large numbers whose fp32
    difference is mostly rounding error. -inf logits (masked vocabulary) contribute 0.
    """
    _check_tensors(logits=logits)
    if logits.ndim < 2:
        raise ValueError(f"logits: expected shape (..., vocab), got {tuple(logits.shape)}")
    out = []
    for _, z in _fp32_chunks(logits.reshape(-1, logits.shape[-1])):
        z = z - z.amax(dim=-1, keepdim=True).detach()
        p = torch.softmax(z, dim=-1)
        # Clamp -inf to the lowest finite value: p is exactly 0 there, and 0 * -inf is NaN.
        z_finite = z.clamp(min=torch.finfo(z.dtype).min)
        out.append(torch.logsumexp(z, dim=-1) - (p * z_finite).sum(dim=-1))
    return torch.cat(out).reshape(logits.shape[:-1])


# --------------------------------------------------------------------------------------
# Masked statistics
# --------------------------------------------------------------------------------------


def masked_mean(x: torch.Tensor, mask: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    """Mean of x over real tokens: sum(x * mask) / sum(mask).

    With `dim`, the mean along that dimension; a row with no real token gets 0.
    """
    mask = _check_tensors(mask, x=x)
    return _masked_mean(x, mask, dim)


def masked_var(x: torch.Tensor, mask: torch.Tensor, unbiased: bool = True) -> torch.Tensor:
    """Variance of x over real tokens (a 0-d tensor):

        mu  = masked_mean(x)
        var = sum(mask * (x - mu)^2) / (n - 1)      (n = number of real tokens; n if not unbiased)

    The unbiased form needs n >= 2 and raises otherwise rather than return inf/NaN.
    """
    mask = _check_tensors(mask, x=x)
    return _masked_var(x, mask, unbiased)


def masked_whiten(x: torch.Tensor, mask: torch.Tensor, shift_mean: bool = True,
                  stats_from: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
    """Normalise x to mean 0 and variance 1 over real tokens:

        x_white = (x - mu) / sqrt(var + 1e-8)        (+ mu again if not shift_mean)

    mu and var (unbiased) come from real tokens only, so padding never shifts them; padded
    positions of the output are 0. Used on advantages over the whole rollout batch.
    `stats_from=(xs, masks)` takes mu and var from other tensors instead (the gathered
    batch of every process, when x is one process's share of it).
    """
    mask = _check_tensors(mask, x=x)
    if stats_from is None:
        xs, ms = x, mask
    else:
        xs, ms = stats_from[0], _check_tensors(stats_from[1], stats_from=stats_from[0])
    mean, var = _masked_mean(xs, ms), _masked_var(xs, ms, unbiased=True)
    whitened = (x - mean) * torch.rsqrt(var + 1e-8)
    if not shift_mean:
        whitened = whitened + mean
    return _zero_padding(whitened, mask)


def explained_variance(values: torch.Tensor, returns: torch.Tensor, mask: torch.Tensor) -> float:
    """How much of the variance of the returns the critic explains, over real tokens:

        EV = 1 - Var[R - V] / Var[R]

    1 is a perfect critic, 0 no better than a constant, below 0 worse than a constant.
    When Var[R] == 0 (all returns equal, or one real token) the ratio is undefined; this
    returns 0.0 then (no claim of explanation) instead of NaN.
    """
    mask = _check_tensors(mask, values=values, returns=returns)
    values, returns = values.detach(), returns.detach()
    var_returns = _masked_var(returns, mask, unbiased=False)
    var_residual = _masked_var(returns - values, mask, unbiased=False)
    stats = _to_floats(var_returns=var_returns, var_residual=var_residual)
    if stats["var_returns"] == 0.0:
        return 0.0
    return 1.0 - stats["var_residual"] / stats["var_returns"]


# --------------------------------------------------------------------------------------
# KL penalty against the reference policy, folded into per-token rewards
# --------------------------------------------------------------------------------------


def truncated_importance_weights(logprobs: torch.Tensor, sampler_logprobs: torch.Tensor, cap: float) -> torch.Tensor:
    """Per-token min(exp(logprobs - sampler_logprobs), cap), detached: the truncated
    importance weight of a token drawn by a sampler whose probabilities differ from the
    trainer's (another engine's kernels or precision). Multiplying the policy-gradient term by
    it corrects the expectation to the trainer's policy; the cap bounds the variance. 1 where
    the two agree."""
    _check_tensors(logprobs=logprobs, sampler_logprobs=sampler_logprobs)
    if cap < 1:
        raise ValueError(f"cap: expected >= 1, got {cap}")
    return torch.exp(logprobs.detach() - sampler_logprobs.detach()).clamp(max=cap)


def kl_penalty(logprobs: torch.Tensor, ref_logprobs: torch.Tensor, kind: str = "k1") -> torch.Tensor:
    """Per-token estimate of KL(pi || pi_ref) from tokens sampled from pi (Schulman,
    "Approximating KL divergence"), with log_ratio = logprobs - ref_logprobs:

        k1  = log_ratio                              unbiased, can be negative per token
        k2  = 0.5 * log_ratio^2                      biased, low variance, >= 0
        k3  = exp(-log_ratio) - 1 + log_ratio        unbiased, >= 0
        abs = |log_ratio|

    All are 0 where the two policies agree. Elementwise: padded positions give whatever
    their inputs give, and the caller masks them.
    """
    _check_tensors(logprobs=logprobs, ref_logprobs=ref_logprobs)
    if kind not in KL_KINDS:
        raise ValueError(f"kind: expected one of {', '.join(KL_KINDS)}, got {kind!r}")
    log_ratio = logprobs - ref_logprobs
    if kind == "k1":
        return log_ratio
    if kind == "k2":
        return 0.5 * log_ratio**2
    if kind == "k3":
        # expm1 keeps precision for small log_ratio, where k3 ~ log_ratio^2 / 2.
        return torch.expm1(-log_ratio) + log_ratio
    return log_ratio.abs()


def shape_rewards(
    scores: torch.Tensor,
    logprobs: torch.Tensor,
    ref_logprobs: torch.Tensor,
    mask: torch.Tensor,
    kl_coef: float,
    kind: str = "k1",
) -> torch.Tensor:
    """Per-token rewards (InstructGPT): a KL penalty on every real token and the reward
    model's score on the last one,

        r_t = -kl_coef * KL_t                        for real t before the last
        r_T = -kl_coef * KL_T + score                at the last real token T

    and 0 on padding. scores: (B,); the others (B, T); `logprobs` are the rollout policy's.
    Rewards are constants for the update, so the result carries no gradient.
    """
    mask = _check_tensors(mask, logprobs=logprobs, ref_logprobs=ref_logprobs)
    _check_tensors(scores=scores)
    if scores.shape != logprobs.shape[:1]:
        raise ValueError(
            f"scores: expected shape ({logprobs.shape[0]},), one score per response, "
            f"got {tuple(scores.shape)}"
        )
    if not mask.any(dim=-1).all():
        raise ValueError(
            "mask: expected at least one real token in every response (its score goes on the last)"
        )
    kl_coef = _check_number("kl_coef", kl_coef, 0.0)

    with torch.no_grad():
        logprobs, ref_logprobs = _zero_padding(logprobs, mask), _zero_padding(ref_logprobs, mask)
        rewards = -kl_coef * kl_penalty(logprobs, ref_logprobs, kind)
        # Index of the last real token: the largest position whose mask is set.
        positions = torch.arange(mask.shape[-1], device=mask.device)
        last = torch.where(mask, positions, -1).argmax(dim=-1)
        rows = torch.arange(mask.shape[0], device=mask.device)
        rewards[rows, last] += scores.to(rewards.dtype)
        return _zero_padding(rewards, mask)


def overlong_penalty(lengths: torch.Tensor, max_new_tokens: int, buffer: int, penalty: float = 1.0) -> torch.Tensor:
    """(B,) DAPO's soft overlong punishment (Yu et al. 2025), added to the scores:

        0                                     length <= max_new_tokens - buffer
        -penalty * (length - (max - buffer)) / buffer   in the last `buffer` tokens
        -penalty                              length >= max_new_tokens

    A response cut at the limit has no real ending; the ramp tells the policy that long is
    bad before the cut, instead of one cliff at the limit. `lengths` are response tokens."""
    max_new_tokens = int(_check_number("max_new_tokens", max_new_tokens, 1))
    buffer = int(_check_number("buffer", buffer, 1, max_new_tokens))
    penalty = _check_number("penalty", penalty, 0.0)
    excess = (lengths.float() - (max_new_tokens - buffer)).clamp(min=0.0, max=float(buffer))
    return -penalty * excess / buffer


class _KLController:
    """The current KL coefficient `value`, and what a resume needs to restore it."""

    value: float

    def state_dict(self) -> dict:
        return {"value": self.value}

    def load_state_dict(self, state: dict) -> None:
        self.value = _check_number("value", state["value"], 0.0)


class FixedKLController(_KLController):
    """A constant KL coefficient: update() does nothing."""

    def __init__(self, kl_coef: float):
        self.value = _check_number("kl_coef", kl_coef, 0.0)

    def update(self, current_kl: float, n_steps: int) -> None:
        pass


class AdaptiveKLController(_KLController):
    """Moves the KL coefficient toward a target KL (Ziegler et al. 2019):

        err   = clip(current_kl / target - 1, -0.2, 0.2)
        value = value * (1 + err * n_steps / horizon)

    KL above target raises the coefficient, below lowers it; the clip bounds the step, and
    `horizon` (in samples, like n_steps) sets how fast it moves.
    """

    def __init__(self, init_kl_coef: float, target: float, horizon: float):
        self.value = _check_number("init_kl_coef", init_kl_coef, 0.0)
        self.target = _check_number("target", target, 0.0, low_open=True)
        self.horizon = _check_number("horizon", horizon, 0.0, low_open=True)

    def update(self, current_kl: float, n_steps: int) -> None:
        current_kl = _check_number("current_kl", current_kl, -math.inf)
        n_steps = _check_number("n_steps", n_steps, 0.0)
        err = min(max(current_kl / self.target - 1.0, -0.2), 0.2)
        self.value *= 1.0 + err * n_steps / self.horizon


# --------------------------------------------------------------------------------------
# Advantages
# --------------------------------------------------------------------------------------


def compute_gae(
    rewards: torch.Tensor,
    values: torch.Tensor,
    mask: torch.Tensor,
    gamma: float,
    lam: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalised advantage estimation over each response, backwards in time:

        delta_t = r_t + gamma * V_{t+1} - V_t         (V after the last real token is 0)
        A_t     = delta_t + gamma * lam * A_{t+1}
        R_t     = A_t + V_t                           (the critic's target)

    Returns (advantages, returns), both detached, 0 on padding. Padded positions are
    skipped: "t+1" is the next *real* token, so padded rewards and values never enter a
    real token's number. Right padding (the usual case) just ends the response; left
    padding or a hole in the mask is treated as if those positions were absent.
    """
    mask = _check_tensors(mask, rewards=rewards, values=values)
    gamma = _check_number("gamma", gamma, 0.0, 1.0)
    lam = _check_number("lam", lam, 0.0, 1.0)

    with torch.no_grad():
        rewards, values = _zero_padding(rewards, mask), _zero_padding(values, mask)
        advantages = torch.zeros_like(rewards)
        next_value = torch.zeros_like(rewards[:, 0])
        next_advantage = torch.zeros_like(rewards[:, 0])
        for t in reversed(range(rewards.shape[1])):
            real = mask[:, t]
            delta = rewards[:, t] + gamma * next_value - values[:, t]
            advantage = delta + gamma * lam * next_advantage
            advantages[:, t] = torch.where(real, advantage, 0.0)
            next_value = torch.where(real, values[:, t], next_value)
            next_advantage = torch.where(real, advantage, next_advantage)
        returns = _zero_padding(advantages + values, mask)
    return advantages, returns


def _registrar(registry: dict[str, Callable], kind: str, name: str) -> Callable:
    def add(fn: Callable) -> Callable:
        if name in registry:
            raise ValueError(f"{kind} {name!r} is registered already")
        registry[name] = fn
        return fn

    return add


def _registered(registry: dict[str, Callable], kind: str, name: str) -> Callable:
    if name not in registry:
        raise ValueError(f"{kind}: expected one of {', '.join(map(repr, registry))}, got {name!r}")
    return registry[name]


ADVANTAGE_ESTIMATORS: dict[str, Callable] = {}


def register_advantage_estimator(name: str, *, needs_critic: bool = True, groups: bool = False,
                                 whiten: bool | None = None) -> Callable:
    """Register `fn(rewards, values, mask, *, groups, gamma, lam, **_) -> (advantages,
    returns)` under `name` (the config's `ppo.advantage`). rewards, values, mask: (B, T)
    per-token tensors (values: the critic's, zeros without one); groups: (B,) the index of
    each sequence's prompt (`rollout.samples_per_prompt` samples share one). Take what you
    need by keyword and ignore the rest with **_. `returns` are the critic's targets.

    needs_critic: a critic is built and trained only for estimators that read values.
    groups: the estimator compares samples of one prompt (it refuses groups of one).
    whiten: whether the advantages are then whitened over the global batch: None leaves it to
    `ppo.whiten_advantages`; True or False is part of the algorithm."""
    def add(fn: Callable) -> Callable:
        fn.needs_critic, fn.needs_groups, fn.whiten = needs_critic, groups, whiten
        return _registrar(ADVANTAGE_ESTIMATORS, "advantage estimator", name)(fn)

    return add


def advantage_estimator(name: str) -> Callable:
    """The registered estimator `name`; the error lists the registered ones."""
    return _registered(ADVANTAGE_ESTIMATORS, "advantage estimator", name)


@register_advantage_estimator("gae")
def gae_estimator(rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, *, gamma: float, lam: float,
                  **_) -> tuple[torch.Tensor, torch.Tensor]:
    """GAE over the per-token rewards and the critic's values (`compute_gae`)."""
    return compute_gae(rewards, values, mask, gamma, lam)


def sequence_returns(rewards: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """(B,) each response's return: the sum of its per-token rewards (the score, plus the KL
    penalty when it is folded into the rewards)."""
    mask = _check_tensors(mask, rewards=rewards)
    return _zero_padding(rewards, mask).sum(-1)


def group_baseline_advantages(returns: torch.Tensor, groups: torch.Tensor, *, scale: bool = True,
                              leave_one_out: bool = False, eps: float = 1e-6) -> torch.Tensor:
    """(B,) advantages of sequence returns R against the other samples of the same prompt:

        GRPO          A_i = (R_i - mean_g R) / (std_g R + eps)       std unbiased, within group g
        Dr. GRPO      A_i = R_i - mean_g R                            (scale=False)
        RLOO          A_i = R_i - mean_{j in g, j != i} R_j           (leave_one_out=True)
                          = G / (G - 1) * (R_i - mean_g R)

    `groups` (B,) holds each sequence's group index; every group needs two samples at least.
    A group whose returns are all equal gets advantage 0 (no signal, no division by 0).
    """
    _check_tensors(returns=returns)
    if groups.shape != returns.shape:
        raise ValueError(f"groups: expected shape {tuple(returns.shape)}, got {tuple(groups.shape)}")
    ids, index, counts = torch.unique(groups, return_inverse=True, return_counts=True)
    if (counts < 2).any():
        raise ValueError("groups: every group needs at least 2 samples (rollout.samples_per_prompt >= 2)")
    n = counts.to(returns.dtype)[index]
    total = torch.zeros(len(ids), dtype=returns.dtype, device=returns.device).index_add_(0, index, returns)
    mean = total[index] / n
    centred = returns - mean
    if leave_one_out:
        return centred * n / (n - 1)
    if not scale:
        return centred
    sq = torch.zeros_like(total).index_add_(0, index, centred**2)
    std = torch.sqrt(sq[index] / (n - 1))
    return centred / (std + eps)


def constant_groups(scores: torch.Tensor, groups: torch.Tensor, atol: float = 1e-6) -> torch.Tensor:
    """(G,) bool, one per group in the order of its index: True where the group's scores all
    lie within `atol` of each other. Under a group baseline every sample of such a group has
    advantage 0: the group carries no gradient (all right or all wrong, for a checker)."""
    _check_tensors(scores=scores)
    if groups.shape != scores.shape:
        raise ValueError(f"groups: expected shape {tuple(scores.shape)}, got {tuple(groups.shape)}")
    ids, index = torch.unique(groups, return_inverse=True)
    high = torch.full((len(ids),), -math.inf, dtype=scores.dtype, device=scores.device)
    low = torch.full_like(high, math.inf)
    high = high.scatter_reduce(0, index, scores, "amax")
    low = low.scatter_reduce(0, index, scores, "amin")
    return high - low <= atol


def _per_token(advantages: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """A sequence advantage on every real token; it is also the return-like target."""
    per_token = _zero_padding(advantages[:, None].expand(mask.shape), mask != 0)
    return per_token, per_token


@register_advantage_estimator("grpo", needs_critic=False, groups=True, whiten=False)
def grpo_estimator(rewards, values, mask, *, groups, **_):
    """GRPO (Shao et al. 2024): the return standardised within its prompt's group."""
    return _per_token(group_baseline_advantages(sequence_returns(rewards, mask), groups), mask)


@register_advantage_estimator("dr_grpo", needs_critic=False, groups=True, whiten=False)
def dr_grpo_estimator(rewards, values, mask, *, groups, **_):
    """Dr. GRPO (Liu et al. 2025): the group mean subtracted, no division by the group's std."""
    return _per_token(group_baseline_advantages(sequence_returns(rewards, mask), groups, scale=False), mask)


@register_advantage_estimator("rloo", needs_critic=False, groups=True, whiten=False)
def rloo_estimator(rewards, values, mask, *, groups, **_):
    """RLOO (Ahmadian et al. 2024): the mean return of the group's other samples as baseline."""
    return _per_token(group_baseline_advantages(sequence_returns(rewards, mask), groups, leave_one_out=True), mask)


def returns_to_go(rewards: torch.Tensor, mask: torch.Tensor, gamma: float = 1.0) -> torch.Tensor:
    """(B, T) G_t = sum over real tokens k >= t of gamma^(k - t) r_k; 0 on padding."""
    mask = _check_tensors(mask, rewards=rewards)
    gamma = _check_number("gamma", gamma, 0.0, 1.0)
    rewards = _zero_padding(rewards, mask)
    out, running = torch.zeros_like(rewards), torch.zeros_like(rewards[:, 0])
    for t in reversed(range(rewards.shape[1])):
        running = torch.where(mask[:, t], rewards[:, t] + gamma * running, running)
        out[:, t] = torch.where(mask[:, t], running, 0.0)
    return out


@register_advantage_estimator("reinforce_pp", needs_critic=False, whiten=True)
def reinforce_pp_estimator(rewards, values, mask, *, gamma, **_):
    """REINFORCE++ (Hu 2025): per-token returns to go of the KL-shaped rewards, whitened over
    the global batch (the whitening is the algorithm's, whatever ppo.whiten_advantages says)."""
    returns = returns_to_go(rewards, mask, gamma)
    return returns, returns


@register_advantage_estimator("reinforce_pp_baseline", needs_critic=False, groups=True, whiten=True)
def reinforce_pp_baseline_estimator(rewards, values, mask, *, groups, gamma, **_):
    """REINFORCE++ with a group baseline: the group's mean return subtracted from every
    token's return to go, then whitened over the global batch."""
    returns = returns_to_go(rewards, mask, gamma)
    baseline = sequence_returns(rewards, mask) - group_baseline_advantages(
        sequence_returns(rewards, mask), groups, scale=False)
    advantages = _zero_padding(returns - baseline[:, None], mask != 0)
    return advantages, returns


# --------------------------------------------------------------------------------------
# Losses
# --------------------------------------------------------------------------------------


def ppo_clip_side(
    ratio: torch.Tensor,
    advantages: torch.Tensor,
    clip_eps: float = 0.2,
    clip_eps_high: float | None = None,
) -> torch.Tensor:
    """Per token, which side of the PPO clip is active (int8):

        +1  ratio > 1 + clip_eps_high and A > 0      (the gain is capped)
        -1  ratio < 1 - clip_eps and A < 0           (the loss is capped)
         0  otherwise: the unclipped term rho * A is selected

    These are exactly the tokens where min(rho * A, clip(rho) * A) strictly picks the
    clipped term, i.e. where the token gets no gradient.
    """
    _check_tensors(ratio=ratio, advantages=advantages)
    clip_eps = _check_number("clip_eps", clip_eps, 0.0, 1.0)
    clip_eps_high = clip_eps if clip_eps_high is None else _check_number("clip_eps_high", clip_eps_high, 0.0)
    high = (ratio > 1.0 + clip_eps_high) & (advantages > 0)
    low = (ratio < 1.0 - clip_eps) & (advantages < 0)
    return high.to(torch.int8) - low.to(torch.int8)


POLICY_LOSSES: dict[str, Callable] = {}


def register_policy_loss(name: str) -> Callable:
    """Register `fn(logprobs, old_logprobs, advantages, mask, *, clip_eps, clip_eps_high,
    dual_clip, **_) -> (per_token_loss, stats)` under `name` (the config's `ppo.policy_loss`).
    All inputs are (B, T); the per-token loss is 0 on padding and is aggregated by
    `aggregate_loss`; stats are python floats over this micro-batch's real tokens."""
    return _registrar(POLICY_LOSSES, "policy loss", name)


def policy_loss(name: str) -> Callable:
    """The registered policy loss `name`; the error lists the registered ones."""
    return _registered(POLICY_LOSSES, "policy loss", name)


def clipped_surrogate(
    ratio: torch.Tensor,
    advantages: torch.Tensor,
    clip_eps: float = 0.2,
    clip_eps_high: float | None = None,
    dual_clip: float | None = None,
) -> torch.Tensor:
    """PPO's clipped surrogate as a loss, elementwise (Schulman et al. 2017):

        loss = -min(rho * A, clip(rho, 1 - clip_eps, 1 + clip_eps_high) * A)

    and with `dual_clip` c > 1 (Ye et al. 2020), for A < 0 only:

        loss = min(loss, -c * A)

    i.e. a token whose advantage is negative loses at most c * |A| however far its ratio has
    run up (an unbounded rho * A from a stale or off-policy token would swamp the batch).
    Where a clipped term is selected the element gets no gradient. No masking: the callers
    zero the padding.
    """
    clip_eps_high = clip_eps if clip_eps_high is None else clip_eps_high
    clipped = torch.clamp(ratio, 1.0 - clip_eps, 1.0 + clip_eps_high) * advantages
    loss = -torch.minimum(ratio * advantages, clipped)
    if dual_clip is not None:
        loss = torch.where(advantages < 0, torch.minimum(loss, -dual_clip * advantages), loss)
    return loss


def _check_clips(clip_eps, clip_eps_high, dual_clip) -> tuple[float, float, float | None]:
    clip_eps = _check_number("clip_eps", clip_eps, 0.0, 1.0)
    clip_eps_high = clip_eps if clip_eps_high is None else _check_number("clip_eps_high", clip_eps_high, 0.0)
    if dual_clip is not None:
        dual_clip = _check_number("dual_clip", dual_clip, 1.0, low_open=True)
    return clip_eps, clip_eps_high, dual_clip


def _surrogate_and_stats(ratio, log_ratio, advantages, mask, clip_eps, clip_eps_high, dual_clip):
    """The clipped surrogate per token (0 on padding) and its stats over real tokens."""
    per_token = _zero_padding(clipped_surrogate(ratio, advantages, clip_eps, clip_eps_high, dual_clip), mask)
    with torch.no_grad():
        side = ppo_clip_side(ratio, advantages, clip_eps, clip_eps_high)
        high, low = side > 0, side < 0
        no_gradient, dual_stats = high | low, {}
        if dual_clip is not None:
            clipped = torch.clamp(ratio, 1.0 - clip_eps, 1.0 + clip_eps_high)
            dual = (advantages < 0) & (torch.maximum(ratio, clipped) > dual_clip)
            no_gradient, dual_stats = no_gradient | dual, {"clipfrac_dual": _masked_mean(dual.float(), mask)}
        stats = _to_floats(
            clipfrac=_masked_mean(no_gradient.float(), mask),
            clipfrac_high=_masked_mean(high.float(), mask),
            clipfrac_low=_masked_mean(low.float(), mask),
            **dual_stats,
            approx_kl=_masked_mean((torch.exp(log_ratio) - 1.0) - log_ratio, mask),
            ratio_mean=_masked_mean(ratio, mask),
            ratio_max=torch.where(mask, ratio, -math.inf).max(),
        )
    return per_token, stats


@register_policy_loss("ppo")
def ppo_token_loss(
    logprobs: torch.Tensor,
    old_logprobs: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    *,
    clip_eps: float = 0.2,
    clip_eps_high: float | None = None,
    dual_clip: float | None = None,
    **_,
) -> tuple[torch.Tensor, dict[str, float]]:
    """PPO's clipped surrogate per token (`clipped_surrogate`) on the token ratio

        rho_t = exp(log pi(y_t) - log pi_old(y_t))

    `old_logprobs` are the rollout policy's (not the frozen reference model's). clip_eps_high
    defaults to clip_eps (a larger one is DAPO's "clip-higher"); `dual_clip` bounds the loss
    of negative-advantage tokens.

    Stats (python floats, shares of real tokens):
        clipfrac        where a clipped term is strictly selected (the token gets no gradient)
        clipfrac_high   rho > 1 + clip_eps_high with A > 0 (the gain is capped)
        clipfrac_low    rho < 1 - clip_eps with A < 0 (the loss is capped)
        clipfrac_dual   (with dual_clip) A < 0 and rho > dual_clip (the dual bound is selected)
        approx_kl       mean of (rho - 1) - log rho, the k3 estimate of KL(pi_old || pi)
        ratio_mean, ratio_max   of rho over real tokens
    """
    mask = _check_tensors(mask, logprobs=logprobs, old_logprobs=old_logprobs, advantages=advantages)
    clip_eps, clip_eps_high, dual_clip = _check_clips(clip_eps, clip_eps_high, dual_clip)
    logprobs = _zero_padding(logprobs, mask)
    old_logprobs = _zero_padding(old_logprobs.detach(), mask)
    advantages = _zero_padding(advantages.detach(), mask)
    log_ratio = logprobs - old_logprobs
    return _surrogate_and_stats(torch.exp(log_ratio), log_ratio.detach(), advantages, mask, clip_eps, clip_eps_high,
                                dual_clip)


@register_policy_loss("a2c")
def a2c_token_loss(logprobs: torch.Tensor, old_logprobs: torch.Tensor | None, advantages: torch.Tensor,
                   mask: torch.Tensor, **_) -> tuple[torch.Tensor, dict[str, float]]:
    """The basic policy-gradient (A2C) loss per token, loss_t = -log pi(y_t | x, y_<t) * A_t.

    A is a constant (detached): minimising the loss raises the probability of tokens with
    positive advantage and lowers it for negative advantage. `old_logprobs` is unused.
    """
    mask = _check_tensors(mask, logprobs=logprobs, advantages=advantages)
    logprobs = _zero_padding(logprobs, mask)
    advantages = _zero_padding(advantages.detach(), mask)
    return _zero_padding(-(logprobs * advantages), mask), {}


def sequence_ratio(logprobs: torch.Tensor, old_logprobs: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """(B,) GSPO's importance ratio of each sequence (Zheng et al. 2025): the geometric mean of
    its token ratios, so that its scale does not grow with the length,

        s_i = exp( (1 / |y_i|) sum_t (log pi(y_it) - log pi_old(y_it)) )
    """
    mask = _check_tensors(mask, logprobs=logprobs, old_logprobs=old_logprobs)
    return torch.exp(_masked_mean(logprobs - old_logprobs, mask, dim=-1))


@register_policy_loss("gspo")
def gspo_token_loss(
    logprobs: torch.Tensor,
    old_logprobs: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    *,
    clip_eps: float = 3e-4,
    clip_eps_high: float | None = 4e-4,
    dual_clip: float | None = None,
    **_,
) -> tuple[torch.Tensor, dict[str, float]]:
    """GSPO's clipped surrogate on the sequence ratio `sequence_ratio` (Zheng et al. 2025), in
    its per-token form (GSPO-token):

        s_it   = sg[s_i] * pi(y_it) / sg[pi(y_it)]          (value s_i, gradient s_i * grad log pi(y_it))
        loss_t = -min(s_it * A_it, clip(s_it, 1 - clip_eps, 1 + clip_eps_high) * A_it)

    Every token of a sequence has the same ratio, so a sequence is clipped as a whole. With an
    advantage constant over the sequence (the group estimators) and the seq-mean-token-mean
    aggregation this is exactly GSPO's sequence objective, value and gradient. The paper's
    clip range is tiny (3e-4, 4e-4): the sequence ratio stays far closer to 1 than a token's.
    Stats as `ppo_token_loss`, the ratio being s_i on each token.
    """
    mask = _check_tensors(mask, logprobs=logprobs, old_logprobs=old_logprobs, advantages=advantages)
    clip_eps, clip_eps_high, dual_clip = _check_clips(clip_eps, clip_eps_high, dual_clip)
    logprobs = _zero_padding(logprobs, mask)
    old_logprobs = _zero_padding(old_logprobs.detach(), mask)
    advantages = _zero_padding(advantages.detach(), mask)
    seq_ratio = torch.exp(_masked_mean(logprobs.detach() - old_logprobs, mask, dim=-1))
    ratio = seq_ratio[:, None] * torch.exp(logprobs - logprobs.detach())
    return _surrogate_and_stats(ratio, logprobs.detach() - old_logprobs, advantages, mask, clip_eps, clip_eps_high,
                                dual_clip)


def ppo_policy_loss(
    logprobs: torch.Tensor,
    old_logprobs: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    clip_eps: float = 0.2,
    clip_eps_high: float | None = None,
) -> tuple[torch.Tensor, dict[str, float]]:
    """PPO's clipped surrogate (`ppo_token_loss`) as a mean over real tokens:

        loss = -mean_t min(rho_t * A_t, clip(rho_t, 1 - clip_eps, 1 + clip_eps_high) * A_t)
    """
    per_token, stats = ppo_token_loss(logprobs, old_logprobs, advantages, mask, clip_eps=clip_eps,
                                      clip_eps_high=clip_eps_high)
    return _masked_mean(per_token, _as_bool(mask)), stats


def a2c_policy_loss(logprobs: torch.Tensor, advantages: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """The basic policy-gradient (A2C) loss as a mean over real tokens:

        loss = -mean_t log pi(y_t | x, y_<t) * A_t
    """
    per_token, _ = a2c_token_loss(logprobs, None, advantages, mask)
    return _masked_mean(per_token, _as_bool(mask))


LOSS_AGGREGATIONS = ("token-mean", "seq-mean-token-mean", "seq-mean-token-sum-norm")


def aggregate_loss(
    per_token: torch.Tensor,
    mask: torch.Tensor,
    mode: str = "token-mean",
    *,
    batch_tokens: torch.Tensor | float | None = None,
    batch_sequences: int | None = None,
    max_tokens: int | None = None,
) -> torch.Tensor:
    """One loss from per-token losses l (B, T): this micro-batch's share of the loss of the
    batch it is part of (all micro-batches on all processes), so that adding up the shares
    gives the same number however the batch was split:

        token-mean                sum_{i,t} l_it / N                  N: real tokens in the batch
        seq-mean-token-mean       (1/S) sum_i mean_t l_it             S: sequences in the batch
        seq-mean-token-sum-norm   sum_{i,t} l_it / (S * max_tokens)    a constant per sequence

    `token-mean` weighs every token alike (long responses count more); `seq-mean-token-mean`
    every sequence alike (a token of a short response counts more); the constant normaliser
    (Dr. GRPO) has neither length bias. `batch_tokens` (N) and `batch_sequences` (S) default
    to this micro-batch's own: the micro-batch is the whole batch.
    """
    mask = _check_tensors(mask, per_token=per_token)
    if mode not in LOSS_AGGREGATIONS:
        raise ValueError(f"mode: expected one of {', '.join(LOSS_AGGREGATIONS)}, got {mode!r}")
    if mode == "token-mean":
        # The micro-batch's mean times its share of the tokens: for one micro-batch the share
        # is 1 and this is exactly masked_mean.
        mean = _masked_mean(per_token, mask)
        return mean if batch_tokens is None else mean * (mask.sum() / batch_tokens)
    sequences = batch_sequences if batch_sequences is not None else per_token.shape[0]
    if mode == "seq-mean-token-mean":
        return _masked_mean(per_token, mask, dim=-1).sum() / sequences
    if not max_tokens or max_tokens <= 0:
        raise ValueError(f"max_tokens: expected a positive integer for {mode}, got {max_tokens!r}")
    return _zero_padding(per_token, mask).sum() / (sequences * max_tokens)


def value_token_loss(
    values: torch.Tensor,
    old_values: torch.Tensor,
    returns: torch.Tensor,
    mask: torch.Tensor,
    clip_range: float | None = 0.2,
) -> tuple[torch.Tensor, dict[str, float]]:
    """Clipped value loss of the critic per token:

        V_clip = clip(V, V_old - c, V_old + c)
        loss_t = 0.5 * max((V - R)^2, (V_clip - R)^2)

    `old_values` are the rollout's, `returns` the GAE targets (both constants). With
    clip_range=None it is the plain 0.5 * (V - R)^2.

    Stats (python floats): vf_clipfrac, the share of real tokens where the clipped term is
    strictly larger (0 without clipping); value_mean, the mean of V.
    """
    mask = _check_tensors(mask, values=values, old_values=old_values, returns=returns)
    if clip_range is not None:
        clip_range = _check_number("clip_range", clip_range, 0.0)

    values = _zero_padding(values, mask)
    old_values = _zero_padding(old_values.detach(), mask)
    returns = _zero_padding(returns.detach(), mask)

    unclipped = (values - returns) ** 2
    if clip_range is None:
        per_token, vf_clipped = unclipped, torch.zeros_like(mask)
    else:
        values_clipped = old_values + torch.clamp(values - old_values, -clip_range, clip_range)
        clipped = (values_clipped - returns) ** 2
        per_token, vf_clipped = torch.maximum(unclipped, clipped), clipped > unclipped

    stats = _to_floats(
        vf_clipfrac=_masked_mean(vf_clipped.float(), mask),
        value_mean=_masked_mean(values.detach(), mask),
    )
    return _zero_padding(0.5 * per_token, mask), stats


def value_loss(
    values: torch.Tensor,
    old_values: torch.Tensor,
    returns: torch.Tensor,
    mask: torch.Tensor,
    clip_range: float | None = 0.2,
) -> tuple[torch.Tensor, dict[str, float]]:
    """The clipped value loss (`value_token_loss`) as a mean over real tokens:

        loss = 0.5 * mean_t max((V - R)^2, (V_clip - R)^2)
    """
    per_token, stats = value_token_loss(values, old_values, returns, mask, clip_range)
    return _masked_mean(per_token, _as_bool(mask)), stats


def pairwise_reward_loss(
    chosen_rewards: torch.Tensor,
    rejected_rewards: torch.Tensor,
    margin: torch.Tensor | float | None = None,
) -> tuple[torch.Tensor, float]:
    """Bradley-Terry loss of a reward model on preference pairs:

        loss = -mean log sigmoid(r_chosen - r_rejected - margin)

    log sigmoid is computed directly (softplus form), stable for any reward gap. Returns
    (loss, accuracy): accuracy is the share of pairs with r_chosen > r_rejected strictly
    (a tie counts as wrong). The loss is log 2 when the rewards are equal.
    """
    _check_tensors(chosen_rewards=chosen_rewards, rejected_rewards=rejected_rewards)
    if chosen_rewards.numel() == 0:
        raise ValueError("chosen_rewards: expected at least one pair, got an empty tensor")
    gap = chosen_rewards - rejected_rewards
    if margin is not None:
        if isinstance(margin, torch.Tensor) and margin.ndim > 0:
            _check_tensors(chosen_rewards=chosen_rewards, margin=margin)
        gap = gap - margin
    loss = -F.logsigmoid(gap).mean()
    accuracy = (chosen_rewards > rejected_rewards).float().mean().item()
    return loss, accuracy


# --------------------------------------------------------------------------------------
# Supervised fine-tuning and direct preference optimisation
# --------------------------------------------------------------------------------------

DPO_LOSSES = ("sigmoid", "ipo")


def sft_loss(logprobs: torch.Tensor, mask: torch.Tensor,
             num_tokens: torch.Tensor | float | None = None) -> torch.Tensor:
    """Negative log-likelihood of the trained tokens, a mean over tokens:

        loss = -sum(mask * log pi(y_t)) / num_tokens

    `mask` is 1 on the tokens the model learns (completion or assistant tokens), 0 on the
    prompt and padding. `num_tokens` (default: the mask's sum) is the number of trained tokens
    of the whole batch: a micro-batch passes the batch's count, so that the micro-batch
    losses add up to the batch's token mean however the batch is split.
    """
    mask = _check_tensors(mask, logprobs=logprobs)
    total = mask.sum() if num_tokens is None else num_tokens
    if float(total) <= 0:
        raise ValueError(f"num_tokens: expected > 0, got {float(total)}")
    return -_zero_padding(logprobs, mask).sum() / total


def sequence_logprobs(logprobs: torch.Tensor, mask: torch.Tensor, average: bool = False) -> torch.Tensor:
    """log pi(y | x) of each sequence, (B, T) -> (B,): the sum of its token log-probs over the
    mask, or with `average` their mean (the length-normalised form IPO is used with)."""
    mask = _check_tensors(mask, logprobs=logprobs)
    total = _zero_padding(logprobs, mask).sum(-1)
    return total / mask.sum(-1).clamp(min=1) if average else total


def dpo_loss(
    chosen_logps: torch.Tensor,
    rejected_logps: torch.Tensor,
    ref_chosen_logps: torch.Tensor,
    ref_rejected_logps: torch.Tensor,
    beta: float,
    kind: str = "sigmoid",
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The DPO loss of each preference pair from sequence log-probs (B,) of the policy and of
    the frozen reference. With the log-ratio gap

        h = (log pi(y_w) - log pi_ref(y_w)) - (log pi(y_l) - log pi_ref(y_l))

    `sigmoid` (Rafailov et al., 2023): loss = -log sigmoid(beta * h), log 2 at h = 0;
    `ipo` (Azar et al., 2023): loss = (h - 1 / (2 beta))^2, which pulls h to a finite target
    instead of pushing it to infinity.

    Returns (per-pair losses, chosen rewards, rejected rewards); the implicit rewards are
    beta * (log pi - log pi_ref), detached (for metrics: a pair is ranked right when the
    chosen reward exceeds the rejected one).
    """
    _check_tensors(chosen_logps=chosen_logps, rejected_logps=rejected_logps, ref_chosen_logps=ref_chosen_logps,
                   ref_rejected_logps=ref_rejected_logps)
    beta = _check_number("beta", beta, 0.0, low_open=True)
    if kind not in DPO_LOSSES:
        raise ValueError(f"kind: expected one of {', '.join(map(repr, DPO_LOSSES))}, got {kind!r}")
    chosen_ratio = chosen_logps - ref_chosen_logps
    rejected_ratio = rejected_logps - ref_rejected_logps
    gap = chosen_ratio - rejected_ratio
    if kind == "sigmoid":
        losses = -F.logsigmoid(beta * gap)
    else:
        losses = (gap - 1.0 / (2.0 * beta)) ** 2
    return losses, beta * chosen_ratio.detach(), beta * rejected_ratio.detach()
