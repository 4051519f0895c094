"""`rlhf demo grpo`: the problem generator, and the whole demo path on a tiny model."""

from __future__ import annotations

import json
import re

import pytest

from rlhf.config import ConfigError
from rlhf.demo_grpo import make_problems


def test_larger_problems_are_right_distinct_and_reproducible():
    problems = make_problems("larger", 500, seed=3)
    assert problems == make_problems("larger", 500, seed=3)
    assert problems != make_problems("larger", 500, seed=4)
    assert len({p["prompt"] for p in problems}) == 500
    for p in problems:
        a, b = (int(x) for x in re.fullmatch(r"Which number is larger, (\d+) or (\d+)\? Answer with just the number\.",
                                             p["prompt"]).groups())
        assert a != b and 10 <= min(a, b) and max(a, b) <= 99 and p["answer"] == max(a, b)
    firsts = [int(re.search(r"\d+", p["prompt"]).group()) for p in problems]
    assert 0.4 < sum(f == p["answer"] for f, p in zip(firsts, problems)) / 500 < 0.6  # the larger one is first half the time


def test_sum_problems_and_the_held_out_split():
    held = make_problems("sum", 30, seed=1)
    train = make_problems("sum", 51, seed=0, exclude={p["prompt"] for p in held})
    assert not {p["prompt"] for p in held} & {p["prompt"] for p in train}
    for p in held + train:
        a, b = (int(x) for x in re.fullmatch(r"What is (\d) \+ (\d)\? Answer with just the number\.", p["prompt"]).groups())
        assert p["answer"] == a + b
    with pytest.raises(ConfigError, match="task 'sum': could not draw 52 distinct problems beside 30 held out"):
        make_problems("sum", 52, seed=0, exclude={p["prompt"] for p in held})
    with pytest.raises(ConfigError, match="task: expected one of 'larger', 'sum', got 'riddles'"):
        make_problems("riddles", 1, seed=0)


def test_grpo_demo_end_to_end_on_a_tiny_model(tmp_path, tiny_policy_dir, capsys):
    """The whole path through the command line: problems, before/after evaluation, GRPO
    training with the verifiable rewards, summary and report."""
    from rlhf.cli import main

    run = tmp_path / "demo"
    args = ["demo", "grpo", f"train.policy={tiny_policy_dir}", "train.steps=2", "train.batch_size=2",
            "train.minibatch_size=8", "train_problems=12", "eval.num_problems=6", "eval.batch_size=4",
            "progress=false", "--out", str(run)]
    assert main([*args[:3], "train.steps=1", *args[4:]]) == 0
    assert main(args) == 0  # the demo runs again into the same directory, replacing its last run
    summary = json.loads((run / "summary.json").read_text())
    samples = [json.loads(line) for line in (run / "eval_samples.jsonl").read_text().splitlines()]
    assert summary["eval_problems"] == len(samples) == 6
    for side in ("before", "after"):
        correct = [s[f"{side}_correct"] for s in samples]
        p = sum(correct) / 6
        assert summary[side]["accuracy"] == pytest.approx(p)
        assert summary[side]["accuracy_se"] == pytest.approx((p * (1 - p) * 6 / 5 / 6) ** 0.5)
        for key in ("length_tokens", "entropy", "distinct1", "distinct2", "format_rate"):
            assert summary[side][key] >= 0
        assert 0 < summary[side]["length_tokens"] <= 16 and summary[side]["entropy"] > 0
    assert set(summary["checks"]) == {"accuracy_up_10_points", "accuracy_up_3se", "responses_not_empty"}
    assert summary["wall_s"] > 0
    held = {json.loads(line)["prompt"] for line in (run / "data" / "eval.jsonl").read_text().splitlines()}
    trained = {json.loads(line)["prompt"] for line in (run / "data" / "train.jsonl").read_text().splitlines()}
    assert len(held) == 6 and len(trained) == 12 and not held & trained
    metrics = [json.loads(line) for line in (run / "grpo" / "metrics.jsonl").read_text().splitlines()]
    assert len(metrics) == 2 and "reward/final_number_mean" in metrics[0] and "reward/format_reward_mean" in metrics[0]
    assert (run / "grpo" / "report.html").is_file() and (run / "summary.txt").is_file()
    assert "accuracy" in capsys.readouterr().out
