"""`rlhf report RUN_DIR`: report.html and plots from a run directory.

The run directory is synthetic but shaped like the trainer's (metrics, alerts, samples,
token records, config), including the awkward parts: a partial last line, a resumed run
that re-logged steps, text that needs escaping. The page is then loaded in a real headless
Chromium, which must show every plot and the token inspector without a script error.
"""

import json
import math
import random
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from rlhf.config import Config, UserInputError, save_config
from rlhf.diagnostics import HealthMonitor
from rlhf.report import display_token, write_report

STEPS = 60
EVIL = "<script>document.title='pwned'</script> & \"quotes\" 'single'"


def _row(step: int, rng: random.Random) -> dict:
    """A run that goes wrong at step ~30: the score keeps rising, the KL runs away, the
    judge falls, entropy and diversity collapse."""
    late = max(0, step - 30)
    row = {
        "step": step,
        "reward/score_mean": 0.05 * step + rng.gauss(0, 0.1),
        "reward/score_std": 1.0,
        "reward/total_mean": 0.05 * step - 0.01 * late ** 2 + rng.gauss(0, 0.1),
        "kl/ref_mean": 0.05 * step + 0.02 * late ** 2,
        "kl/coef": 0.05,
        "policy/loss": rng.gauss(0, 0.05),
        "policy/clipfrac": 0.05 + 0.002 * step,
        "policy/approx_kl": 0.005 + 0.0002 * step,
        "policy/entropy": 2.0 if step < 30 else 2.0 * math.exp(-0.08 * late),
        "policy/logprob_gap": 1e-4,
        "value/loss": 1.0 / step + 0.05,
        "value/explained_variance": min(0.8, -0.5 + 0.05 * step),
        "value/clipfrac": 0.1,
        "response/length_mean": 20 + 0.3 * late,
        "response/eos_frac": 0.9 - 0.02 * late,
        "response/distinct2": 0.85 if step < 30 else 0.85 * math.exp(-0.05 * late),
        "response/repeat_frac": 0.02 + 0.015 * late,
        "lr": 1e-5,
        "time/step_s": 2.0, "time/rollout_s": 1.0, "time/score_s": 0.3, "time/update_s": 0.7,
        "throughput/tokens_per_s": 80.0,
    }
    if step % 10 == 0:
        row["eval/judge_mean"] = 0.5 + 0.01 * step - 0.03 * late
        row["eval/score_mean"] = 0.05 * step
    return row


TOKENS = ["Ġthe", "Ġmovie", "Ġwas", "Ġgreat", "!", "Ċ", "Ġ<", "b", ">", "&", "Ġ'", "ok", "'", "Ġgreat", "!", "</s>"]


def _token_row(step: int, rng: random.Random) -> dict:
    n = len(TOKENS)
    advantage = [rng.gauss(0, 1) for _ in range(n)]
    ratio = [math.exp(rng.gauss(0, 0.25)) for _ in range(n)]
    old = [-rng.uniform(0.1, 4) for _ in range(n)]
    clip = [1 if r > 1.2 and a > 0 else -1 if r < 0.8 and a < 0 else 0 for r, a in zip(ratio, advantage)]
    ref = [o - rng.gauss(0.05, 0.2) for o in old]
    return {
        "step": step, "prompt": f"Review {step}: {EVIL}", "response": "the movie was great! <b>&'ok'", "score": 0.1 * step,
        "tokens": TOKENS, "logprob": [o + math.log(r) for o, r in zip(old, ratio)], "old_logprob": old,
        "ref_logprob": ref, "ratio": ratio, "clip": clip, "advantage": advantage,
        "value": [rng.gauss(0, 0.5) for _ in range(n)], "return": [rng.gauss(0, 0.5) for _ in range(n)],
        "kl": [o - r for o, r in zip(old, ref)], "reward": [0.0] * (n - 1) + [0.1 * step],
    }


