"""The run report: `report.html` (self-contained) and PNG plots under `RUN_DIR/plots/`.

Reads what the trainer wrote into the run directory: metrics.jsonl (required),
alerts.jsonl, samples.jsonl, tokens.jsonl and config.yaml (all optional). The page has
the training curves with the alerts marked on them, the alerts table, sample responses at
chosen steps, and a token inspector that shows, for logged responses, each token's
advantage, probability ratio, KL to the reference and value, and where the PPO clip took
its gradient away. No network: plots are inline base64 PNGs, CSS and script are inline.
"""

from __future__ import annotations

import base64
import html
import io
import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path

from rlhf.errors import UserInputError

MAX_INSPECTED = 6  # token-inspector sequences shown
MAX_TOKENS = 400  # tokens shown per inspected sequence
MAX_SAMPLE_STEPS = 8

SEVERITY_COLOURS = {"warning": "#e67e00", "error": "#c0392b"}


# --------------------------------------------------------------------------------------
# Reading the run directory
# --------------------------------------------------------------------------------------


def _read_jsonl(path: Path) -> tuple[list[dict], int]:
    """Rows of a JSONL file and how many lines were unreadable (a run killed mid-write
    leaves a partial last line)."""
    rows, bad = [], 0
    if not path.is_file():
        return rows, bad
    with open(path, encoding="utf-8", errors="replace") as f:
        for line in f:
            line = line.strip()
            if not line:
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                bad += 1
                continue
            if isinstance(row, dict):
                rows.append(row)
            else:
                bad += 1
    return rows, bad


def _n_clipped(row: dict) -> int:
    return sum(1 for c in row.get("clip") or [] if c)


def _read_token_rows(path: Path) -> tuple[list[dict], int]:
    """The token records the inspector shows, in file order: the first and the last, the
    one with the most clipped tokens, and evenly spaced ones between (MAX_INSPECTED in
    all); and how many lines were unreadable. Two passes, so that a long run's file is
    never held in memory whole."""
    if not path.is_file():
        return [], 0
    index, bad = [], 0  # (line number, clipped tokens) of each usable record
    with open(path, encoding="utf-8", errors="replace") as f:
        for lineno, line in enumerate(f):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                bad += 1
                continue
            if isinstance(row, dict) and isinstance(row.get("tokens"), list) and row["tokens"]:
                index.append((lineno, _n_clipped(row)))
    if not index:
        return [], bad
    k = MAX_INSPECTED - 3
    picks = [0, len(index) - 1, max(range(len(index)), key=lambda i: index[i][1])]
    picks += [round(i * (len(index) - 1) / (k + 1)) for i in range(1, k + 1)]
    wanted = {index[i][0] for i in list(dict.fromkeys(picks))[:MAX_INSPECTED]}
    with open(path, encoding="utf-8", errors="replace") as f:
        return [json.loads(line) for lineno, line in enumerate(f) if lineno in wanted], bad


def _read_config(path: Path) -> dict:
    if not path.is_file():
        return {}
    import yaml

    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError:
        return {}
    return data if isinstance(data, dict) else {}


def _cfg(config: dict, dotted: str, default=None):
    node = config
    for part in dotted.split("."):
        if not isinstance(node, dict) or part not in node:
            return default
        node = node[part]
    return node


def _number(x) -> float | None:
    return float(x) if isinstance(x, (int, float)) and not isinstance(x, bool) else None


@dataclass
class Run:
    path: Path
    metrics: list[dict]
    alerts: list[dict]
    samples: list[dict]
    tokens: list[dict]  # only the records the token inspector shows
    config: dict
    config_text: str
    skipped: dict = field(default_factory=dict)

    def series(self, key: str) -> tuple[list[int], list[float]]:
        """(steps, values) for a metric key, skipping rows that lack it."""
        steps, values = [], []
        for row in self.metrics:
            v = _number(row.get(key))
            if v is not None:
                steps.append(row["step"])
                values.append(v)
        return steps, values


