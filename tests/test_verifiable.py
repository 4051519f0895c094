"""Verifiable rewards: the final-number checker and the format reward on real strings,
prompt records reaching reward functions, several weighted reward functions, and a run of
the trainer on a tiny model with them."""

from __future__ import annotations

import json
import textwrap
from fractions import Fraction

import pytest
import torch

from rlhf.config import Config, ConfigError, RewardConfig, load_config
from rlhf.data import load_prompts
from rlhf.errors import UserInputError
from rlhf.rewards import Reward, RewardError, call_text_function
from rlhf.verifiable import extract_final_number, final_number, format_reward, normalize_number


@pytest.mark.parametrize("response, expected", [
    ("42", 42),
    ("  42  ", 42),
    ("42.", 42),
    ("The answer is 42.", 42),
    ("The answer is 42. I checked it twice with 3 methods.", 42),   # "answer is" beats the last number
    ("Answer: 17", 17),
    ("answer = 17\n", 17),
    ("So the final ANSWER: -3, since 2 - 5 = -3", -3),
    ("First 12, then 15, so 18", 18),                                   # no marker: the last number
    ("\\boxed{1,234}", 1234),
    ("We get 5 and then 7, giving $\\boxed{12}$. Not 13.", 12),          # boxed beats everything
    ("\\boxed{x = 3/4}", Fraction(3, 4)),
    ("1,234,567 apples", 1234567),
    ("1,23", 23),                                                        # not a thousands separator
    ("12.0", 12),
    ("12.50", Fraction(25, 2)),
    ("It costs $1,000.00", 1000),
    ("+8", 8),
    ("\u22125", -5),                                                     # unicode minus
    ("-0", 0),
    ("7-3=4", 4),                                                        # a minus between numbers is not a sign
    ("x-2", 2),
    ("50%", 50),
    (".5", Fraction(1, 2)),
    ("3 / 4", Fraction(3, 4)),
    ("The larger number is 90, while the smaller is 85", 85),
    ("no number here", None),
    ("", None),
    ("\\boxed{}", None),
    ("Answer: none, but 6 is close", 6),
])
def test_extract_final_number(response, expected):
    assert extract_final_number(response) == (None if expected is None else Fraction(expected))


@pytest.mark.parametrize("truth, expected", [
    (42, 42), ("42", 42), (12.0, 12), ("12.0", 12), ("1,234", 1234), (0.1, Fraction(1, 10)),
    ("-3/4", Fraction(-3, 4)), ("$5", 5), ("abc", None), (True, None), (None, None),
])
def test_normalize_number(truth, expected):
    assert normalize_number(truth) == (None if expected is None else Fraction(expected))


def test_final_number_compares_after_normalisation():
    responses = ["The answer is 1,234.", "1234.0", "\\boxed{1234}", "1233", "Answer: 12 (not 1234)", "twelve"]
    meta = [{"answer": 1234}] * 4 + [{"answer": "12.0"}, {"answer": 12}]
    assert final_number([""] * 6, responses, meta) == [1.0, 1.0, 1.0, 0.0, 1.0, 0.0]


def test_final_number_names_a_missing_or_bad_answer():
    with pytest.raises(UserInputError, match="prompt 1 has no `answer` field.*fields: \\['level'\\]"):
        final_number(["", ""], ["1", "2"], [{"answer": 1}, {"level": 3}])
    with pytest.raises(UserInputError, match="prompt 0: `answer` 'many' is not a number"):
        final_number([""], ["1"], [{"answer": "many"}])
    with pytest.raises(UserInputError, match="needs each prompt's record"):
        final_number([""], ["1"])


@pytest.mark.parametrize("response, expected", [
    ("42", 1.0), (" 42.\n", 1.0), ("-7", 1.0), ("1,234", 1.0), ("Answer: 5", 1.0), ("\\boxed{12}", 1.0),
    ("$12", 1.0), ("The answer is 42.", 0.0), ("42 is larger", 0.0), ("4 2", 0.0), ("", 0.0), ("forty", 0.0),
])
def test_format_reward(response, expected):
    assert format_reward([""], [response]) == [expected]


