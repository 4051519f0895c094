"""Reward-model training (Bradley-Terry) and its preference data, as specifications.

Tiny models only (tests/tiny.py): the whole file runs in seconds.
"""

import json
import random
from pathlib import Path

import pytest
import torch
import yaml

from rlhf.cli import main
from rlhf.models import load_reward_model, read_reward_stats
from rlhf.reward_model import (
    Preference,
    PreferenceError,
    RewardModelConfig,
    expand_ranking,
    load_preferences,
    score_texts,
    split_by_line,
    train_reward_model,
)
from tiny import save_tiny_policy


def write_jsonl(path, rows):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


# --------------------------------------------------------------------------------------
# Rankings
# --------------------------------------------------------------------------------------


def test_ranking_of_k_responses_gives_k_choose_2_pairs_best_first():
    # Rank 1 is best: "b" (1) > "c" (2) > "a" (3).
    pairs = expand_ranking(["a", "b", "c"], [3, 1, 2])
    assert sorted(pairs) == sorted([("b", "a"), ("b", "c"), ("c", "a")])
    assert len(expand_ranking(list("abcde"), [1, 2, 3, 4, 5])) == 5 * 4 // 2


def test_tied_ranks_state_no_preference():
    # "a" and "b" tie: the only pairs are against "c".
    assert sorted(expand_ranking(["a", "b", "c"], [1, 1, 2])) == [("a", "c"), ("b", "c")]


def test_ranking_lines_expand_and_keep_their_prompt(tmp_path):
    path = write_jsonl(tmp_path / "r.jsonl", [
        {"prompt": "Q: ", "responses": ["x", "y", "z", "w"], "ranks": [4, 3, 2, 1]},
        {"chosen": "good", "rejected": "bad"},
    ])
    pairs = load_preferences(path)
    assert len(pairs) == 6 + 1
    assert all(p.prompt == "Q: " and p.line == 1 for p in pairs[:6])
    assert ("w", "x") in {(p.chosen, p.rejected) for p in pairs}
    assert pairs[-1] == Preference("", "good", "bad", None, None, 2)


def test_split_keeps_the_pairs_of_one_ranking_together(tmp_path):
    rows = [{"responses": ["a", "b", "c"], "ranks": [1, 2, 3], "prompt": f"p{i}"} for i in range(20)]
    pairs = load_preferences(write_jsonl(tmp_path / "r.jsonl", rows))
    train, held = split_by_line(pairs, 0.25, seed=0)
    assert len(held) == 5 * 3 and len(train) == 15 * 3
    assert not {p.line for p in train} & {p.line for p in held}


# --------------------------------------------------------------------------------------
# Data errors: each names the file and the line
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("line, message", [
    ({"chosen": "a"}, "missing field `rejected`"),
    ({"prompt": "p", "rejected": "a"}, "missing field `chosen`"),
    ({"chosen": "  ", "rejected": "b"}, "`chosen` is empty"),
    ({"chosen": "same", "rejected": "same"}, "tie given as a preference"),
    ({"responses": ["a", "b"]}, "`ranks` is missing"),
    ({"responses": ["a", "b"], "ranks": [1]}, "`ranks` must be a list of 2 numbers"),
    ({"responses": ["a", "a"], "ranks": [1, 2]}, "same text with different ranks"),
    ({"responses": ["a", "b"], "ranks": [1, 1]}, "every rank is tied"),
    ({"responses": ["a", ""], "ranks": [1, 2]}, "response 2: `responses` is empty"),
    ({"chosen": 3, "rejected": "b"}, "`chosen` must be a string"),
    ({"chosen": "a", "rejected": "b", "margin": "big"}, "`margin` must be a number"),
    ("[1, 2]", "expected a JSON object"),
    ("chosen,rejected", "not valid JSON"),
    ('{"chosen": "an unterminated string}', "not valid JSON (column 12: Unterminated string starting)"),
])
def test_bad_lines_are_reported_with_file_and_line(tmp_path, line, message):
    path = write_jsonl(tmp_path / "prefs.jsonl", [{"chosen": "fine", "rejected": "worse"}, line])
    with pytest.raises(PreferenceError) as e:
        load_preferences(path)
    assert message in str(e.value)
    assert f"{path} line 2" in str(e.value)