def load_run(run_dir: Path) -> Run:
    run_dir = Path(run_dir)
    metrics_path = run_dir / "metrics.jsonl"
    if not run_dir.is_dir():
        raise UserInputError(f"{run_dir}: no such directory; give a run directory (train.out_dir)")
    if not metrics_path.is_file():
        raise UserInputError(f"{run_dir}: no metrics.jsonl here; give the run directory of `rlhf ppo`, `sft` or `dpo` "
                             "(train.out_dir) or of `rlhf reward-model` (out_dir)")
    rows, bad = _read_jsonl(metrics_path)
    # A resumed run re-logs the steps after its last checkpoint: keep the latest of each step.
    by_step: dict[int, dict] = {}
    for i, row in enumerate(rows):
        step = row.get("step")
        by_step[int(step) if isinstance(step, (int, float)) else i + 1] = row
    metrics = [{**by_step[s], "step": s} for s in sorted(by_step)]
    if not metrics:
        raise UserInputError(f"{metrics_path}: no readable metrics rows; the run has not finished a step yet")
    skipped = {"metrics.jsonl": bad} if bad else {}
    loaded = {}
    for name in ("alerts.jsonl", "samples.jsonl", "tokens.jsonl"):
        reader = _read_token_rows if name == "tokens.jsonl" else _read_jsonl
        loaded[name], bad = reader(run_dir / name)
        if bad:
            skipped[name] = bad
    config_path = run_dir / "config.yaml"
    return Run(path=run_dir, metrics=metrics, alerts=loaded["alerts.jsonl"], samples=loaded["samples.jsonl"],
               tokens=loaded["tokens.jsonl"], config=_read_config(config_path),
               config_text=config_path.read_text(errors="replace") if config_path.is_file() else "",
               skipped=skipped)


# --------------------------------------------------------------------------------------
# Plots
# --------------------------------------------------------------------------------------


@dataclass
class Panel:
    name: str
    title: str
    left: list[tuple[str, str]]  # (metric key, legend label)
    ylabel: str
    right: list[tuple[str, str]] = field(default_factory=list)  # on a second y axis
    right_label: str = ""
    checks: tuple[str, ...] = ()  # alerts marked on this panel
    caption: str = ""


PANELS = [
    Panel("score", "Reward-model score and judge", [("reward/score_mean", "score (train batch)"),
                                                   ("reward/total_mean", "total reward incl. KL penalty"),
                                                   ("eval/score_mean", "score (held-out)")],
          "score", [("eval/judge_mean", "judge (held-out)")], "judge", ("reward_hacking", "over_regularised"),
          "Band: ±1 batch std of the score. A score that rises while the judge falls or stalls is reward hacking."),
    Panel("kl", "KL to the reference and its coefficient", [("kl/ref_mean", "KL (sequence, k1)"),
                                                            ("kl/target", "KL target")],
          "nats", [("kl/coef", "kl_coef (beta)")], "beta", ("reward_hacking", "over_regularised", "negative_kl"),
          "KL far past its target while the score rises: reward hacking. Near zero for long: over-regularised. "
          "Below zero: off-policy samples."),
    Panel("entropy", "Policy entropy", [("policy/entropy", "mean per-token entropy")], "nats",
          checks=("collapse", "entropy_collapse"),
          caption="A fall to a small fraction of the start is a collapse."),
    Panel("clipfrac", "Clip fraction", [("policy/clipfrac", "policy clip fraction"),
                                        ("policy/clipfrac_high", "upper side (A > 0)"),
                                        ("policy/clipfrac_low", "lower side (A < 0)"),
                                        ("value/clipfrac", "value clip fraction")], "share of tokens",
          checks=("updates_too_large", "clip_side"), caption="Share of tokens whose gradient the PPO clip removed."),
    Panel("groups", "Groups with no signal", [("reward/zero_std_group_frac", "groups scored all alike")],
          "share of groups", checks=("zero_variance_groups",),
          caption="A group whose samples all scored alike gets advantage 0 and teaches nothing."),
    Panel("approx_kl", "Approximate KL between updates", [("policy/approx_kl", "approx KL(pi_old || pi)")],
          "nats per token", checks=("updates_too_large",), caption="How far each update moved the policy."),
    Panel("value_loss", "Value loss", [("value/loss", "critic loss")], "loss", checks=("critic_not_learning",)),
    Panel("explained_variance", "Critic explained variance", [("value/explained_variance", "explained variance")],
          "EV", checks=("critic_not_learning",),
          caption="At or below 0 after warm-up: the critic is not learning. The axis stops at -1."),
    Panel("length", "Response length", [("response/length_mean", "mean tokens")], "tokens",
          [("response/eos_frac", "share ending with EOS")], "EOS share", ("collapse", "length_drift"),
          "Drift to the limit (no EOS) or to nothing is a length exploit."),
    Panel("diversity", "Diversity", [("response/distinct2", "distinct bigrams"),
                                     ("response/repeat_frac", "repeated 4-grams")], "share", checks=("collapse",)),
    Panel("time", "Time per step", [("time/rollout_s", "rollout"), ("time/score_s", "scoring"),
                                    ("time/update_s", "update"), ("time/step_s", "step")], "seconds",
          [("throughput/tokens_per_s", "tokens/s")], "tokens/s"),
    Panel("loss", "Loss (rlhf sft, rlhf dpo)", [("train/loss", "train batch"), ("eval/loss", "held-out")],
          "loss", caption="SFT: nats per learned token; DPO: per pair (log 2 at the start). Held-out loss "
          "rising while the training loss falls: overfitting."),
    Panel("dpo_rewards", "Implicit rewards (rlhf dpo)", [("rewards/chosen", "chosen"), ("rewards/rejected", "rejected"),
                                                         ("rewards/margin", "margin"),
                                                         ("eval/rewards/margin", "margin (held-out)")],
          "beta x log-ratio", [("rewards/accuracy", "accuracy"), ("eval/rewards/accuracy", "accuracy (held-out)")],
          "share ranked right", caption="Both rewards falling while the margin grows: the policy lowers the "
          "likelihood of chosen responses too, a known DPO failure; a larger beta holds it back."),
]


