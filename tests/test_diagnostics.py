"""Health checks: for each check, a metric stream that must trigger it and one that must not.

The streams are metrics.jsonl rows as the trainer writes them. `healthy` is a run that is
going well: the score creeps up, the KL grows gently, entropy and diversity hold, the
critic learns after a few steps. Each test bends one or two curves of it.
"""

import json
import math
import random

import pytest

from rlhf.config import Config, ConfigError, field_docs, load_config
from rlhf.diagnostics import (
    CHECKS,
    Alert,
    DiagnosticsConfig,
    HealthMonitor,
    distinct_n,
    repeated_ngram_fraction,
)


def healthy(step: int, rng: random.Random) -> dict:
    return {
        "step": step,
        "reward/score_mean": 0.01 * step + rng.gauss(0, 0.05),
        "reward/score_std": 1.0,
        "reward/total_mean": 0.01 * step,
        "kl/ref_mean": 0.2 + 0.03 * step + rng.gauss(0, 0.05),
        "kl/coef": 0.05,
        "policy/loss": rng.gauss(0, 0.05),
        "policy/clipfrac": 0.08 + rng.uniform(-0.03, 0.03),
        "policy/approx_kl": 0.01 + rng.uniform(-0.005, 0.005),
        "policy/entropy": 2.0 - 0.004 * step + rng.gauss(0, 0.02),
        "policy/logprob_gap": 1e-4,
        "value/loss": 0.5,
        "value/explained_variance": min(0.6, -0.5 + 0.15 * step),
        "value/clipfrac": 0.1,
        "response/length_mean": 20 + rng.gauss(0, 1),
        "response/eos_frac": 0.9,
        "response/distinct2": 0.85 + rng.gauss(0, 0.02),
        "response/repeat_frac": 0.02 + rng.uniform(0, 0.01),
        "lr": 1e-5,
    }


def stream(n: int = 60, **curves) -> list[dict]:
    """`healthy` rows with some curves replaced: key=function(step) (keys use _ for /)."""
    rng = random.Random(0)
    rows = []
    for step in range(1, n + 1):
        row = healthy(step, rng)
        for key, fn in curves.items():
            value = fn(step)
            if value is not None:
                row[key.replace("__", "/")] = value
        rows.append(row)
    return rows


def run(rows: list[dict], cfg: DiagnosticsConfig | None = None, **kwargs) -> list[Alert]:
    kwargs.setdefault("max_new_tokens", 32)
    monitor = HealthMonitor(cfg or DiagnosticsConfig(), **kwargs)
    return [a for row in rows for a in monitor.observe(row)]


def fired(alerts: list[Alert]) -> set[str]:
    return {a.check for a in alerts}


def test_healthy_run_raises_no_alert():
    assert run(stream(200)) == []
    assert run(stream(200), kl_target=6.0) == []


# -- reward hacking --------------------------------------------------------------------


def test_reward_hacking_when_kl_runs_far_past_its_target():
    # The score climbs 0.05 std a step while the KL leaves its target of 1 nat behind.
    alerts = run(stream(40, reward__score_mean=lambda s: 0.05 * s, kl__ref_mean=lambda s: 0.5 + 0.2 * s), kl_target=1.0)
    alert = next(a for a in alerts if a.check == "reward_hacking")
    # Step 15: the KL over steps 11..15 averages 3.1 nats (> 3 x target), the score is 0.5 std up.
    assert fired(alerts) == {"reward_hacking"} and alert.step == 15
    assert alert.severity == "warning" and "ppo.kl_coef" in alert.message and "kl_target" in alert.message
    assert alert.evidence["kl_now"] > 3.0 and alert.evidence["score_rise_std"] >= 0.5


def test_no_reward_hacking_when_the_kl_holds_its_target():
    rows = stream(60, reward__score_mean=lambda s: 0.05 * s, kl__ref_mean=lambda s: 1.0 + 0.3 * math.sin(s))
    assert run(rows, kl_target=1.0) == []


def test_no_reward_hacking_when_only_the_kl_is_high():
    # A large KL with a flat score is not hacking (the score is what would be exploited).
    assert run(stream(60, kl__ref_mean=lambda s: 20.0, reward__score_mean=lambda s: 0.1 * math.sin(s)), kl_target=1.0) == []


