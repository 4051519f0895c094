"""Health checks over the metric stream: the symptoms of the field's known pitfalls, named and thresholded.

`HealthMonitor.observe` reads one metrics.jsonl row at a time and returns the alerts that
fire at that step. Each alert names the check, the likely cause and the knob to turn. Trend
checks compare the last `window` steps with the first `window` steps of the run (the
"start"), so they need `2 * window` steps before they can fire. A check that fires stays
quiet for `cooldown` steps, then fires again if its condition still holds.

Pure Python, no heavy imports: `rlhf.config` imports `DiagnosticsConfig` from here.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field

from rlhf.errors import ConfigError
from typing import Optional

CHECKS = (
    "reward_hacking",
    "collapse",
    "over_regularised",
    "negative_kl",
    "critic_not_learning",
    "updates_too_large",
    "zero_variance_groups",
    "entropy_collapse",
    "length_drift",
    "clip_side",
    "non_finite",
)


@dataclass
class DiagnosticsConfig:
    enabled: bool = True
    """Run the health checks (the non-finite guard always runs: such a step is refused)."""
    disabled: list[str] = field(default_factory=list)
    """Checks to turn off by name: reward_hacking, collapse, over_regularised, negative_kl,
    critic_not_learning, updates_too_large, zero_variance_groups, entropy_collapse,
    length_drift, clip_side."""
    window: int = 5
    """Steps averaged for the "start" (the first steps) and for "now" (the latest steps) in
    trend checks; trend checks start after 2 * window steps."""
    warmup_steps: int = 10
    """Steps before the critic check starts (a fresh value head explains nothing yet)."""
    cooldown: int = 25
    """Steps before a check that fired may fire again while its condition still holds."""
    hacking_score_rise: float = 0.5
    """Reward hacking: a rise of the reward-model score, in units of its batch std at the
    start, that counts as "the score rises"."""
    hacking_judge_min_gain: float = 0.0
    """Reward hacking: the judge (`eval/judge_mean`) counts as falling or stalled when it
    gained no more than this since its first evaluation, in the judge's own units."""
    hacking_kl_factor: float = 3.0
    """Reward hacking: KL "far past its target" means above this multiple of ppo.kl_target."""
    hacking_kl_max: float = 10.0
    """Reward hacking without ppo.kl_target: sequence KL (nats) counted as far too large."""
    collapse_entropy_frac: float = 0.3
    """Collapse: policy entropy below this fraction of its start (reported by `collapse`
    with a critic, by `entropy_collapse` without one)."""
    collapse_repeat_rise: float = 0.2
    """Collapse: rise of the repeated 4-gram share (`response/repeat_frac`) since the start."""
    collapse_distinct_frac: float = 0.5
    """Collapse: distinct bigram share (`response/distinct2`) below this fraction of its start."""
    collapse_length_limit_frac: float = 0.95
    """Collapse: mean response length drifted up to this fraction of rollout.max_new_tokens ..."""
    collapse_length_drift: float = 0.2
    """... having grown by at least this fraction of rollout.max_new_tokens since the start (a
    model that sits near the limit from the start has not drifted)."""
    collapse_length_drop_frac: float = 0.25
    """Collapse: mean response length shrunk below this fraction of its start. The length
    signals are reported by `collapse` with a critic, by `length_drift` without one."""
    over_reg_steps: int = 20
    """Regularisation too strong: how many steps the KL must stay near zero and the score flat."""
    over_reg_kl: float = 0.1
    """Regularisation too strong: |sequence KL| (nats) below this at every one of those steps."""
    over_reg_score_rise: float = 0.1
    """Regularisation too strong: the score counts as flat below this rise (in start std units)."""
    negative_kl_tol: float = 0.1
    """Negative KL: the mean sequence KL over the last window below -negative_kl_tol (nats)."""
    logprob_gap_max: float = 0.1
    """Off-policy samples: mean |generation log-prob - recomputed log-prob| per token above this."""
    critic_ev_min: float = 0.0
    """Critic not learning: median explained variance over the last window at or below this."""
    clipfrac_max: float = 0.3
    """Updates too large: PPO clip fraction above this ..."""
    approx_kl_max: float = 0.05
    """... or approximate KL(pi_old || pi) per token above this ..."""
    patience: int = 3
    """... for this many consecutive steps."""
    clipfrac_side_max: float = 0.2
    """Clip side: `policy/clipfrac_high` or `policy/clipfrac_low` above this for `patience`
    consecutive steps (reported by updates_too_large instead while that one fires)."""
    zero_std_group_frac_max: float = 0.5
    """Zero-variance groups: mean share of groups whose samples all scored alike
    (`reward/zero_std_group_frac`) over the last window above this."""

    def validate(self) -> None:
        """Raise ConfigError for a name in `disabled` that is not a check, or a window or
        patience below 1."""
        unknown = [name for name in self.disabled if name not in CHECKS]
        if unknown:
            raise ConfigError(f"diagnostics.disabled: unknown check {unknown[0]!r}; checks: {', '.join(CHECKS[:-1])}")
        if self.window < 1 or self.patience < 1:
            raise ConfigError("diagnostics.window and diagnostics.patience: expected positive integers")