def test_a_json_array_file_is_not_jsonl(tmp_path):
    path = tmp_path / "prefs.json"
    path.write_text(json.dumps([{"chosen": "a", "rejected": "b"}], indent=2))
    with pytest.raises(PreferenceError, match="line 1: .*expected JSONL"):
        load_preferences(path)


def test_bytes_that_are_not_utf8_name_their_line(tmp_path):
    path = tmp_path / "prefs.jsonl"
    path.write_bytes(b'{"chosen": "a", "rejected": "b"}\n\n{"chosen": "\xff", "rejected": "b"}\n')
    with pytest.raises(PreferenceError, match="line 3: not UTF-8"):
        load_preferences(path)


def test_empty_and_missing_files(tmp_path):
    with pytest.raises(PreferenceError, match="not found"):
        load_preferences(tmp_path / "nope.jsonl")
    with pytest.raises(PreferenceError, match="no preferences"):
        load_preferences(write_jsonl(tmp_path / "blank.jsonl", ["", "  "]))


# --------------------------------------------------------------------------------------
# Training
# --------------------------------------------------------------------------------------


def separable_preferences(n: int, seed: int, preferred: str = "aeiou", other: str = "bcdfg") -> list[dict]:
    """Chosen texts are made of `preferred` letters, rejected ones of `other` letters (lengths
    drawn from the same range): a preference learnt only by reading the text."""
    rng = random.Random(seed)

    def word(letters):
        return "".join(rng.choice(letters) for _ in range(rng.randint(3, 8)))

    return [{"prompt": "say: ", "chosen": word(preferred), "rejected": word(other)} for _ in range(n)]


@pytest.fixture
def rm_config(tmp_path, tiny_reward_dir):
    train = write_jsonl(tmp_path / "train.jsonl", separable_preferences(160, seed=0))
    held = write_jsonl(tmp_path / "eval.jsonl", separable_preferences(60, seed=1))
    return RewardModelConfig(backbone=str(tiny_reward_dir), train_data=str(train), eval_data=str(held),
                             out_dir=str(tmp_path / "rm"), lr=3e-3, batch_size=16, max_steps=30, warmup_steps=0,
                             max_length=32, log_every=5, progress=False)


@pytest.mark.parametrize("preferred, other", [("aeiou", "bcdfg"), ("bcdfg", "aeiou")])
def test_learns_a_separable_preference_either_way(tmp_path, rm_config, preferred, other):
    # A random model ranks one letter set above the other by accident, so it can score well
    # on one direction; only a model that learnt from the pairs is right both ways.
    rm_config.train_data = str(write_jsonl(tmp_path / "t.jsonl", separable_preferences(160, 0, preferred, other)))
    rm_config.eval_data = str(write_jsonl(tmp_path / "e.jsonl", separable_preferences(60, 1, preferred, other)))
    metrics = train_reward_model(rm_config)
    assert metrics["eval/accuracy"] >= 0.9  # chance: 0.5
    assert metrics["eval/margin"] > 0