def test_reward_hacking_without_target_uses_the_absolute_kl_limit():
    rows = stream(40, reward__score_mean=lambda s: 0.05 * s, kl__ref_mean=lambda s: 0.5 * s)
    assert "reward_hacking" in fired(run(rows))
    rows = stream(40, reward__score_mean=lambda s: 0.05 * s, kl__ref_mean=lambda s: 0.2 * s)  # 8 nats at the end
    assert "reward_hacking" not in fired(run(rows))


def _judged(judge) -> dict:
    """Held-out evaluation every 10 steps: the reward-model score rises 1 std per 10 steps."""
    return dict(eval__judge_mean=lambda s: judge(s) if s % 10 == 0 else None,
                eval__score_mean=lambda s: 0.1 * s if s % 10 == 0 else None)


def test_reward_hacking_when_the_judge_falls_while_the_score_rises():
    alerts = [a for a in run(stream(40, **_judged(lambda s: 0.8 - 0.01 * s))) if a.check == "reward_hacking"]
    assert [a.step for a in alerts] == [20]  # the second evaluation, the first chance to compare
    assert "judge fell" in alerts[0].message and alerts[0].evidence["judge_steps"] == [10, 20]


def test_reward_hacking_when_the_judge_stalls():
    alerts = run(stream(40, **_judged(lambda s: 0.5)))
    assert "judge stalled" in next(a.message for a in alerts if a.check == "reward_hacking")


def test_no_reward_hacking_when_the_judge_agrees():
    assert run(stream(60, **_judged(lambda s: 0.3 + 0.01 * s))) == []


# -- collapse --------------------------------------------------------------------------


@pytest.mark.parametrize("curves, signal", [
    ({"policy__entropy": lambda s: 2.0 * math.exp(-0.1 * s)}, "entropy fell"),
    ({"response__repeat_frac": lambda s: min(0.6, 0.02 + 0.02 * s)}, "repeated 4-grams rose"),
    ({"response__distinct2": lambda s: max(0.2, 0.85 - 0.03 * s)}, "distinct bigrams fell"),
    ({"response__length_mean": lambda s: min(32.0, 16 + s)}, "at the limit rollout.max_new_tokens=32"),
    ({"response__length_mean": lambda s: max(1.0, 20 - s)}, "mean length shrank"),
])
def test_collapse_fires_on_each_signal(curves, signal):
    alerts = run(stream(40, **curves))
    assert fired(alerts) == {"collapse"}
    assert signal in alerts[0].message and "ppo.kl_coef" in alerts[0].message


@pytest.mark.parametrize("curves", [
    {"policy__entropy": lambda s: 2.0 - 0.02 * s},  # down to 60% of the start
    {"response__repeat_frac": lambda s: 0.02 + 0.002 * s},  # +0.08
    {"response__distinct2": lambda s: 0.85 - 0.005 * s},  # 0.65
    {"response__length_mean": lambda s: 32.0},  # at the limit from the start: the model, not a drift
    {"response__length_mean": lambda s: 29.0 if s <= 5 else 31.5},  # near it from the start, noise
    {"response__length_mean": lambda s: 20 - 0.2 * s},  # 12 tokens
])
def test_no_collapse_on_moderate_drift(curves):
    assert run(stream(40, **curves)) == []


# -- regularisation too strong -----------------------------------------------------------


def test_over_regularised_when_kl_stays_near_zero_and_the_score_is_flat():
    rng = random.Random(1)
    alerts = run(stream(40, kl__ref_mean=lambda s: rng.uniform(-0.02, 0.03), reward__score_mean=lambda s: rng.gauss(0, 0.05)))
    (alert,) = alerts
    assert (alert.check, alert.step) == ("over_regularised", 20)
    assert "ppo.kl_coef" in alert.message and "ppo.lr" in alert.message