@dataclass
class Alert:
    step: int
    check: str
    severity: str  # "warning" | "error"
    message: str
    evidence: dict

    def __str__(self) -> str:
        return f"[{self.severity}] step {self.step} {self.check}: {self.message}"

    def as_dict(self) -> dict:
        return dataclasses.asdict(self)


# --------------------------------------------------------------------------------------
# Text statistics logged by the trainer (response/distinct2, response/repeat_frac)
# --------------------------------------------------------------------------------------


def _ngrams(text: str, n: int) -> list[tuple[str, ...]]:
    words = text.split()
    return [tuple(words[i:i + n]) for i in range(len(words) - n + 1)]


def distinct_n(texts: list[str], n: int = 2) -> float:
    """Unique n-grams / all n-grams, over the whitespace tokens of all texts together
    (n-grams do not cross texts). 1.0 when there is no n-gram at all: nothing repeats (a
    collapse to very short responses is the length signal's to report)."""
    grams = [g for t in texts for g in _ngrams(t, n)]
    return len(set(grams)) / len(grams) if grams else 1.0


def repeated_ngram_fraction(texts: list[str], n: int = 4) -> float:
    """Per text, the share of its n-grams that repeat an earlier n-gram of the same text;
    averaged over the texts (a text too short for one n-gram counts as 0). 0.0 for no texts."""
    if not texts:
        return 0.0
    total = 0.0
    for text in texts:
        grams = _ngrams(text, n)
        if grams:
            total += (len(grams) - len(set(grams))) / len(grams)
    return total / len(texts)


# --------------------------------------------------------------------------------------
# The monitor
# --------------------------------------------------------------------------------------

# Metric keys kept in the windows (metrics.jsonl names).
SCORE, SCORE_STD, KL = "reward/score_mean", "reward/score_std", "kl/ref_mean"
ENTROPY, REPEAT, DISTINCT, LENGTH = "policy/entropy", "response/repeat_frac", "response/distinct2", "response/length_mean"
EV, CLIPFRAC, APPROX_KL, GAP = "value/explained_variance", "policy/clipfrac", "policy/approx_kl", "policy/logprob_gap"
CLIP_HIGH, CLIP_LOW, ZERO_STD = "policy/clipfrac_high", "policy/clipfrac_low", "reward/zero_std_group_frac"
JUDGE, EVAL_SCORE = "eval/judge_mean", "eval/score_mean"
TRACKED = (SCORE, SCORE_STD, KL, ENTROPY, REPEAT, DISTINCT, LENGTH, EV, CLIPFRAC, APPROX_KL, GAP, CLIP_HIGH, CLIP_LOW,
           ZERO_STD)


def _mean(values: list) -> Optional[float]:
    present = [v for v in values if v is not None]
    return sum(present) / len(present) if present else None