def _smooth(values: list[float], k: int) -> list[float]:
    """Centred moving average over 2k+1 points (non-finite values skipped), O(n)."""
    sums, counts = [0.0], [0]
    for v in values:
        ok = math.isfinite(v)
        sums.append(sums[-1] + (v if ok else 0.0))
        counts.append(counts[-1] + ok)
    out = []
    for i in range(len(values)):
        lo, hi = max(0, i - k), min(len(values), i + k + 1)
        n = counts[hi] - counts[lo]
        out.append((sums[hi] - sums[lo]) / n if n else float("nan"))
    return out


def _png(fig) -> bytes:
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    FigureCanvasAgg(fig)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    return buf.getvalue()


def _mark_alerts(ax, alerts: list[dict], checks: tuple[str, ...]) -> None:
    seen = set()
    for a in alerts:
        if a.get("check") not in checks and a.get("check") != "non_finite":
            continue
        step = _number(a.get("step"))
        if step is None:
            continue
        colour = SEVERITY_COLOURS.get(a.get("severity"), "#e67e00")
        label = a["check"] if a["check"] not in seen else None
        seen.add(a["check"])
        ax.axvline(step, color=colour, linestyle="--", linewidth=1.2, alpha=0.8, label=f"alert: {label}" if label else None)


def _plot_panel(run: Run, panel: Panel, thresholds: dict) -> bytes | None:
    from matplotlib.figure import Figure

    left = [(k, lab, *run.series(k)) for k, lab in panel.left]
    left = [s for s in left if s[2]]
    right = [(k, lab, *run.series(k)) for k, lab in panel.right]
    right = [s for s in right if s[2]]
    if not left and not right:
        return None
    fig = Figure(figsize=(6.4, 3.3))
    ax = fig.add_subplot(1, 1, 1)
    colours = ["#1f77b4", "#2ca02c", "#9467bd", "#17becf", "#bcbd22"]
    for i, (key, label, steps, values) in enumerate(left):
        colour = colours[i % len(colours)]
        style = {"marker": "o", "markersize": 4} if len(steps) < 3 or key.startswith("eval/") else {}
        if key == "kl/target":
            ax.plot(steps, values, color="#7f7f7f", linestyle=":", linewidth=1.5, label=label)
            continue
        if len(steps) >= 20 and not key.startswith("eval/"):
            ax.plot(steps, values, color=colour, alpha=0.3, linewidth=1)
            ax.plot(steps, _smooth(values, max(1, len(steps) // 40)), color=colour, linewidth=1.8, label=label)
        else:
            ax.plot(steps, values, color=colour, linewidth=1.8, label=label, **style)
        if key == "reward/score_mean":
            _, stds = run.series("reward/score_std")
            if len(stds) == len(values):
                ax.fill_between(steps, [v - s for v, s in zip(values, stds)], [v + s for v, s in zip(values, stds)],
                                color=colour, alpha=0.12, linewidth=0)
    for value, label in thresholds.get(panel.name, []):
        ax.axhline(value, color="#555555", linestyle=":", linewidth=1.2, label=label)
    _mark_alerts(ax, run.alerts, panel.checks)
    if panel.name == "explained_variance":
        # A fresh value head starts far below -1; the range that matters is around [0, 1].
        low = min((v for _, _, _, values in left for v in values if math.isfinite(v)), default=-1.0)
        ax.set_ylim(max(low, -1.0) - 0.05, 1.05)
    ax.set_xlabel("step")
    ax.set_ylabel(panel.ylabel)
    ax.grid(alpha=0.3)
    handles, labels = ax.get_legend_handles_labels()
    if right:
        ax2 = ax.twinx()
        for i, (key, label, steps, values) in enumerate(right):
            colour = ["#d62728", "#e377c2"][i % 2]
            style = {"marker": "s", "markersize": 4} if key.startswith("eval/") or len(steps) < 3 else {}
            ax2.plot(steps, values, color=colour, linewidth=1.5, label=label, **style)
        finite = [v for _, _, _, values in right for v in values if math.isfinite(v)]
        if finite and min(finite) >= 0:  # a constant beta or a share: show it against 0, not as an offset
            ax2.set_ylim(0, max(finite) * 1.15 or 1.0)
        ax2.set_ylabel(panel.right_label)
        h2, l2 = ax2.get_legend_handles_labels()
        handles, labels = handles + h2, labels + l2
    if handles:
        ax.legend(handles, labels, fontsize=7, loc="best", framealpha=0.8)
    ax.set_title(panel.title, fontsize=10)
    fig.tight_layout()
    return _png(fig)


def _plot_alert_timeline(run: Run) -> bytes:
    from matplotlib.figure import Figure

    from rlhf.diagnostics import CHECKS

    checks = list(CHECKS) + sorted({a.get("check") for a in run.alerts} - set(CHECKS) - {None})
    fig = Figure(figsize=(12.8, 0.45 * len(checks) + 1.0))
    ax = fig.add_subplot(1, 1, 1)
    for a in run.alerts:
        step = _number(a.get("step"))
        if step is None or a.get("check") not in checks:
            continue
        ax.scatter([step], [checks.index(a["check"])], s=60, marker="D",
                   color=SEVERITY_COLOURS.get(a.get("severity"), "#e67e00"), zorder=3)
    first, last = run.metrics[0]["step"], run.metrics[-1]["step"]
    ax.set_xlim(first - 0.5, max(last, first + 1) + 0.5)
    ax.set_yticks(range(len(checks)), checks, fontsize=8)
    ax.set_ylim(-0.7, len(checks) - 0.3)
    ax.set_xlabel("step")
    ax.grid(alpha=0.3)
    ax.set_title("Alerts over the run (orange: warning, red: error)", fontsize=10)
    fig.tight_layout()
    return _png(fig)


def _thresholds(run: Run) -> dict:
    """Horizontal reference lines from the diagnostics config (defaults when absent)."""
    from rlhf.diagnostics import DiagnosticsConfig

    d = DiagnosticsConfig()
    lines = {
        "clipfrac": [(_cfg(run.config, "diagnostics.clipfrac_max", d.clipfrac_max), "alert threshold")],
        "approx_kl": [(_cfg(run.config, "diagnostics.approx_kl_max", d.approx_kl_max), "alert threshold")],
        "explained_variance": [(_cfg(run.config, "diagnostics.critic_ev_min", d.critic_ev_min), "alert threshold")],
    }
    max_new = _cfg(run.config, "rollout.max_new_tokens")
    if _number(max_new):
        lines["length"] = [(max_new, "max_new_tokens")]
    return {k: [(float(v), lab) for v, lab in vals if _number(v) is not None] for k, vals in lines.items()}


# --------------------------------------------------------------------------------------
# Token inspector
# --------------------------------------------------------------------------------------


def _bytes_to_unicode() -> dict[str, int]:
    """GPT-2 byte-level BPE's printable stand-in for each byte, inverted (char -> byte)."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return {chr(c): b for b, c in zip(bs, cs)}


_BYTE_OF = _bytes_to_unicode()


def display_token(token: str) -> str:
    """A tokenizer's token as readable text: byte-level BPE stand-ins (Ġ, Ċ) decoded,
    SentencePiece's ▁ as a space, newlines and tabs as visible marks."""
    if token and all(ch in _BYTE_OF for ch in token):
        text = bytes(_BYTE_OF[ch] for ch in token).decode("utf-8", errors="replace")
    else:
        text = token.replace("▁", " ")
    text = text.replace("\r", "␍").replace("\n", "⏎").replace("\t", "⇥")
    return "".join(ch if ch.isprintable() or ch == " " else f"\\x{ord(ch):02x}" for ch in text)


def _advantage_colour(a: float, scale: float) -> str:
    """Diverging: blue for negative advantage, white at 0, red for positive."""
    t = max(-1.0, min(1.0, a / scale)) if scale > 0 and math.isfinite(a) else 0.0
    rgb = (214, 39, 40) if t > 0 else (31, 119, 180)
    return f"rgba({rgb[0]},{rgb[1]},{rgb[2]},{abs(t) * 0.75:.3f})"


def _fmt(x, spec: str = ".3f") -> str:
    v = _number(x)
    return "–" if v is None else format(v, spec)


def _clip_effect(clip: int, ratio, advantage, eps_low: float | None, eps_high: float | None) -> str:
    lo = f"{1 - eps_low:g}" if eps_low is not None else "1-ε"
    hi = f"{1 + eps_high:g}" if eps_high is not None else "1+ε"
    r = _fmt(ratio)
    if clip > 0:
        return (f"clipped high: ratio {r} > {hi} with A > 0, min() takes the clipped term, no gradient; "
                "the update stops pushing this token's probability up")
    if clip < 0:
        return (f"clipped low: ratio {r} < {lo} with A < 0, min() takes the clipped term, no gradient; "
                "the update stops pushing this token's probability down")
    a = _number(advantage) or 0.0
    if a > 0:
        return "not clipped: the gradient raises this token's probability"
    if a < 0:
        return "not clipped: the gradient lowers this token's probability"
    return "not clipped: zero advantage, no push either way"


INSPECTOR_KEYS = ("logprob", "old_logprob", "ref_logprob", "ratio", "clip", "advantage", "value", "return", "kl",
                  "reward")

CLIP_LABELS = {"high": "▲ high", "low": "▼ low", "": ""}

INSPECTOR_HEADER = ("<tr><th>#</th><th>token</th><th>advantage</th><th>ratio</th><th>clip</th>"
                    "<th>log-prob old → new</th><th>ref log-prob</th><th>KL</th><th>value</th><th>return</th>"
                    "<th>reward</th><th>what the clip does</th></tr>")


def _inspect_sequence(row: dict, n: int, scale: float, eps: tuple, open_table: bool) -> str:
    """One logged response: coloured token spans with tooltips, and the per-token table."""
    e = html.escape
    tokens = [str(t) for t in row["tokens"][:MAX_TOKENS]]
    cols = {k: list(row.get(k) or []) for k in INSPECTOR_KEYS}
    spans, table = [], []
    for i, tok in enumerate(tokens):
        v = {k: (cols[k][i] if i < len(cols[k]) else None) for k in INSPECTOR_KEYS}
        clip = int(v["clip"] or 0)
        colour = _advantage_colour(_number(v["advantage"]) or 0.0, scale)
        effect = _clip_effect(clip, v["ratio"], v["advantage"], *eps)
        side = "high" if clip > 0 else "low" if clip < 0 else ""
        mark = {"high": "<sup>▲</sup>", "low": "<sup>▼</sup>", "": ""}[side]
        tip = (f"#{i} {tok!r}\nadvantage {_fmt(v['advantage'], '+.3f')}\nratio {_fmt(v['ratio'])}\n{effect}"
               f"\nKL to ref {_fmt(v['kl'], '+.3f')}\nvalue {_fmt(v['value'])}  return {_fmt(v['return'])}"
               f"\nreward {_fmt(v['reward'], '+.3f')}\nlog-prob old {_fmt(v['old_logprob'])} new "
               f"{_fmt(v['logprob'])} ref {_fmt(v['ref_logprob'])}")
        spans.append(f"<span class='tok{' clip-' + side if side else ''}' data-i='{i}' style='background:{colour}' "
                     f"title='{e(tip)}'>{e(display_token(tok))}{mark}</span>")
        table.append(
            f"<tr class='{'clipped' if clip else ''}'><td>{i}</td><td class='mono'>{e(display_token(tok))}</td>"
            f"<td style='background:{colour}'>{_fmt(v['advantage'], '+.3f')}</td><td>{_fmt(v['ratio'])}</td>"
            f"<td>{CLIP_LABELS[side]}</td>"
            f"<td>{_fmt(v['old_logprob'])} → {_fmt(v['logprob'])}</td><td>{_fmt(v['ref_logprob'])}</td>"
            f"<td>{_fmt(v['kl'], '+.3f')}</td><td>{_fmt(v['value'])}</td><td>{_fmt(v['return'])}</td>"
            f"<td>{_fmt(v['reward'], '+.3f')}</td><td class='effect'>{e(effect)}</td></tr>")
    clips = [int(c or 0) for c in cols["clip"][:len(tokens)]]
    more = len(row["tokens"]) - len(tokens)
    return (f"<div class='inspect' id='inspect-{n}'><h3>Step {e(str(row.get('step', '?')))} · score "
            f"{_fmt(row.get('score'))} · {len(tokens)} tokens · clipped {clips.count(1)} ▲ / {clips.count(-1)} ▼</h3>"
            f"<div class='prompt'><b>Prompt</b> {e(str(row.get('prompt', '')))}</div>"
            f"<div class='tokens'>{''.join(spans)}{f' … {more} more' if more > 0 else ''}</div>"
            f"<details{' open' if open_table else ''}><summary>Per-token table</summary><div class='scroll'>"
            f"<table class='tokens-table'>{INSPECTOR_HEADER}{''.join(table)}</table></div></details></div>")


def _inspector_html(run: Run) -> str:
    rows = run.tokens
    if not rows:
        return "<p class='muted'>No tokens.jsonl in this run directory: nothing to inspect.</p>"
    eps_low = _number(_cfg(run.config, "ppo.clip_eps"))
    eps = (eps_low, _number(_cfg(run.config, "ppo.clip_eps_high")) or eps_low)
    # One colour scale for all sequences: the 98th percentile of |advantage| saturates.
    advs = sorted(abs(v) for r in rows for v in (r.get("advantage") or [])[:MAX_TOKENS]
                  if _number(v) is not None and math.isfinite(v))
    scale = (advs[min(len(advs) - 1, int(0.98 * len(advs)))] if advs else 1.0) or 1.0
    legend = "".join(f"<span class='legend-cell' style='background:{_advantage_colour(t * scale, scale)}'>"
                     f"{t * scale:+.2f}</span>" for t in (-1, -0.5, 0, 0.5, 1))
    intro = (
        "<p>Each token of a logged response, coloured by its advantage "
        f"(whitened; colour saturates at ±{scale:.2f}): {legend}. "
        "<span class='tok clip-high demo'>▲</span> clipped at the high side (ratio above 1+ε with A&nbsp;&gt;&nbsp;0), "
        "<span class='tok clip-low demo'>▼</span> clipped at the low side (ratio below 1−ε with A&nbsp;&lt;&nbsp;0): "
        "there the clipped term wins the min() and the token gets no gradient. Hover a token for its ratio, KL "
        "and value; open the table for every number. Ratio, clip and new log-prob are after the step's update.</p>")
    most_clipped = max(rows, key=_n_clipped)
    return intro + "\n".join(_inspect_sequence(row, n, scale, eps, row is most_clipped) for n, row in enumerate(rows))


# --------------------------------------------------------------------------------------
# Page sections
# --------------------------------------------------------------------------------------


def _summary_html(run: Run) -> str:
    e = html.escape
    c = run.config

    def mean_of(key: str, rows: list[dict]) -> str:
        vals = [_number(r.get(key)) for r in rows]
        vals = [v for v in vals if v is not None]
        return f"{sum(vals) / len(vals):.3f}" if vals else "–"

    head, tail = run.metrics[:5], run.metrics[-5:]
    items = [
        ("run directory", str(run.path.resolve())),
        ("steps", f"{run.metrics[0]['step']}–{run.metrics[-1]['step']} ({len(run.metrics)} logged)"),
        ("policy", _cfg(c, "model.policy")),
        ("reward", _cfg(c, "reward.model") or _cfg(c, "reward.function") or ", ".join(_cfg(c, "reward.functions") or [])),
        ("judge", _cfg(c, "eval.judge")),
        ("algorithm", _cfg(c, "ppo.algo")),
        ("kl_coef / kl_target", f"{_cfg(c, 'ppo.kl_coef', '–')} / {_cfg(c, 'ppo.kl_target', '–')}"),
        ("lr", _cfg(c, "ppo.lr")),
        ("score (first 5 → last 5 steps)", f"{mean_of('reward/score_mean', head)} → {mean_of('reward/score_mean', tail)}"),
        ("KL (first 5 → last 5 steps)", f"{mean_of('kl/ref_mean', head)} → {mean_of('kl/ref_mean', tail)}"),
        ("alerts", str(len(run.alerts))),
    ]
    judge_steps, judge = run.series("eval/judge_mean")
    if judge:
        items.insert(-1, ("judge (first → last eval)", f"{judge[0]:.3f} (step {judge_steps[0]}) → {judge[-1]:.3f} "
                                                         f"(step {judge_steps[-1]})"))
    cells = "".join(f"<tr><th>{e(k)}</th><td>{e(str(v))}</td></tr>" for k, v in items if v is not None)
    note = ""
    if run.skipped:
        note = "<p class='muted'>Unreadable lines skipped: " + e(", ".join(f"{k}: {v}" for k, v in run.skipped.items())) + "</p>"
    return f"<table class='summary'>{cells}</table>{note}"


def _alerts_html(run: Run) -> str:
    e = html.escape
    if not run.alerts:
        return "<p class='ok'>No health check fired.</p>"
    rows = []
    for a in sorted(run.alerts, key=lambda a: _number(a.get("step")) or 0):
        sev = str(a.get("severity", ""))
        rows.append(f"<tr class='sev-{e(sev)}'><td>{e(str(a.get('step', '')))}</td><td>{e(sev)}</td>"
                    f"<td class='mono'>{e(str(a.get('check', '')))}</td><td>{e(str(a.get('message', '')))}</td>"
                    f"<td class='mono small'>{e(json.dumps(a.get('evidence', {}), default=str))}</td></tr>")
    return ("<table class='alerts'><tr><th>step</th><th>severity</th><th>check</th><th>message</th><th>evidence</th></tr>"
            + "".join(rows) + "</table>")


def _samples_html(run: Run) -> str:
    e = html.escape
    steps = sorted({s["step"] for s in run.samples if isinstance(s.get("step"), (int, float))})
    if not steps:
        return "<p class='muted'>No samples.jsonl in this run directory.</p>"
    k = min(len(steps), 5)
    chosen = {steps[round(i * (len(steps) - 1) / max(1, k - 1))] for i in range(k)}
    first_alert: dict[str, float] = {}  # check -> the step it first fired
    for a in run.alerts:
        if _number(a.get("step")) is not None:
            first_alert.setdefault(str(a.get("check")), _number(a.get("step")))
    # Also the first logged step at or after each check's first alert: what the alert was about.
    for at in first_alert.values():
        later = [s for s in steps if s >= at]
        if later and len(chosen) < MAX_SAMPLE_STEPS:
            chosen.add(later[0])
    parts = []
    for step in sorted(chosen):
        fired = [check for check, at in first_alert.items() if at <= step]
        tag = f" <span class='tag'>after alerts: {e(', '.join(fired))}</span>" if fired else ""
        rows = "".join(
            f"<tr><td class='text'>{e(str(s.get('prompt', '')))}</td><td class='text'>{e(str(s.get('response', '')))}</td>"
            f"<td>{_fmt(s.get('score'))}</td><td>{_fmt(s.get('kl'))}</td></tr>"
            for s in run.samples if s.get("step") == step)
        parts.append(f"<h3>Step {e(str(step))}{tag}</h3><table class='samples'><tr><th>prompt</th><th>response</th>"
                     f"<th>score</th><th>KL</th></tr>{rows}</table>")
    return "\n".join(parts)


CSS = """
body { font-family: -apple-system, "Segoe UI", Roboto, "DejaVu Sans", sans-serif; margin: 0 auto; max-width: 1320px;
       padding: 1em 2em; color: #222; line-height: 1.4; }
h1 { font-size: 1.6em; margin-bottom: 0.2em; } h2 { border-bottom: 1px solid #ddd; padding-bottom: 0.2em; margin-top: 1.6em; }
h3 { font-size: 1.0em; margin: 1em 0 0.3em; }
nav a { margin-right: 1em; }
table { border-collapse: collapse; font-size: 0.88em; }
th, td { border: 1px solid #ddd; padding: 3px 6px; text-align: left; vertical-align: top; }
th { background: #f4f4f4; }
table.summary th { width: 16em; }
.plots { display: grid; grid-template-columns: repeat(auto-fill, minmax(600px, 1fr)); gap: 12px; }
figure { margin: 0; border: 1px solid #eee; padding: 4px; }
figure img { width: 100%; height: auto; display: block; }
figcaption { font-size: 0.82em; color: #555; padding: 2px 4px; }
img.wide { width: 100%; height: auto; }
.muted { color: #777; } .ok { color: #1e7e34; font-weight: bold; }
.mono { font-family: "DejaVu Sans Mono", Menlo, Consolas, monospace; } .small { font-size: 0.8em; }
tr.sev-warning td:nth-child(2) { color: #b35c00; font-weight: bold; }
tr.sev-error td:nth-child(2) { color: #c0392b; font-weight: bold; }
table.samples td.text { white-space: pre-wrap; max-width: 560px; }
.tag { font-weight: normal; font-size: 0.85em; background: #fff3e0; border: 1px solid #e67e00; border-radius: 3px; padding: 0 4px; }
.inspect { border: 1px solid #ddd; border-radius: 4px; padding: 0.4em 0.8em 0.6em; margin: 0.8em 0; }
.prompt { font-size: 0.85em; color: #444; white-space: pre-wrap; max-height: 6em; overflow: auto; margin-bottom: 0.4em; }
.tokens { font-family: "DejaVu Sans Mono", Menlo, Consolas, monospace; font-size: 0.92em; line-height: 2.0;
          white-space: pre-wrap; word-break: break-word; }
.tok { border: 1px solid transparent; border-right-color: rgba(0,0,0,0.08); padding: 1px 0; cursor: help; }
.tok:hover { outline: 2px solid #333; }
.tok.clip-high { border: 2px solid #7b1113; border-radius: 3px; }
.tok.clip-low { border: 2px dashed #0b3d66; border-radius: 3px; }
.tok sup { font-size: 0.75em; font-weight: bold; }
.tok.clip-high sup { color: #7b1113; } .tok.clip-low sup { color: #0b3d66; }
.tok.demo { padding: 0 3px; }
.legend-cell { display: inline-block; padding: 0 5px; border: 1px solid #ccc; font-size: 0.8em; font-family: monospace; }
.scroll { max-height: 28em; overflow: auto; }
table.tokens-table td { font-size: 0.85em; white-space: nowrap; }
table.tokens-table td.effect { white-space: normal; min-width: 22em; color: #444; }
table.tokens-table tr.clipped td { font-weight: bold; }
pre { background: #f7f7f7; padding: 0.6em; overflow: auto; font-size: 0.82em; }
"""

# Counts what actually rendered, for people and for the headless-browser test: loaded
# plots (decoded, non-zero width), inspector tokens, and script errors.
SCRIPT = """
(function () {
  var errors = 0;
  window.addEventListener('error', function () { errors += 1; document.body.dataset.jsErrors = String(errors); });
  window.addEventListener('load', function () {
    var imgs = Array.prototype.slice.call(document.querySelectorAll('img'));
    var ok = imgs.filter(function (im) { return im.complete && im.naturalWidth > 0; }).length;
    document.body.dataset.imagesTotal = String(imgs.length);
    document.body.dataset.imagesLoaded = String(ok);
    document.body.dataset.inspectorTokens = String(document.querySelectorAll('.tokens .tok').length);
    document.body.dataset.jsErrors = String(errors);
    document.body.dataset.rendered = 'yes';
  });
})();
"""


def write_report(run_dir: Path) -> Path:
    """Write RUN_DIR/report.html and RUN_DIR/plots/*.png; return the report's path."""
    run = load_run(Path(run_dir))
    e = html.escape
    plots_dir = run.path / "plots"
    plots_dir.mkdir(exist_ok=True)
    thresholds = _thresholds(run)

    figures = []
    for panel in PANELS:
        png = _plot_panel(run, panel, thresholds)
        if png is None:
            continue
        (plots_dir / f"{panel.name}.png").write_bytes(png)
        figures.append(
            f"<figure id='plot-{panel.name}'><img alt='{e(panel.title)}' src='data:image/png;base64,"
            f"{base64.b64encode(png).decode()}'><figcaption>{e(panel.caption)}</figcaption></figure>")
    timeline = _plot_alert_timeline(run)
    (plots_dir / "alerts.png").write_bytes(timeline)

    title = f"RLHF run report: {run.path.resolve().name}"
    page = f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>{e(title)}</title>
<meta name="viewport" content="width=device-width, initial-scale=1">
<style>{CSS}</style></head>
<body>
<h1>{e(title)}</h1>
<nav><a href="#alerts">Alerts ({len(run.alerts)})</a><a href="#curves">Curves</a><a href="#samples">Samples</a>
<a href="#inspector">Token inspector</a><a href="#config">Config</a></nav>
<h2 id="summary">Summary</h2>
{_summary_html(run)}
<h2 id="alerts">Alerts</h2>
{_alerts_html(run)}
<img class="wide" id="alert-timeline" alt="alerts over the run" src="data:image/png;base64,{base64.b64encode(timeline).decode()}">
<h2 id="curves">Curves</h2>
<p class="muted">Dashed vertical lines: alerts of the checks that read the curve. Dotted horizontal lines:
alert thresholds and limits. Faint lines are raw values, solid ones a moving average on long runs.</p>
<div class="plots">
{''.join(figures)}
</div>
<h2 id="samples">Samples</h2>
{_samples_html(run)}
<h2 id="inspector">Token inspector</h2>
{_inspector_html(run)}
<h2 id="config">Config</h2>
<details><summary>config.yaml</summary><pre>{e(run.config_text) or '(no config.yaml)'}</pre></details>
<script>{SCRIPT}</script>
</body></html>
"""
    out = run.path / "report.html"
    tmp = out.with_suffix(".html.tmp")
    tmp.write_text(page, encoding="utf-8")
    os.replace(tmp, out)
    return out