def test_metadata_reaches_only_functions_that_take_it():
    def two(prompts, responses):
        return [1.0] * len(responses)

    def three(prompts, responses, metadata=None):
        return [float(m["answer"]) for m in metadata]

    def kwargs(prompts, responses, **kw):
        return [float(len(kw["metadata"]))] * len(responses)

    meta = [{"answer": 3}, {"answer": 5}]
    assert call_text_function(two, ["a", "b"], ["x", "y"], "f", meta).tolist() == [1.0, 1.0]
    assert call_text_function(three, ["a", "b"], ["x", "y"], "f", meta).tolist() == [3.0, 5.0]
    assert call_text_function(kwargs, ["a", "b"], ["x", "y"], "f", meta).tolist() == [2.0, 2.0]
    with pytest.raises(RewardError, match="f: the function raised TypeError"):
        call_text_function(three, ["a"], ["x"], "f")  # metadata None: the function's own default fails


def test_prompt_records_carry_their_other_fields(tmp_path):
    path = tmp_path / "p.jsonl"
    path.write_text('{"prompt": "What is 2 + 3?", "answer": 5, "level": "easy"}\n'
                    '{"messages": [{"role": "user", "content": "Hi"}], "answer": "7"}\n')
    a, b = load_prompts(path)
    assert (a.text, a.metadata) == ("What is 2 + 3?", {"answer": 5, "level": "easy"})
    assert (b.text, b.metadata) == ("Hi", {"answer": "7"})


REWARDS = '''
def length_score(prompts, responses):
    return [float(len(r)) for r in responses]

def wants_metadata(prompts, responses, metadata):
    return [float(m["answer"]) for m in metadata]
'''


@pytest.fixture
def workdir(tmp_path, monkeypatch):
    (tmp_path / "vr_rewards.py").write_text(textwrap.dedent(REWARDS))
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.chdir(tmp_path)
    return tmp_path


def test_several_functions_are_weighted_and_kept_apart(workdir):
    cfg = RewardConfig(functions=["vr_rewards:length_score", "rlhf.verifiable:final_number"], weights=[0.5, 2.0])
    reward = Reward(cfg, None)
    raw, parts = reward.raw_and_components(["p", "q"], ["abcd", "Answer: 3"], metadata=[{"answer": 4}, {"answer": 3}])
    assert parts["length_score"].tolist() == [4.0, 9.0] and parts["final_number"].tolist() == [0.0, 1.0]
    assert raw.tolist() == [2.0, 6.5]
    assert reward.raw(["p"], ["12"], metadata=[{"answer": 12}]).tolist() == [3.0]


def test_reward_config_is_checked(workdir):
    def load(*overrides):
        return load_config(Config, None, ["data.prompts=x", *overrides])

    with pytest.raises(ConfigError, match="reward.weights: expected one weight per entry of reward.functions \\(2\\), got 1"):
        load("reward.functions=[a:f, b:g]", "reward.weights=[1.0]")
    with pytest.raises(ConfigError, match="two functions share a name"):
        load("reward.functions=[a:f, b:f]")
    cfg = load("reward.functions=[a:f]", "reward.function=a:g")
    with pytest.raises(ConfigError, match="set exactly one of reward.model .*reward.functions"):
        cfg.validate(complete=True)


def _tiny_config(tmp_path, policy_dir, functions, weights, steps=2):
    cfg = Config()
    cfg.model.policy = str(policy_dir)
    cfg.reward.functions, cfg.reward.weights = functions, weights
    cfg.data.prompts, cfg.data.chat_template = str(tmp_path / "prompts.jsonl"), False
    cfg.rollout.batch_size, cfg.rollout.samples_per_prompt, cfg.rollout.max_new_tokens = 2, 4, 10
    cfg.rollout.temperature = 1.0
    cfg.ppo.advantage, cfg.ppo.kl_in_reward, cfg.ppo.kl_estimator, cfg.ppo.kl_coef = "grpo", False, "k3", 0.01
    cfg.ppo.lr = 1e-3
    cfg.train.steps, cfg.train.out_dir, cfg.train.save_every = steps, str(tmp_path / "run"), 0
    cfg.train.progress, cfg.train.report, cfg.train.threads = False, False, 1
    return cfg