def _median(values: list) -> Optional[float]:
    present = sorted(v for v in values if v is not None)
    if not present:
        return None
    mid = len(present) // 2
    return present[mid] if len(present) % 2 else (present[mid - 1] + present[mid]) / 2


def _rounded(x: Optional[float]) -> Optional[float]:
    return None if x is None else round(x, 4)


class _CriticFreeChecks:
    """The checks of the critic-free algorithms (GRPO, RLOO, REINFORCE++) and of the clip's
    two sides, and the entropy and length signals they share with `collapse`; a part of
    `HealthMonitor`, whose windows they read."""

    def _entropy_fall(self, evidence: dict) -> Optional[str]:
        entropy, c = self._trend(ENTROPY), self.cfg
        if entropy and entropy[0] > 0 and entropy[1] < c.collapse_entropy_frac * entropy[0]:
            evidence.update(entropy_start=_rounded(entropy[0]), entropy_now=_rounded(entropy[1]))
            return f"entropy fell from {entropy[0]:.3g} to {entropy[1]:.3g}"
        return None

    def _length_change(self, evidence: dict) -> Optional[tuple[str, str]]:
        """("up" or "down", the signal) when the mean length drifted to the limit or shrank."""
        c, length, max_new = self.cfg, self._trend(LENGTH), self.max_new_tokens
        if length and max_new and length[1] >= c.collapse_length_limit_frac * max_new \
                and length[1] - length[0] >= c.collapse_length_drift * max_new:
            evidence.update(length_start=_rounded(length[0]), length_now=_rounded(length[1]), max_new_tokens=max_new)
            return "up", (f"mean length drifted from {length[0]:.1f} to {length[1]:.1f} tokens, "
                          f"at the limit rollout.max_new_tokens={max_new}")
        if length and length[0] > 0 and length[1] < c.collapse_length_drop_frac * length[0]:
            evidence.update(length_start=_rounded(length[0]), length_now=_rounded(length[1]))
            return "down", f"mean length shrank from {length[0]:.1f} to {length[1]:.1f} tokens"
        return None

    def _zero_variance_groups(self):
        c = self.cfg
        shares = [v for v in self.recent[ZERO_STD][-c.window:] if v is not None]
        if len(shares) < c.window or _mean(shares) <= c.zero_std_group_frac_max:
            return None
        share, score = _mean(shares), _mean(self.recent[SCORE][-c.window:])
        return (f"{share:.0%} of the groups (mean of the last {c.window} steps) scored all their samples alike: "
                "under a group baseline they get advantage 0 and add no gradient, so each step learns from the "
                f"rest alone. The prompts are too easy (all right) or too hard (all wrong) for the model (mean score "
                f"{score:.3g}): raise rollout.samples_per_prompt or rollout.temperature, or give prompts of a "
                "difficulty the model solves sometimes; falling entropy makes it worse",
                {"zero_std_group_frac": _rounded(share), "score_mean": _rounded(score), "steps": c.window})

    def _entropy_collapse(self):
        evidence = {}
        signal = self._entropy_fall(evidence) if self.critic_free else None
        if signal is None:
            return None
        return (f"{signal} nats per token (below {self.cfg.collapse_entropy_frac:g} of the start): the policy turns "
                "deterministic, the samples of a prompt become alike and their groups stop carrying signal. With "
                "a symmetric clip an unlikely token can gain little per step (DAPO): raise ppo.clip_eps_high "
                "(e.g. 0.28), add a small ppo.entropy_coef, raise rollout.temperature, or lower ppo.lr", evidence)

    def _length_drift(self):
        evidence = {}
        found = self._length_change(evidence) if self.critic_free else None
        if found is None:
            return None
        direction, signal = found
        if direction == "up":
            return (f"{signal}: responses are cut off unfinished. Penalise responses without EOS "
                    "(reward.missing_eos_penalty) or raise rollout.max_new_tokens; with ppo.loss_agg="
                    "seq-mean-token-mean a long wrong answer is penalised less per token: use token-mean or "
                    "seq-mean-token-sum-norm (the dr_grpo preset)", evidence)
        return (f"{signal}: the reward or the loss favours short answers. With ppo.loss_agg=seq-mean-token-mean "
                "each token of a short answer weighs more (the length bias Dr. GRPO removes): use token-mean or "
                "seq-mean-token-sum-norm; otherwise check the reward function for a length preference", evidence)

    def _clip_side(self):
        c = self.cfg
        if self.streak >= c.patience and "updates_too_large" not in c.disabled:
            return None  # updates_too_large reports it, with the sides in its evidence
        for key, side in ((CLIP_HIGH, "upper"), (CLIP_LOW, "lower")):
            last = self.recent[key][-c.patience:]
            if len(last) < c.patience or any(v is None or v <= c.clipfrac_side_max for v in last):
                continue
            share = _mean(last)
            if side == "upper":
                what = ("ratio above 1 + ppo.clip_eps_high with a positive advantage: the update pushes good tokens "
                        "up faster than the clip lets it, and their gradient is cut")
            else:
                what = ("ratio below 1 - ppo.clip_eps with a negative advantage: the update pushes bad tokens down "
                        "faster than the clip lets it, and their gradient is cut")
            return (f"for {c.patience} steps {share:.0%} of the tokens hit the {side} clip ({what}). Lower ppo.lr or "
                    "ppo.epochs, or use a larger ppo.minibatch_size; with ppo.policy_loss=gspo a share near 15% is "
                    "usual, and its clip range (ppo.clip_eps, ppo.clip_eps_high) should be about 3e-4 and 4e-4",
                    {"side": side, "clipfrac": _rounded(share), "limit": c.clipfrac_side_max, "steps": c.patience})
        return None