def test_not_over_regularised_when_the_score_rises_or_the_kl_moves():
    # KL tiny but the score rising: learning is happening within a tight KL.
    assert run(stream(40, kl__ref_mean=lambda s: 0.01, reward__score_mean=lambda s: 0.03 * s)) == []
    # Score flat but the KL well off zero: not the over-regularised signature.
    assert run(stream(40, kl__ref_mean=lambda s: 0.5, reward__score_mean=lambda s: 0.0)) == []


# -- negative KL -------------------------------------------------------------------------


def test_negative_kl_points_at_sampling_settings():
    (alert,) = run(stream(25, kl__ref_mean=lambda s: -0.5 - 0.01 * s))
    assert (alert.check, alert.step) == ("negative_kl", 5)
    assert "rollout.top_k" in alert.message and alert.evidence["kl_mean"] < -0.1


def test_negative_kl_from_a_logprob_gap():
    (alert,) = run(stream(25, policy__logprob_gap=lambda s: 0.4))
    assert alert.check == "negative_kl" and "log-probs differ" in alert.message


def test_no_negative_kl_for_estimator_noise_around_zero():
    rng = random.Random(2)
    # On-policy k1 estimates near the start: the batch mean dips below 0 now and then.
    rows = stream(60, kl__ref_mean=lambda s: 0.002 * s + rng.gauss(0, 0.05), reward__score_mean=lambda s: 0.03 * s)
    assert run(rows) == []


# -- critic ------------------------------------------------------------------------------


def test_critic_not_learning_after_warmup():
    (alert,) = run(stream(30, value__explained_variance=lambda s: -0.3))
    # Warm-up is 10 steps; the 5-step window must lie entirely after it: steps 11..15.
    assert (alert.check, alert.step) == ("critic_not_learning", 15)
    assert "advantages are noise" in alert.message


def test_critic_check_reads_the_median():
    # One batch with near-constant returns gives a huge negative EV; the critic is fine.
    assert run(stream(40, value__explained_variance=lambda s: -50.0 if s == 14 else 0.3)) == []


def test_critic_check_waits_for_warmup():
    # Very negative early, learning by step 8: nothing fires.
    assert run(stream(40, value__explained_variance=lambda s: -2.0 + 0.3 * s if s < 9 else 0.4)) == []


# -- updates too large -------------------------------------------------------------------


def test_updates_too_large_needs_persistence():
    (alert,) = run(stream(30, policy__clipfrac=lambda s: 0.5 if s >= 5 else None))
    assert (alert.check, alert.step) == ("updates_too_large", 7)  # 3 consecutive steps: 5, 6, 7
    assert "ppo.lr" in alert.message
    (alert,) = run(stream(30, policy__approx_kl=lambda s: 0.2 if s >= 10 else None))
    assert (alert.check, alert.step) == ("updates_too_large", 12)


def test_no_updates_too_large_for_isolated_spikes():
    assert run(stream(60, policy__clipfrac=lambda s: 0.5 if s % 3 == 0 else None,
                      policy__approx_kl=lambda s: 0.2 if s % 3 == 1 else None)) == []


# -- critic-free algorithms: groups, entropy, length, the clip's sides --------------------


def test_zero_variance_groups_fire_when_most_groups_score_alike():
    # From step 10 on, 80% of the groups score every sample alike (all right or all wrong).
    alerts = run(stream(30, reward__zero_std_group_frac=lambda s: 0.1 if s < 10 else 0.8), critic_free=True)
    (alert,) = alerts
    # Step 12 is the first whose last 5 steps average above 0.5: (2 x 0.1 + 3 x 0.8) / 5 = 0.52.
    assert (alert.check, alert.step) == ("zero_variance_groups", 12)
    assert "rollout.samples_per_prompt" in alert.message and alert.evidence["zero_std_group_frac"] == 0.52


def test_no_zero_variance_alert_for_a_minority_or_without_groups():
    assert run(stream(60, reward__zero_std_group_frac=lambda s: 0.3 + 0.1 * math.sin(s)), critic_free=True) == []
    assert run(stream(60), critic_free=True) == []  # the metric is absent with one sample per prompt