def test_a_run_with_verifiable_rewards_logs_each_function(workdir, tiny_policy_dir):
    """The tiny policy trains on prompts whose records carry answers; each function's mean
    is logged under its name, their weighted sum is the raw score, and the records reach the
    function that asks for them."""
    from rlhf.ppo import PPOTrainer

    rows = [{"prompt": f"What is {a} + {a}?", "answer": 2 * a} for a in range(1, 5)]
    (workdir / "prompts.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    functions = ["rlhf.verifiable:final_number", "rlhf.verifiable:format_reward", "vr_rewards:wants_metadata"]
    trainer = PPOTrainer(_tiny_config(workdir, tiny_policy_dir, functions, [1.0, 0.5, 0.25]))
    trainer.train()
    metrics = [json.loads(line) for line in (workdir / "run" / "metrics.jsonl").read_text().splitlines()]
    assert len(metrics) == 2
    for m in metrics:
        parts = {k: m[f"reward/{k}_mean"] for k in ("final_number", "format_reward", "wants_metadata")}
        assert 2.0 <= parts["wants_metadata"] <= 8.0  # the mean of this step's answers (2, 4, 6 or 8)
        expected = parts["final_number"] + 0.5 * parts["format_reward"] + 0.25 * parts["wants_metadata"]
        assert m["reward/raw_mean"] == pytest.approx(expected, abs=1e-5)
    result = trainer.evaluate(trainer.prompts[:2])
    answers = [trainer.prompts[i].metadata["answer"] for i in range(2)]
    checked = final_number([], result["responses"], [{"answer": a} for a in answers])
    wanted = [c + 0.5 * f + 0.25 * a for c, f, a in zip(checked, format_reward([], result["responses"]), answers)]
    assert result["scores"] == pytest.approx(wanted)
    assert torch.isfinite(torch.tensor(result["scores"])).all()


@pytest.mark.parametrize("record, problem", [
    ({"prompt": "What is 3 + 3?"}, r"the record has no `answer` field \(fields: \[\]\)"),
    ({"prompt": "What is 3 + 3?", "answer": "six"}, r"`answer` 'six' is not a number"),
])
def test_a_prompt_the_checker_cannot_score_is_named_by_line_before_training(workdir, tiny_policy_dir, record,
                                                                             problem):
    from rlhf.ppo import PPOTrainer

    rows = [{"prompt": f"What is {a} + {a}?", "answer": 2 * a} for a in (1, 2)] + [record]
    (workdir / "prompts.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    cfg = _tiny_config(workdir, tiny_policy_dir, ["rlhf.verifiable:format_reward", "rlhf.verifiable:final_number"],
                       [1.0, 1.0])
    with pytest.raises(RewardError, match=rf"prompts\.jsonl line 3: reward\.functions: final_number: {problem}"):
        PPOTrainer(cfg)
    # Held-out prompts that the evaluation scores with the reward (a judge, every N steps, the
    # first eval.num_prompts) are checked as well; with no evaluation they are never scored.
    (workdir / "held.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (workdir / "prompts.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows[:2]))
    cfg.eval.prompts, cfg.eval.judge, cfg.eval.every, cfg.eval.num_prompts = (str(workdir / "held.jsonl"),
                                                                              "vr_rewards:wants_metadata", 1, 3)
    with pytest.raises(RewardError, match=rf"held\.jsonl line 3: reward\.functions: final_number: {problem}"):
        PPOTrainer(cfg)
    cfg.eval.num_prompts = 2
    PPOTrainer(cfg)
    cfg.eval.num_prompts, cfg.eval.every, cfg.train.out_dir = 3, 0, str(workdir / "run2")
    PPOTrainer(cfg)