class _UpdateChecks:
    """The checks of sampling and of the updates: a negative KL or a log-prob gap (samples not
    drawn from the trained policy), a critic that does not learn, updates that move the policy
    too far; a part of `HealthMonitor`, whose windows they read."""

    def _negative_kl(self):
        c = self.cfg
        if self.n < c.window:
            return None
        kl, gap = _mean(self.recent[KL][-c.window:]), _mean(self.recent[GAP][-c.window:])
        evidence, found = {"kl_mean": _rounded(kl), "logprob_gap": _rounded(gap)}, []
        if kl is not None and kl < -c.negative_kl_tol:
            found.append(f"the mean KL estimate over the last {c.window} steps is negative ({kl:.3g} nats)")
        if gap is not None and gap > c.logprob_gap_max:
            found.append(f"generation and training log-probs differ by {gap:.3g} per token")
        if not found:
            return None
        return (" and ".join(found) + ": the samples are not drawn from the policy being trained. Turn off "
                "rollout.top_k / rollout.top_p (and any min-length or repetition penalty), and recompute log-probs "
                "at rollout.temperature; a log-prob gap with plain sampling points to a dtype or backend mismatch "
                "(try model.dtype=float32)", evidence)

    def _critic_not_learning(self):
        c = self.cfg
        steps = self.recent_steps[-c.window:]
        if len(steps) < c.window or steps[0] <= c.warmup_steps:
            return None
        # The median: one batch with near-constant returns gives a huge negative EV on its own.
        ev = _median(self.recent[EV][-c.window:])
        if ev is None or ev > c.critic_ev_min:
            return None
        return (f"the critic's explained variance is {ev:.3g} (median of the last {c.window} steps, after "
                f"{c.warmup_steps} warm-up steps): it predicts the returns no better than a constant, so the "
                "advantages are noise. Check model.critic (start it from the reward model), ppo.critic_lr "
                "(too low to learn, or so high the value loss jumps) and ppo.value_clip",
                {"explained_variance": _rounded(ev), "warmup_steps": c.warmup_steps})

    def _updates_too_large(self):
        c = self.cfg
        if self.streak < c.patience:
            return None
        clipfrac = _mean(self.recent[CLIPFRAC][-c.patience:]) or 0.0
        approx_kl = _mean(self.recent[APPROX_KL][-c.patience:]) or 0.0
        return (f"for {self.streak} steps the clip fraction ({clipfrac:.2f}, limit "
                f"{c.clipfrac_max:g}) or approximate KL ({approx_kl:.3g}, limit "
                f"{c.approx_kl_max:g}) stayed too high: each update moves the policy far from the rollout policy. "
                "Lower ppo.lr or ppo.epochs, or use larger ppo.minibatch_size",
                {"clipfrac": _rounded(clipfrac), "approx_kl": _rounded(approx_kl), "steps": self.streak,
                 "clipfrac_high": _rounded(_mean(self.recent[CLIP_HIGH][-c.patience:])),
                 "clipfrac_low": _rounded(_mean(self.recent[CLIP_LOW][-c.patience:]))})