@pytest.mark.parametrize("curves, check, knob", [
    ({"policy__entropy": lambda s: 2.0 * math.exp(-0.1 * s)}, "entropy_collapse", "ppo.clip_eps_high"),
    ({"response__length_mean": lambda s: min(32.0, 16 + s)}, "length_drift", "reward.missing_eos_penalty"),
    ({"response__length_mean": lambda s: max(1.0, 20 - s)}, "length_drift", "seq-mean-token-sum-norm"),
])
def test_entropy_and_length_have_their_own_checks_without_a_critic(curves, check, knob):
    """The signals `collapse` reads with a critic; without one their own checks report them,
    with the knobs of the critic-free algorithms, and `collapse` stays quiet."""
    alerts = run(stream(40, **curves), critic_free=True)
    assert fired(alerts) == {check} and knob in alerts[0].message
    assert fired(run(stream(40, **curves))) == {"collapse"}


def test_no_entropy_or_length_alert_on_moderate_drift_without_a_critic():
    for curves in ({"policy__entropy": lambda s: 2.0 - 0.02 * s}, {"response__length_mean": lambda s: 20 - 0.2 * s},
                   {"response__length_mean": lambda s: 32.0}):
        assert run(stream(40, **curves), critic_free=True) == []
    # The text signals still go to `collapse`.
    alerts = run(stream(40, response__repeat_frac=lambda s: min(0.6, 0.02 + 0.02 * s)), critic_free=True)
    assert fired(alerts) == {"collapse"}


@pytest.mark.parametrize("key, side", [("policy__clipfrac_high", "upper"), ("policy__clipfrac_low", "lower")])
def test_clip_side_fires_on_either_side(key, side):
    # One side clipped on 25% of the tokens from step 8; the total (0.27) stays under 0.3.
    alert, = run(stream(30, **{key: lambda s: 0.25 if s >= 8 else 0.01}, policy__clipfrac=lambda s: 0.27))
    assert (alert.check, alert.step, alert.evidence["side"]) == ("clip_side", 10, side)
    assert f"{side} clip" in alert.message and "ppo.lr" in alert.message


def test_no_clip_side_alert_for_spikes_small_shares_or_when_updates_too_large_fires():
    assert run(stream(60, policy__clipfrac_high=lambda s: 0.3 if s % 3 == 0 else 0.05,
                      policy__clipfrac_low=lambda s: 0.1)) == []
    alerts = run(stream(30, policy__clipfrac=lambda s: 0.5 if s >= 5 else None,
                        policy__clipfrac_low=lambda s: 0.45 if s >= 5 else None))
    assert fired(alerts) == {"updates_too_large"} and alerts[0].evidence["clipfrac_low"] == 0.45


# -- non-finite --------------------------------------------------------------------------


def test_non_finite_metrics_give_an_error_and_are_not_recorded():
    monitor = HealthMonitor(DiagnosticsConfig())
    rows = stream(3)
    rows[1]["value/loss"] = float("nan")
    rows[1]["policy/entropy"] = float("inf")
    alerts = [a for row in rows for a in monitor.observe(row)]
    assert [(a.check, a.severity, a.step) for a in alerts] == [("non_finite", "error", 2)]
    assert "policy/entropy" in alerts[0].message and "value/loss" in alerts[0].message
    assert monitor.n == 2


def test_non_finite_names_where_and_the_knobs():
    alert = HealthMonitor(DiagnosticsConfig()).non_finite(7, "value loss")
    assert (alert.step, alert.check, alert.severity) == (7, "non_finite", "error")
    assert "value loss" in alert.message and "model.dtype" in alert.message
    assert json.loads(json.dumps(alert.__dict__))["evidence"] == {"where": "value loss"}


def test_clean_metrics_give_no_non_finite_alert():
    assert "non_finite" not in fired(run(stream(30)))


# -- firing discipline, config, resume ---------------------------------------------------


def test_a_persistent_problem_fires_again_only_after_the_cooldown():
    alerts = run(stream(60, kl__ref_mean=lambda s: -1.0))
    assert [a.step for a in alerts] == [5, 30, 55]