def test_saves_a_model_that_plain_transformers_and_ppo_load(rm_config):
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    rm_config.max_steps = 10
    metrics = train_reward_model(rm_config)
    assert metrics["eval/pairs"] == 60 and metrics["train/pairs"] == 160

    out = Path(rm_config.out_dir)
    # Plain transformers loads it, and so does the PPO side (reward.model).
    plain = AutoModelForSequenceClassification.from_pretrained(out)
    tokenizer = AutoTokenizer.from_pretrained(out)
    assert plain.config.num_labels == 1
    rm = load_reward_model(out).eval()
    text = "say: aeiua"
    with torch.no_grad():
        logit = plain(**tokenizer(text, return_tensors="pt")).logits[0, 0].item()
    assert score_texts(rm, tokenizer, [text])[0] == pytest.approx(logit, abs=1e-4)

    # The reference statistics are those of the held-out texts' scores.
    stats = read_reward_stats(out)
    pairs = load_preferences(rm_config.eval_data)
    texts = sorted({p.prompt + t for p in pairs for t in (p.chosen, p.rejected)})
    scores = torch.tensor(score_texts(rm, tokenizer, texts))
    assert stats["mean"] == pytest.approx(scores.mean().item(), abs=1e-4)
    assert stats["std"] == pytest.approx(scores.std().item(), abs=1e-4)

    lines = [json.loads(x) for x in open(f"{out}/metrics.jsonl")]
    assert [r["step"] for r in lines] == [5, 10]
    assert yaml.safe_load(open(f"{out}/config.yaml"))["max_steps"] == 10


def test_a_decoder_backbone_gets_a_fresh_head_and_learns(tmp_path, rm_config):
    rm_config.backbone = str(save_tiny_policy(tmp_path / "llama"))
    metrics = train_reward_model(rm_config)
    assert metrics["eval/accuracy"] >= 0.85
    assert load_reward_model(Path(rm_config.out_dir)).config.pad_token_id is not None


def test_accuracy_is_reported_per_category_and_without_eval_data_a_share_is_held_out(tmp_path, rm_config):
    rows = separable_preferences(100, seed=2)
    for i, row in enumerate(rows):
        row["category"] = "even" if i % 2 == 0 else "odd"
    rm_config.train_data = str(write_jsonl(tmp_path / "all.jsonl", rows))
    rm_config.eval_data = None
    rm_config.eval_fraction = 0.2
    rm_config.max_steps = 5
    metrics = train_reward_model(rm_config)
    assert metrics["train/pairs"] == 80 and metrics["eval/pairs"] == 20
    assert metrics["eval/even/pairs"] + metrics["eval/odd/pairs"] == 20
    assert 0 <= metrics["eval/odd/accuracy"] <= 1


def test_cli_trains_from_yaml_with_overrides_and_reports_bad_data(tmp_path, rm_config, capsys):
    config = tmp_path / "rm.yaml"
    config.write_text(yaml.safe_dump({**rm_config.__dict__, "max_steps": 100}))
    assert main(["reward-model", str(config), "max_steps=3"]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed["train/steps"] == 3

    write_jsonl(tmp_path / "bad.jsonl", [{"chosen": "a", "rejected": "b"}, {"chosen": "a"}])
    assert main(["reward-model", str(config), f"train_data={tmp_path / 'bad.jsonl'}"]) == 2
    assert "bad.jsonl line 2: missing field `rejected`" in capsys.readouterr().err


def test_ppo_scores_a_text_longer_than_max_length_by_its_end_as_training_does(tiny_reward_dir, tiny_policy_dir):
    """A reward model's input cut to reward.max_length keeps the response's end in PPO as in
    `rlhf reward-model`, also for a reward model whose saved tokenizer cuts the end."""
    from rlhf.config import RewardConfig
    from rlhf.models import load_tokenizer
    from rlhf.reward_model import load_backbone
    from rlhf.rewards import Reward

    reward = Reward(RewardConfig(model=str(tiny_reward_dir), max_length=8), load_tokenizer(str(tiny_policy_dir)))
    assert reward.tokenizer.truncation_side == "left"
    prompt, response = "say: ", "a b c d e f g h i j k l m n o p"
    model, tokenizer = load_backbone(RewardModelConfig(backbone=str(tiny_reward_dir), max_length=8))
    assert len(tokenizer(prompt + response)["input_ids"]) > 8
    trained = score_texts(model, tokenizer, [prompt + response], max_length=8)[0]
    assert reward.raw([prompt], [response]).item() == pytest.approx(trained, abs=1e-5)
    tokenizer.truncation_side = "right"  # the start instead: another score, so the cut is seen
    assert score_texts(model, tokenizer, [prompt + response], max_length=8)[0] != pytest.approx(trained, abs=1e-5)