def make_run_dir(path: Path) -> Path:
    """Write a run directory the way the trainer does, alerts from the real monitor."""
    rng = random.Random(0)
    cfg = Config()
    cfg.reward.function = "mypkg.rewards:positive"
    cfg.eval.judge = "mypkg.judges:lexicon"
    cfg.train.out_dir = str(path)
    path.mkdir(parents=True, exist_ok=True)
    save_config(cfg, path / "config.yaml")
    monitor = HealthMonitor(cfg.diagnostics, kl_target=None, max_new_tokens=cfg.rollout.max_new_tokens)
    rows = [_row(step, rng) for step in range(1, STEPS + 1)]
    # A resume from the step-20 checkpoint after a crash at step 23 re-logs steps 21..23.
    rows = rows[:23] + rows[20:]
    with open(path / "metrics.jsonl", "w") as m, open(path / "alerts.jsonl", "w") as a:
        for row in rows:
            m.write(json.dumps(row) + "\n")
            for alert in monitor.observe(row):
                a.write(json.dumps(alert.__dict__) + "\n")
        m.write('{"step": 61, "reward/sco')  # killed mid-write
    with open(path / "samples.jsonl", "w") as f:
        for step in range(1, STEPS + 1, 5):
            for i in range(2):
                f.write(json.dumps({"step": step, "prompt": f"Prompt {i}: {EVIL}",
                                    "response": "great " * (1 + step // 10) + "\n<i>not italic</i>",
                                    "score": 0.1 * step, "kl": 0.05 * step}) + "\n")
    with open(path / "tokens.jsonl", "w") as f:
        for step in range(1, STEPS + 1, 10):
            for _ in range(2):
                f.write(json.dumps(_token_row(step, rng)) + "\n")
        f.write(json.dumps(WORKED_EXAMPLE) + "\n")
    return path


# objective.md's worked examples 1 and 3 (eps = 0.2), and a token the clip leaves alone.
WORKED_EXAMPLE = {
    "step": STEPS, "prompt": "Worked examples", "response": " great bad ok", "score": 1.0,
    "tokens": ["Ġgreat", "Ġbad", "Ġok"], "ratio": [1.5, 0.5, 1.1], "advantage": [2.0, -2.5, 1.0], "clip": [1, -1, 0],
    "logprob": [-1.0, -2.0, -1.0], "old_logprob": [-1.405, -1.307, -1.095], "ref_logprob": [-1.5, -1.2, -1.1],
    "value": [0.1, 0.2, 0.3], "return": [1.0, 1.0, 1.0], "kl": [0.095, -0.107, 0.005], "reward": [0.0, 0.0, 1.0],
}


@pytest.fixture(scope="module")
def report(tmp_path_factory) -> Path:
    return write_report(make_run_dir(tmp_path_factory.mktemp("run") / "ppo"))


def test_report_files(report):
    run_dir = report.parent
    assert report.name == "report.html"
    for name in ("score", "kl", "entropy", "clipfrac", "approx_kl", "value_loss", "explained_variance", "length",
                 "diversity", "alerts"):
        png = run_dir / "plots" / f"{name}.png"
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", name
    page = report.read_text()
    # Self-contained: every image inline, nothing fetched from anywhere.
    assert len(re.findall(r"""<img [^>]*src=["']data:image/png;base64,""", page)) == 11
    assert not re.search(r"""(src|href)=["']?(https?:)?//""", page)
    assert "@import" not in page and "url(" not in page
    # The alerts the monitor raised on this run are listed, with their knobs.
    alerts = [json.loads(line) for line in (run_dir / "alerts.jsonl").read_text().splitlines()]
    assert {a["check"] for a in alerts} >= {"reward_hacking", "collapse"}
    assert "ppo.kl_coef" in page and "reward_hacking" in page
    # All text escaped: the prompt's script is shown, never run.
    assert "<script>document.title" not in page
    assert "&lt;script&gt;document.title=&#x27;pwned&#x27;" in page
    # Token inspector: the last logged sequence is always shown; what the clip did to each token.
    assert "Worked examples" in page and "what the clip does" in page
    assert ("clipped high: ratio 1.500 &gt; 1.2 with A &gt; 0, min() takes the clipped term, no gradient; "
            "the update stops pushing this token&#x27;s probability up") in page
    assert "clipped low: ratio 0.500 &lt; 0.8 with A &lt; 0, min() takes the clipped term, no gradient" in page
    assert "not clipped: the gradient raises this token&#x27;s probability" in page
    assert "class='tok clip-high'" in page and "class='tok clip-low'" in page
    # The table of the sequence with the most clipped tokens is open.
    assert page.count("<details open>") == 1


def test_report_cli_and_missing_metrics(tmp_path, capsys):
    from rlhf.cli import main

    with pytest.raises(UserInputError, match="no metrics.jsonl"):
        write_report(tmp_path)
    assert main(["report", str(tmp_path)]) == 2
    assert "no metrics.jsonl" in capsys.readouterr().err
    assert main(["report", str(tmp_path / "nope")]) == 2
    assert f"{tmp_path / 'nope'}: no such directory" in capsys.readouterr().err


def test_report_minimal_run_dir(tmp_path):
    """Only metrics.jsonl, with a few keys: no crash, missing parts said so."""
    (tmp_path / "metrics.jsonl").write_text("\n".join(
        json.dumps({"step": s, "reward/score_mean": 0.1 * s, "kl/ref_mean": float("nan") if s == 2 else 0.01 * s})
        for s in range(1, 4)) + "\n")
    page = write_report(tmp_path).read_text()
    assert "No health check fired" in page and "No tokens.jsonl" in page and "No samples.jsonl" in page
    assert (tmp_path / "plots" / "score.png").exists() and not (tmp_path / "plots" / "entropy.png").exists()


def test_display_token():
    assert display_token("Ġthe") == " the"
    assert display_token("Ċ") == "⏎"
    assert display_token("âĢ¦") == "…"
    assert display_token("▁hello") == " hello"
    assert display_token("</s>") == "</s>"


def _chromium(*args: str, user_dir: Path, timeout: int = 120) -> subprocess.CompletedProcess:
    cmd = [shutil.which("chromium"), "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
           "--disable-background-networking", "--disable-component-update", "--disable-sync",
           f"--user-data-dir={user_dir}", "--enable-logging=stderr", "--v=0", "--virtual-time-budget=10000", *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)


@pytest.mark.skipif(shutil.which("chromium") is None,
                    reason="chromium is not installed (apt-get install -y chromium); the page is not browser-checked")
def test_report_renders_in_headless_chromium(report, tmp_path):
    result = _chromium("--dump-dom", report.as_uri(), user_dir=tmp_path / "profile")
    assert result.returncode == 0, result.stderr[-2000:]
    body = re.search(r"<body([^>]*)>", result.stdout)
    assert body, result.stdout[:2000]
    attrs = dict(re.findall(r'data-([a-z-]+)="([^"]*)"', body.group(1)))
    assert attrs.get("rendered") == "yes", (attrs, result.stderr[-2000:])
    assert attrs["js-errors"] == "0"
    assert int(attrs["images-total"]) == 11 and attrs["images-loaded"] == attrs["images-total"], attrs
    page = report.read_text()
    assert page.count("<div class='inspect'") >= 3
    assert int(attrs["inspector-tokens"]) == page.count(" data-i='") > 0, attrs
    console = [line for line in result.stderr.splitlines() if "CONSOLE" in line or "Uncaught" in line]
    assert not console, console
    # The prompt's <script> stayed text: it did not run.
    assert "<title>RLHF run report" in result.stdout and "pwned</title>" not in result.stdout

    shot = report.parent / "screenshot.png"
    result = _chromium(f"--screenshot={shot}", "--window-size=1400,9000", report.as_uri(), user_dir=tmp_path / "p2")
    assert shot.is_file() and shot.stat().st_size > 50_000, result.stderr[-2000:]