def test_disabled_checks_and_switch():
    rows = stream(30, kl__ref_mean=lambda s: -1.0)
    assert run(rows, DiagnosticsConfig(disabled=["negative_kl"])) == []
    assert run(rows, DiagnosticsConfig(enabled=False)) == []
    with pytest.raises(ConfigError, match="diagnostics.disabled: unknown check 'nagative_kl'"):
        HealthMonitor(DiagnosticsConfig(disabled=["nagative_kl"]))


def test_config_validation_refuses_an_unknown_disabled_check_before_loading_models(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text(f"model: {{policy: {tmp_path / 'no_such_model'}}}\nreward: {{function: 'x:y'}}\n"
                    f"data: {{prompts: {tmp_path / 'no_such_prompts.jsonl'}}}\ndiagnostics: {{disabled: [nonsense]}}\n")
    with pytest.raises(ConfigError, match="diagnostics.disabled: unknown check 'nonsense'") as e:
        load_config(Config, path)  # validated at load
    assert all(name in str(e.value) for name in CHECKS[:-1])


def test_resume_from_state_dict_gives_the_same_alerts():
    rows = stream(80, reward__score_mean=lambda s: 0.05 * s, kl__ref_mean=lambda s: 0.5 + 0.2 * s,
                  policy__entropy=lambda s: 2.0 * math.exp(-0.05 * s), **_judged(lambda s: 0.5))
    whole = run(rows, kl_target=1.0)
    first = HealthMonitor(DiagnosticsConfig(), kl_target=1.0, max_new_tokens=32)
    alerts = [a for row in rows[:33] for a in first.observe(row)]
    second = HealthMonitor(DiagnosticsConfig(), kl_target=1.0, max_new_tokens=32)
    second.load_state_dict(json.loads(json.dumps(first.state_dict())))
    alerts += [a for row in rows[33:] for a in second.observe(row)]
    assert alerts == whole and len(whole) >= 3 and any(a.step > 33 for a in whole)


def test_config_fields_documented_and_loadable(tmp_path):
    docs = field_docs(DiagnosticsConfig)
    import dataclasses

    assert all(docs.get(f.name) for f in dataclasses.fields(DiagnosticsConfig))
    path = tmp_path / "c.yaml"
    path.write_text("diagnostics:\n  window: 8\n  disabled: [negative_kl]\n")
    cfg = load_config(Config, path, ["diagnostics.clipfrac_max=0.4"])
    assert (cfg.diagnostics.window, cfg.diagnostics.disabled, cfg.diagnostics.clipfrac_max) == (8, ["negative_kl"], 0.4)
    assert set(CHECKS) == {"reward_hacking", "collapse", "over_regularised", "negative_kl", "critic_not_learning",
                           "updates_too_large", "zero_variance_groups", "entropy_collapse", "length_drift",
                           "clip_side", "non_finite"}


# -- text statistics ---------------------------------------------------------------------


def test_distinct_n():
    # Bigrams: (a b) (b c) | (a b) (b d): 3 unique of 4; n-grams never cross texts.
    assert distinct_n(["a b c", "a b d"], 2) == 0.75
    assert distinct_n(["x y z"], 1) == 1.0
    assert distinct_n(["go go go go"], 1) == 0.25
    assert distinct_n(["a", ""], 2) == 1.0  # no bigram at all: nothing repeats
    assert distinct_n([], 2) == 1.0


def test_repeated_ngram_fraction():
    # "a b a b a b": bigrams ab ba ab ba ab; the last three repeat earlier ones -> 3/5.
    assert repeated_ngram_fraction(["a b a b a b"], 2) == pytest.approx(0.6)
    # Averaged over texts; a text too short for one n-gram counts as 0.
    assert repeated_ngram_fraction(["a b a b a b", "a b c d"], 2) == pytest.approx(0.3)
    assert repeated_ngram_fraction(["a b a b a b", "a"], 2) == pytest.approx(0.3)
    # 4-grams (the trainer's setting): one of five repeats.
    assert repeated_ngram_fraction(["the cat sat on the cat sat on"]) == pytest.approx(0.2)
    # Repeats across texts do not count: each text on its own is fresh.
    assert repeated_ngram_fraction(["one two three four", "one two three four"]) == 0.0
    assert repeated_ngram_fraction([]) == 0.0