class HealthMonitor(_CriticFreeChecks, _UpdateChecks):
    """Feed it metrics rows in step order; it returns the alerts that fire.

    `critic_free`: the run's advantage estimator reads no critic (GRPO, RLOO, REINFORCE++).
    Falling entropy and drifting length are then reported by `entropy_collapse` and
    `length_drift`, whose causes and knobs are those of these algorithms, instead of by
    `collapse`, which then reads the text signals alone.
    """

    def __init__(self, cfg: DiagnosticsConfig, *, kl_target: float | None = None, max_new_tokens: int | None = None,
                 critic_free: bool = False):
        cfg.validate()
        self.cfg = cfg
        self.kl_target = kl_target
        self.max_new_tokens = max_new_tokens
        self.critic_free = critic_free
        self.n = 0  # rows observed
        self.start: dict[str, list] = {k: [] for k in TRACKED}  # the first `window` rows
        self.recent: dict[str, list] = {k: [] for k in TRACKED}  # the last `keep` rows
        self.recent_steps: list[int] = []
        self.first_eval: Optional[dict] = None  # {"step", "judge", "score"}
        self.last_eval: Optional[dict] = None
        self.streak = 0  # consecutive steps with too-large updates
        self.last_fired: dict[str, int] = {}

    @property
    def _keep(self) -> int:
        return max(self.cfg.window, self.cfg.over_reg_steps, self.cfg.patience)

    # -- state for resume ---------------------------------------------------------------

    def state_dict(self) -> dict:
        return {"n": self.n, "start": self.start, "recent": self.recent, "recent_steps": self.recent_steps,
                "first_eval": self.first_eval, "last_eval": self.last_eval, "streak": self.streak,
                "last_fired": self.last_fired}

    def load_state_dict(self, d: dict) -> None:
        self.n = int(d["n"])
        self.start = {k: list(d["start"].get(k, [])) for k in TRACKED}
        self.recent = {k: list(d["recent"].get(k, [])) for k in TRACKED}
        self.recent_steps = [int(s) for s in d["recent_steps"]]
        self.first_eval, self.last_eval = d["first_eval"], d["last_eval"]
        self.streak = int(d["streak"])
        self.last_fired = {k: int(v) for k, v in d["last_fired"].items()}

    # -- the stream ---------------------------------------------------------------------

    def non_finite(self, step: int, where: str, *, refused: bool = True) -> Alert:
        """The error alert for a NaN or Inf in `where`: by default, for a step the trainer
        refused before any weight changed (the run then stops)."""
        outcome = "the step was refused and the run stops" if refused else "this step's numbers cannot be trusted"
        return Alert(
            step=step, check="non_finite", severity="error",
            message=(f"non-finite value in {where}: {outcome}. Usual causes: fp16/bf16 overflow (set "
                     "model.dtype=float32), a division by a zero standard deviation (tiny batches with "
                     "ppo.whiten_advantages or ppo.whiten_rewards), or a learning rate too high (lower ppo.lr / "
                     "ppo.critic_lr)"),
            evidence={"where": where},
        )

    def observe(self, metrics: dict) -> list[Alert]:
        """Take one metrics row; return the alerts that fire now (each check at most once
        per `cooldown` steps). A row with a NaN or Inf gives a non_finite error alert and is
        not added to the windows."""
        step = int(metrics.get("step", self.n + 1))
        bad = sorted(k for k, v in metrics.items() if isinstance(v, float) and not math.isfinite(v))
        if bad:
            return [self.non_finite(step, "metrics " + ", ".join(bad), refused=False)]
        self._record(step, metrics)
        if not self.cfg.enabled:
            return []
        alerts = []
        for name, check in (
            ("reward_hacking", self._reward_hacking),
            ("collapse", self._collapse),
            ("over_regularised", self._over_regularised),
            ("negative_kl", self._negative_kl),
            ("critic_not_learning", self._critic_not_learning),
            ("updates_too_large", self._updates_too_large),
            ("zero_variance_groups", self._zero_variance_groups),
            ("entropy_collapse", self._entropy_collapse),
            ("length_drift", self._length_drift),
            ("clip_side", self._clip_side),
        ):
            if name in self.cfg.disabled:
                continue
            found = check()
            if found is None:
                continue
            last = self.last_fired.get(name)
            if last is not None and step - last < self.cfg.cooldown:
                continue
            self.last_fired[name] = step
            message, evidence = found
            alerts.append(Alert(step=step, check=name, severity="warning", message=message, evidence=evidence))
        return alerts

    def _record(self, step: int, metrics: dict) -> None:
        self.n += 1
        for k in TRACKED:
            v = metrics.get(k)
            v = float(v) if isinstance(v, (int, float)) else None
            if self.n <= self.cfg.window:
                self.start[k].append(v)
            self.recent[k] = (self.recent[k] + [v])[-self._keep:]
        self.recent_steps = (self.recent_steps + [step])[-self._keep:]
        if isinstance(metrics.get(JUDGE), (int, float)):
            ev = {"step": step, "judge": float(metrics[JUDGE]),
                  "score": float(metrics[EVAL_SCORE]) if isinstance(metrics.get(EVAL_SCORE), (int, float)) else None}
            if self.first_eval is None:
                self.first_eval = ev
            self.last_eval = ev
        too_large = ((metrics.get(CLIPFRAC) or 0.0) > self.cfg.clipfrac_max
                     or (metrics.get(APPROX_KL) or 0.0) > self.cfg.approx_kl_max)
        self.streak = self.streak + 1 if too_large else 0

    # -- windows --------------------------------------------------------------------------

    def _trend(self, key: str) -> Optional[tuple[float, float]]:
        """(start, now) means of `key`, or None before 2 * window rows or without data."""
        if self.n < 2 * self.cfg.window:
            return None
        start, now = _mean(self.start[key]), _mean(self.recent[key][-self.cfg.window:])
        return None if start is None or now is None else (start, now)

    def _score_scale(self) -> float:
        """The batch std of the score at the start: the unit in which score changes are judged."""
        std = _mean(self.start[SCORE_STD])
        return std if std and std > 1e-8 else 1.0

    # -- the checks: each returns None or (message, evidence) -----------------------------

    def _reward_hacking(self):
        c, scale = self.cfg, self._score_scale()
        score = self._trend(SCORE)
        rise = None if score is None else (score[1] - score[0]) / scale
        reasons, evidence = [], {}
        if score is not None:
            evidence.update(score_start=_rounded(score[0]), score_now=_rounded(score[1]), score_rise_std=_rounded(rise))

        first, last = self.first_eval, self.last_eval
        if first is not None and last is not None and last["step"] > first["step"]:
            # Over the judge's span: the reward-model score on the same held-out prompts if
            # logged, else the training score.
            if first["score"] is not None and last["score"] is not None:
                eval_rise, where = (last["score"] - first["score"]) / scale, "held-out "
            else:
                eval_rise, where = rise, ""
            gain = last["judge"] - first["judge"]
            if eval_rise is not None and eval_rise >= c.hacking_score_rise and gain <= c.hacking_judge_min_gain:
                verb = "fell" if gain < 0 else "stalled"
                reasons.append(f"the {where}reward-model score rose {eval_rise:.2f} std while the judge {verb} "
                               f"({first['judge']:.3g} at step {first['step']} -> {last['judge']:.3g} at step "
                               f"{last['step']})")
                evidence.update(judge_first=_rounded(first["judge"]), judge_last=_rounded(last["judge"]),
                                judge_steps=[first["step"], last["step"]], eval_score_rise_std=_rounded(eval_rise))

        kl = _mean(self.recent[KL][-c.window:])
        limit = c.hacking_kl_factor * self.kl_target if self.kl_target else c.hacking_kl_max
        if rise is not None and rise >= c.hacking_score_rise and kl is not None and kl > limit:
            what = f"{c.hacking_kl_factor:g}x ppo.kl_target={self.kl_target:g}" if self.kl_target else f"{limit:g} nats"
            reasons.append(f"the reward-model score rose {rise:.2f} std while the KL to the reference reached "
                           f"{kl:.3g} nats, past {what}")
            evidence.update(kl_now=_rounded(kl), kl_limit=_rounded(limit))
        if not reasons:
            return None
        knob = ("Raise ppo.kl_coef or shorten ppo.kl_horizon so the controller catches up (or lower ppo.kl_target)"
                if self.kl_target else "Raise ppo.kl_coef or set ppo.kl_target")
        return "; ".join(reasons) + f": the policy is likely exploiting the reward model. {knob}, and read the samples", \
            evidence

    def _collapse(self):
        c, signals, evidence = self.cfg, [], {}
        if not self.critic_free:
            signals.append(self._entropy_fall(evidence))
        repeat = self._trend(REPEAT)
        if repeat and repeat[1] - repeat[0] >= c.collapse_repeat_rise:
            signals.append(f"repeated 4-grams rose from {repeat[0]:.0%} to {repeat[1]:.0%}")
            evidence.update(repeat_start=_rounded(repeat[0]), repeat_now=_rounded(repeat[1]))
        distinct = self._trend(DISTINCT)
        if distinct and distinct[0] > 0 and distinct[1] < c.collapse_distinct_frac * distinct[0]:
            signals.append(f"distinct bigrams fell from {distinct[0]:.0%} to {distinct[1]:.0%}")
            evidence.update(distinct2_start=_rounded(distinct[0]), distinct2_now=_rounded(distinct[1]))
        if not self.critic_free:
            length = self._length_change(evidence)
            signals.append(length[1] if length else None)
        signals = [s for s in signals if s]
        if not signals:
            return None
        evidence["signals"] = len(signals)
        return ("the policy is collapsing: " + "; ".join(signals)
                + ". Usual cause: the reward is being exploited with too little KL regularisation: raise "
                "ppo.kl_coef or set ppo.kl_target (a small ppo.entropy_coef also helps); a length drift points to "
                "a length exploit of the reward model or of the EOS handling (reward.missing_eos_penalty)", evidence)

    def _over_regularised(self):
        c = self.cfg
        if c.over_reg_steps < 1 or self.n < c.over_reg_steps:
            return None
        kls = [v for v in self.recent[KL][-c.over_reg_steps:] if v is not None]
        scores = self.recent[SCORE][-c.over_reg_steps:]
        if len(kls) < c.over_reg_steps or max(abs(v) for v in kls) >= c.over_reg_kl:
            return None
        half = max(1, min(c.window, c.over_reg_steps // 2))
        first, last = _mean(scores[:half]), _mean(scores[-half:])
        if first is None or last is None:
            return None
        rise = (last - first) / self._score_scale()
        if rise >= c.over_reg_score_rise:
            return None
        return (f"for {c.over_reg_steps} steps the KL to the reference stayed below {c.over_reg_kl:g} nats and the "
                f"score moved {rise:+.2f} std: the policy is barely moving. Lower ppo.kl_coef (or ppo.kl_target), "
                "raise ppo.lr, or check that the advantages are not masked out",
                {"kl_max_abs": _rounded(max(abs(v) for v in kls)), "score_rise_std": _rounded(rise),
                 "steps": c.over_reg_steps})
