"""`rlhf sft` and `rlhf dpo` on tiny real models: the learned tokens are the right ones,
packing changes no number, both stages learn, resume repeats a straight run, the output is
a policy for `rlhf ppo`, and bad input gets one line naming the file and line."""

import json
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from rlhf.checkpoint import CheckpointError
from rlhf.cli import main
from rlhf.dpo import DPOConfig, DPOTrainer
from rlhf.offline import Tokens, collate, token_logprobs
from rlhf.precision import Precision
from rlhf.sft import SFTConfig, SFTTrainer, chat_tokens, load_demonstrations, SFTDataConfig
from tiny import tiny_llama, tiny_tokenizer

WORDS = ["sun", "moon", "tree", "river", "stone", "cloud", "fire", "wind", "snow", "leaf", "bird", "fish"]


def write_jsonl(path, rows):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


def metrics(run_dir) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def demonstrations(n=48):
    """Chats and prompt/completion records whose answer repeats the word asked about: a
    pattern a tiny model learns in a few dozen steps."""
    rows = []
    for i in range(n):
        w = WORDS[i % len(WORDS)]
        if i % 2:
            rows.append({"messages": [{"role": "user", "content": f"say {w}"},
                                      {"role": "assistant", "content": f"{w} {w}"}]})
        else:
            rows.append({"prompt": f"say {w}", "completion": f"{w} {w}"})
    return rows


def _changed(cfg, changes: dict, data, rows):
    """`cfg` with `section__key=value` changes, its data file written (`rows()`) if absent."""
    for dotted, value in changes.items():
        section, key = dotted.split("__")
        setattr(getattr(cfg, section), key, value)
    if not data.exists():
        write_jsonl(data, rows())
    return cfg


def sft_config(tmp_path, policy_dir, name="sft", **changes) -> SFTConfig:
    cfg = SFTConfig()
    cfg.model.policy = str(policy_dir)
    cfg.data.train, cfg.data.max_length, cfg.data.eval_fraction = str(tmp_path / "sft.jsonl"), 96, 0.2
    cfg.train.out_dir, cfg.train.lr, cfg.train.steps = str(tmp_path / name), 3e-3, 30
    cfg.train.batch_size, cfg.train.progress, cfg.train.report, cfg.train.threads = 4, False, False, 1
    return _changed(cfg, changes, tmp_path / "sft.jsonl", demonstrations)


def preferences(n=40):
    """Pairs whose chosen answer repeats 'yes' and rejected one 'no', after varied prompts."""
    return [{"prompt": f"{WORDS[i % len(WORDS)]} {i}? ", "chosen": "yes yes", "rejected": "no no"} for i in range(n)]


def dpo_config(tmp_path, policy_dir, name="dpo", **changes) -> DPOConfig:
    cfg = DPOConfig()
    cfg.model.policy = str(policy_dir)
    cfg.data.train, cfg.data.max_length, cfg.data.max_prompt_tokens = str(tmp_path / "dpo.jsonl"), 64, 32
    cfg.data.eval_fraction = 0.25
    cfg.train.out_dir, cfg.train.lr, cfg.train.steps = str(tmp_path / name), 2e-3, 15
    cfg.train.batch_size, cfg.train.progress, cfg.train.report, cfg.train.threads = 4, False, False, 1
    return _changed(cfg, changes, tmp_path / "dpo.jsonl", preferences)


# --------------------------------------------------------------------------------------
# Which tokens are learned
# --------------------------------------------------------------------------------------


def learned_text(tokenizer, tokens: Tokens) -> str:
    return tokenizer.decode([i for i, m in zip(tokens.ids, tokens.loss_mask) if m])


def test_a_chat_learns_its_assistant_turns_and_their_end_of_turn_only():
    tok = tiny_tokenizer()
    chat = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"},
            {"role": "assistant", "content": "hello"}, {"role": "user", "content": "bye"},
            {"role": "assistant", "content": "see you"}]
    tokens = chat_tokens(tok, chat, completion_only=True, where="x")
    # The template ends each turn with EOS then a newline: EOS is learned, the newline is not.
    assert learned_text(tok, tokens) == "hello</s>see you</s>"
    assert tok.decode(tokens.ids) == tok.apply_chat_template(chat, tokenize=False)
    everything = chat_tokens(tok, chat, completion_only=False, where="x")
    assert everything.loss_mask == [0] + [1] * (len(everything.ids) - 1)


def test_a_template_that_rewrites_earlier_turns_is_refused_not_guessed():
    from rlhf.data import DataError

    tok = tiny_tokenizer()
    # Marks whichever turn is last: the chat's start renders differently inside the whole chat.
    tok.chat_template = ("{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}{% if loop.last %} (last)"
                         "{% endif %}\n{% endfor %}")
    chat = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]
    with pytest.raises(DataError, match="line 3: the chat template renders the start of this chat differently"):
        chat_tokens(tok, chat, completion_only=True, where="f.jsonl line 3")


def test_prompt_completion_learns_the_completion_and_eos(tmp_path):
    tok = tiny_tokenizer()
    path = write_jsonl(tmp_path / "d.jsonl", [{"prompt": "2+2=", "completion": "4"}])
    plain = load_demonstrations(str(path), tok, SFTDataConfig(chat_template=False))[0].tokens
    assert tok.decode(plain.ids) == "2+2=4</s>" and learned_text(tok, plain) == "4</s>"
    chat = load_demonstrations(str(path), tok, SFTDataConfig())[0].tokens
    # As `rlhf ppo` renders the prompt: a user turn and the generation prompt.
    assert tok.decode(chat.ids) == "<|user|>\n2+2=</s>\n<|assistant|>\n4</s>" and learned_text(tok, chat) == "4</s>"


# --------------------------------------------------------------------------------------
# Packing
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("attention", ["eager", "sdpa"])
def test_a_packed_row_gives_each_example_its_unpacked_logprobs(attention):
    tok = tiny_tokenizer()
    model = tiny_llama(tokenizer=tok, seed=3)
    model.set_attn_implementation(attention)
    examples = [Tokens(tok(text)["input_ids"], [0] + [1] * (len(text) - 1)) for text in ("abcdefg", "xyz", "hello w")]
    apart = [token_logprobs(model, *collate([[t]], tok.pad_token_id, "cpu")[:2], Precision())[0] for t in examples]
    ids, positions, mask = collate([examples[:2], examples[2:]], tok.pad_token_id, "cpu")
    packed = token_logprobs(model, ids, positions, Precision())
    # Row 0: example 0's 6 log-probs, one across the boundary (not learned), example 1's 2.
    assert torch.allclose(packed[0, :6], apart[0], atol=1e-5)
    assert torch.allclose(packed[0, 7:9], apart[1], atol=1e-5)
    assert torch.allclose(packed[1, :6], apart[2], atol=1e-5)
    assert mask[0, 6] == 0 and mask[0, :6].sum() == 6


def test_packing_changes_no_held_out_loss(tmp_path, tiny_policy_dir):
    """The held-out loss before training is the same number packed and unpacked."""
    losses = []
    for packing in (True, False):
        cfg = sft_config(tmp_path, tiny_policy_dir, f"pack-{packing}", data__packing=packing)
        trainer = SFTTrainer(cfg)
        assert (len(trainer.eval_items) < 10) == packing  # packed rows hold several examples
        losses.append(trainer.evaluate()["eval/loss"])
    assert losses[0] == pytest.approx(losses[1], rel=1e-5)


# --------------------------------------------------------------------------------------
# SFT
# --------------------------------------------------------------------------------------


def test_sft_lowers_the_held_out_loss_and_saves_a_policy_for_ppo(tmp_path, tiny_policy_dir, monkeypatch):
    """A random tiny model's held-out loss (about log 260 = 5.6) falls by more than a quarter in
    30 steps; final/policy loads with plain transformers and starts a PPO run."""
    from transformers import AutoModelForCausalLM

    from rlhf.config import Config
    from rlhf.ppo import PPOTrainer

    cfg = sft_config(tmp_path, tiny_policy_dir)
    last = SFTTrainer(cfg).train()
    rows = metrics(tmp_path / "sft")
    assert rows[0]["step"] == 0 and last["step"] == 30
    assert last["eval/loss"] < 0.75 * rows[0]["eval/loss"]
    assert all(torch.isfinite(torch.tensor(r.get("train/loss", 0.0))) for r in rows)

    policy_dir = tmp_path / "sft" / "final" / "policy"
    model = AutoModelForCausalLM.from_pretrained(policy_dir)
    trained = load_file(str(policy_dir / "model.safetensors"))
    start = load_file(str(tiny_policy_dir / "model.safetensors"))
    assert any(not torch.equal(trained[k], start[k]) for k in start)
    assert model.config.vocab_size == len(tiny_tokenizer())

    (tmp_path / "sft_rewards.py").write_text("def length(prompts, responses):\n"
                                             "    return [len(r) / 10 for r in responses]\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    ppo = Config()
    ppo.model.policy, ppo.model.critic, ppo.reward.function = str(policy_dir), "policy", "sft_rewards:length"
    write_jsonl(tmp_path / "prompts.jsonl", [{"prompt": f"say {w}"} for w in WORDS[:4]])
    ppo.data.prompts, ppo.rollout.batch_size, ppo.rollout.max_new_tokens = str(tmp_path / "prompts.jsonl"), 4, 6
    ppo.train.out_dir, ppo.train.progress, ppo.train.threads = str(tmp_path / "ppo"), False, 1
    step = PPOTrainer(ppo).step_once()
    assert step["step"] == 1 and abs(step["kl/ref_mean"]) < 1e-4  # the reference is the SFT policy itself


def test_sft_with_lora_and_bf16_saves_the_merged_policy_and_the_adapter(tmp_path, tiny_policy_dir):
    cfg = sft_config(tmp_path, tiny_policy_dir, model__lora=True, model__lora_r=4, model__dtype="bfloat16",
                     train__steps=4, train__lr=1e-2)
    last = SFTTrainer(cfg).train()
    assert torch.isfinite(torch.tensor(last["eval/loss"]))
    final = tmp_path / "sft" / "final"
    assert (final / "adapter" / "adapter_config.json").is_file()
    merged = load_file(str(final / "policy" / "model.safetensors"))
    assert not any("lora" in k for k in merged)


def test_sft_resume_repeats_a_straight_run(tmp_path, tiny_policy_dir):
    """Three steps, a checkpoint, a new process resuming: the same weights and metrics as six
    steps in one go (data order, optimiser and schedule restored)."""
    straight = sft_config(tmp_path, tiny_policy_dir, "straight", train__steps=6, train__micro_batch_size=2)
    SFTTrainer(straight).train()

    first = SFTTrainer(sft_config(tmp_path, tiny_policy_dir, "resumed", train__steps=6, train__micro_batch_size=2))
    for _ in range(3):
        first._write(first.step_once())
    first.save_checkpoint()
    first.run_lock.release()  # the first process ends, and its lock with it
    del first
    SFTTrainer.resume(tmp_path / "resumed").train()

    a = load_file(str(tmp_path / "straight" / "final" / "policy" / "model.safetensors"))
    b = load_file(str(tmp_path / "resumed" / "final" / "policy" / "model.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in a)
    losses = {r["step"]: r.get("train/loss") for r in metrics(tmp_path / "straight")}
    assert all(losses[r["step"]] == r.get("train/loss") for r in metrics(tmp_path / "resumed") if r["step"] > 3)


def test_sft_resume_refuses_what_the_checkpoint_fixes_and_extends_the_schedule(tmp_path, tiny_policy_dir):
    """The optimisation and the data order are fixed by the checkpoint: refused by name, with
    config.yaml untouched. A longer run (train.steps) takes effect: the restored step's
    learning rate is the longer linear schedule's, as in a straight run of that length."""
    SFTTrainer(sft_config(tmp_path, tiny_policy_dir, "short", train__steps=2)).train()
    run = tmp_path / "short"
    before = (run / "config.yaml").read_bytes()
    for override, field in (("train.lr=0.1", "train.lr"), ("train.batch_size=2", "train.batch_size"),
                            ("data.packing=false", "data.packing"), ("train.seed=3", "train.seed")):
        with pytest.raises(CheckpointError, match=rf"{field} cannot change when a run resumes"):
            SFTTrainer.resume(run, [override, "train.steps=4"])
    assert (run / "config.yaml").read_bytes() == before
    SFTTrainer.resume(run, ["train.steps=4", "train.eval_every=1"]).train()
    SFTTrainer(sft_config(tmp_path, tiny_policy_dir, "straight", train__steps=4)).train()
    lrs = {r["step"]: r["lr"] for r in metrics(tmp_path / "straight") if "lr" in r}
    assert {r["step"]: r["lr"] for r in metrics(run) if r["step"] > 2} == {3: lrs[3], 4: lrs[4]}
    assert lrs[3] == pytest.approx(3e-3 * (1 - 2 / 4))
    assert yaml.safe_load((run / "config.yaml").read_text())["train"]["steps"] == 4


def test_dpo_resume_may_turn_prompt_sharing_off_but_not_change_beta(tmp_path, tiny_policy_dir):
    DPOTrainer(dpo_config(tmp_path, tiny_policy_dir, train__steps=1)).train()
    run = tmp_path / "dpo"
    with pytest.raises(CheckpointError, match=r"dpo\.beta cannot change when a run resumes"):
        DPOTrainer.resume(run, ["dpo.beta=0.5", "train.steps=2"])
    trainer = DPOTrainer.resume(run, ["dpo.share_prompt=false", "train.steps=2"])
    assert not trainer.share_prompt
    trainer.train()
    assert [r["step"] for r in metrics(run) if "train/loss" in r] == [1, 2]


def test_sft_cli_refuses_a_used_directory_unless_overwrite(tmp_path, tiny_policy_dir, capsys):
    write_jsonl(tmp_path / "sft.jsonl", demonstrations(16))
    args = [f"model.policy={tiny_policy_dir}", f"data.train={tmp_path / 'sft.jsonl'}", "data.max_length=64",
            f"train.out_dir={tmp_path / 's'}", "train.progress=false", "train.report=false", "train.threads=1"]
    assert main(["sft", *args, "train.steps=2"]) == 0
    (tmp_path / "s" / "notes.txt").write_text("mine")
    capsys.readouterr()
    code, err = run_cli(capsys, "sft", *args, "train.steps=1")
    err = err.splitlines()[-1]
    assert code == 2 and err.startswith("rlhf sft: error: ")
    assert "already holds a run" in err and f"rlhf sft --resume {tmp_path / 's'}" in err and "rlhf sft --overwrite" in err
    assert main(["sft", "--overwrite", *args, "train.steps=1"]) == 0
    for command in ("dpo", "ppo"):  # another command's --resume names the run's own
        code, err = run_cli(capsys, command, "--resume", str(tmp_path / "s"))
        assert code == 2 and f"this is a run of `rlhf sft`; continue it with `rlhf sft --resume {tmp_path / 's'}`" in err
    assert [r["step"] for r in metrics(tmp_path / "s") if r["step"] > 0] == [1]
    assert (tmp_path / "s" / "notes.txt").read_text() == "mine"


def test_a_stop_signal_ends_sft_after_the_step_with_a_checkpoint_and_75(tmp_path, tiny_policy_dir):
    """SIGTERM mid-run: the step in flight finishes and is saved, the exit status is 75; the
    resumed run logs every step once."""
    import os
    import signal
    import subprocess
    import sys
    import time
    from pathlib import Path

    from rlhf.checkpoint import latest_checkpoint, verify

    write_jsonl(tmp_path / "sft.jsonl", demonstrations(16))
    run = tmp_path / "s"
    root = Path(__file__).resolve().parents[1]
    process = subprocess.Popen(
        [sys.executable, "-m", "rlhf", "sft", f"model.policy={tiny_policy_dir}", f"data.train={tmp_path / 'sft.jsonl'}",
         "data.max_length=64", "data.eval_fraction=0", f"train.out_dir={run}", "train.steps=100000",
         "train.progress=false", "train.report=false", "train.threads=1", "train.batch_size=2"],
        cwd=tmp_path, env={**os.environ, "PYTHONPATH": str(root)}, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        text=True)
    end = time.monotonic() + 180
    while not (run / "metrics.jsonl").is_file() or not metrics(run):
        assert process.poll() is None and time.monotonic() < end, process.communicate()[1][-2000:]
        time.sleep(0.1)
    process.send_signal(signal.SIGTERM)
    _, err = process.communicate(timeout=180)
    assert process.returncode == 75, err[-2000:]
    assert "stopped by SIGTERM" in err and f"rlhf sft --resume {run}" in err and "Traceback" not in err
    logged = [r["step"] for r in metrics(run)]
    assert latest_checkpoint(run).name == f"step-{logged[-1]:06d}" and verify(latest_checkpoint(run)) is None
    assert not (run / "final").exists()
    assert main(["sft", "--resume", str(run), f"train.steps={logged[-1] + 1}"]) == 0
    assert [r["step"] for r in metrics(run)] == list(range(1, logged[-1] + 2))


# --------------------------------------------------------------------------------------
# DPO
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("loss", ["sigmoid", "ipo"])
def test_dpo_ranks_held_out_pairs_right(tmp_path, tiny_policy_dir, loss):
    """Before training the policy is its reference: every implicit reward is 0, no pair is
    ranked right (ties count as wrong) and the sigmoid loss is log 2. After 15 steps the
    held-out pairs (unseen prompts) are ranked right with a positive margin."""
    cfg = dpo_config(tmp_path, tiny_policy_dir, dpo__loss=loss, dpo__beta=0.5)
    last = DPOTrainer(cfg).train()
    start = metrics(tmp_path / "dpo")[0]
    assert start["eval/rewards/accuracy"] == 0 and start["eval/rewards/margin"] == 0
    if loss == "sigmoid":
        assert start["eval/loss"] == pytest.approx(0.6931, abs=1e-4)
    assert last["eval/rewards/accuracy"] >= 0.9 and last["eval/rewards/margin"] > 0.2
    assert last["rewards/chosen"] - last["rewards/rejected"] == pytest.approx(last["rewards/margin"], abs=1e-5)
    for key in ("rewards/chosen", "rewards/rejected", "rewards/margin", "rewards/accuracy", "logps/chosen"):
        assert key in last


def test_dpo_under_lora_uses_the_adapter_disabled_base_as_reference(tmp_path, tiny_policy_dir):
    cfg = dpo_config(tmp_path, tiny_policy_dir, model__lora=True, model__lora_r=4, train__steps=8, train__lr=1e-2,
                     dpo__beta=0.5)
    trainer = DPOTrainer(cfg)
    assert trainer.ref is None
    # LoRA starts as the identity (B = 0): the policy is its reference, every reward 0.
    assert trainer.evaluate()["eval/rewards/margin"] == 0
    last = trainer.train()
    assert last["eval/rewards/margin"] > 0
    assert (tmp_path / "dpo" / "final" / "adapter" / "adapter_config.json").is_file()


def test_dpo_pairs_are_laid_out_as_rollouts_with_the_prompt_before_the_first_learned_token():
    from rlhf.dpo import as_rollout

    rows = [Tokens([5, 6, 7, 8, 2], [0, 0, 0, 1, 1]), Tokens([5, 6, 7, 9, 9, 2], [0, 0, 0, 1, 1, 1]),
            Tokens([4, 3], [0, 0])]  # the last: its response cut off entirely
    r = as_rollout(rows, pad_id=0, device="cpu")
    assert r.prompt_ids.tolist() == [[5, 6, 7], [5, 6, 7], [0, 0, 4]]
    assert r.prompt_mask.tolist() == [[1, 1, 1], [1, 1, 1], [0, 0, 1]]
    assert r.response_ids.tolist() == [[8, 2, 0], [9, 9, 2], [3, 0, 0]]
    assert r.response_mask.tolist() == [[1, 1, 0], [1, 1, 1], [0, 0, 0]]
    # The response's attention mask is its loss mask: a gap in the learned tokens would hide tokens.
    with pytest.raises(ValueError, match="one run"):
        as_rollout([Tokens([5, 6, 7, 8], [0, 1, 0, 1])], pad_id=0, device="cpu")


@pytest.mark.parametrize("share", [True, False])
def test_dpo_log_probs_are_those_of_one_forward_over_each_whole_sequence(tmp_path, tiny_policy_dir, share):
    """The oracle: each prompt + response in one forward (offline's packed layout), its
    log-probs summed over the loss mask. With shared prompts a pair's prompt runs once."""
    from rlhf import algos

    trainer = DPOTrainer(dpo_config(tmp_path, tiny_policy_dir, dpo__share_prompt=share))
    assert trainer.share_prompt is share
    items = trainer.train_items[:5]
    rows = [[p.chosen] for p in items] + [[p.rejected] for p in items]
    ids, positions, mask = collate(rows, trainer.tokenizer.pad_token_id, "cpu")
    seen = []
    layer = trainer.unwrapped_policy().model.layers[0]
    hook = layer.register_forward_hook(lambda m, args, out: seen.append(args[0].shape[0]))
    with torch.no_grad():
        expected = algos.sequence_logprobs(token_logprobs(trainer.policy, ids, positions, trainer.precision), mask)
        seen.clear()
        terms = trainer._pair_terms(trainer.policy, items)
    hook.remove()
    torch.testing.assert_close(terms.logps, expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(terms.ref, expected, rtol=1e-5, atol=1e-5)  # the reference is the start
    # The policy: the prompts of 5 pairs, then their 10 responses; or 10 whole rows.
    assert seen == ([5, 10] if share else [10])


# --------------------------------------------------------------------------------------
# The command line and bad input
# --------------------------------------------------------------------------------------


def run_cli(capsys, *argv) -> tuple[int, str]:
    code = main(list(argv))
    return code, capsys.readouterr().err.strip()


def test_cli_runs_sft_then_dpo_from_yaml(tmp_path, tiny_policy_dir, capsys):
    write_jsonl(tmp_path / "sft.jsonl", demonstrations(16))
    write_jsonl(tmp_path / "dpo.jsonl", preferences(8))
    (tmp_path / "sft.yaml").write_text(yaml.safe_dump({
        "model": {"policy": str(tiny_policy_dir)}, "data": {"train": str(tmp_path / "sft.jsonl"), "max_length": 64},
        "train": {"out_dir": str(tmp_path / "s"), "steps": 2, "progress": False, "threads": 1, "report": True}}))
    assert main(["sft", str(tmp_path / "sft.yaml")]) == 0
    assert (tmp_path / "s" / "report.html").is_file() and (tmp_path / "s" / "plots" / "loss.png").is_file()
    (tmp_path / "dpo.yaml").write_text(yaml.safe_dump({
        "model": {"policy": str(tmp_path / "s" / "final" / "policy")},
        "data": {"train": str(tmp_path / "dpo.jsonl"), "max_length": 64, "max_prompt_tokens": 32},
        "train": {"out_dir": str(tmp_path / "d"), "steps": 2, "progress": False, "threads": 1, "report": True}}))
    assert main(["dpo", str(tmp_path / "dpo.yaml"), "dpo.beta=0.2"]) == 0
    assert yaml.safe_load((tmp_path / "d" / "config.yaml").read_text())["dpo"]["beta"] == 0.2
    # Resume extends the finished run: step 3 of 3 runs at the linear schedule's 1/3 of lr, not
    # at the 0 the 2-step schedule ended with.
    assert main(["dpo", "--resume", str(tmp_path / "d"), "train.steps=3"]) == 0
    last = metrics(tmp_path / "d")[-1]
    assert last["step"] == 3 and last["lr"] == pytest.approx(1e-6 / 3)
    assert (tmp_path / "d" / "plots" / "dpo_rewards.png").is_file()


BAD_SFT = [
    ([{"prompt": "hi"}], "line 1: missing field `completion`"),
    ([{"prompt": "hi", "completion": "x"}, {"messages": [{"role": "user", "content": "hi"}]}],
     "line 2: `messages` has no assistant turn"),
    ([{"prompt": "p" * 80, "completion": "x"}], "line 1: data.max_length=64 cuts every learned token"),
    (["{not json"], "line 1: not valid JSON"),
    ([{"messages": [{"role": "user", "content": "hi"}, {"role": "bot", "content": "x"},
                    {"role": "assistant", "content": "y"}]}],
     "line 1: messages[1].role: expected one of system, developer, user, assistant, tool, ipython, got 'bot'"),
]


@pytest.mark.parametrize("rows,message", BAD_SFT)
def test_bad_demonstrations_get_one_line_naming_file_and_line(tmp_path, tiny_policy_dir, capsys, rows, message):
    data = write_jsonl(tmp_path / "bad.jsonl", rows)
    code, err = run_cli(capsys, "sft", f"model.policy={tiny_policy_dir}", f"data.train={data}", "data.max_length=64",
                        "data.chat_template=false", f"train.out_dir={tmp_path / 'run'}", "train.progress=false")
    assert code == 2 and len(err.splitlines()) == 1
    assert str(data) in err and message in err
    assert not (tmp_path / "run").exists()  # a run that never started leaves no config.yaml behind


BAD_DPO = [
    ([{"prompt": "q", "chosen": "a"}], "line 1: missing field `rejected`"),
    ([{"prompt": "q", "chosen": "same", "rejected": "same"}], "line 1: `chosen` and `rejected` are the same text"),
    ([{"prompt": "q", "chosen": "x" * 40 + "a", "rejected": "x" * 40 + "b"}],
     "line 1: `chosen` and `rejected` are the same once cut to data.max_length=32"),
]


@pytest.mark.parametrize("rows,message", BAD_DPO)
def test_bad_preferences_get_one_line_naming_file_and_line(tmp_path, tiny_policy_dir, capsys, rows, message):
    data = write_jsonl(tmp_path / "bad.jsonl", rows)
    code, err = run_cli(capsys, "dpo", f"model.policy={tiny_policy_dir}", f"data.train={data}", "data.max_length=32",
                        "data.max_prompt_tokens=16", f"train.out_dir={tmp_path / 'run'}", "train.progress=false")
    assert code == 2 and len(err.splitlines()) == 1
    assert str(data) in err and message in err


def test_bad_config_values_name_the_field(tmp_path, capsys):
    code, err = run_cli(capsys, "dpo", "data.train=x.jsonl", "dpo.beta=0")
    assert code == 2 and "dpo.beta: expected > 0" in err
    code, err = run_cli(capsys, "sft", "data.train=x.jsonl", "data.packing=maybe")
    assert code == 2 and "data.packing: expected true or false" in err
    code, err = run_cli(capsys, "sft", "--resume", str(tmp_path))
    assert code == 2 and "no config.yaml" in err


def test_every_field_of_the_new_sections_has_a_docstring():
    """`ModelConfig` extends `PolicyConfig`: its documentation includes the inherited fields."""
    from dataclasses import fields

    from rlhf.config import ModelConfig, PolicyConfig, field_docs
    from rlhf.dpo import DPODataConfig, DPOLossConfig, DPOTrainConfig
    from rlhf.offline import OfflineTrainConfig

    for cls in (PolicyConfig, ModelConfig, SFTDataConfig, OfflineTrainConfig, DPODataConfig, DPOLossConfig,
                DPOTrainConfig):
        docs = field_docs(cls)
        assert [f.name for f in fields(cls) if not docs.get(f.name)] == [], cls.__name__
    assert "critic" in field_docs(ModelConfig) and "lora" in field_docs(ModelConfig)


def _mixed_pairs():
    """Pairs whose prompts differ in length (1 to 9 tokens, so left padding), a response cut
    by max_length, and a ranking of three responses to one prompt expanded to its 3 pairs."""
    from rlhf.dpo import PreferencePair
    from rlhf.offline import prompt_and_response

    g = torch.Generator().manual_seed(0)
    ids = lambda n: torch.randint(3, 60, (n,), generator=g).tolist()  # noqa: E731
    pairs = []
    for i, (p, c, r) in enumerate([(1, 4, 2), (9, 3, 5), (3, 20, 1), (5, 2, 2)]):
        prompt = ids(p)
        pairs.append(PreferencePair(prompt_and_response(prompt, ids(c), 16), prompt_and_response(prompt, ids(r), 16), i))
    prompt, ranked = ids(4), [ids(n) for n in (3, 5, 2)]
    for a, b in ((0, 1), (0, 2), (1, 2)):
        pairs.append(PreferencePair(prompt_and_response(prompt, ranked[a]), prompt_and_response(prompt, ranked[b]), 9))
    return pairs


@pytest.mark.parametrize("share", [True, False])
@pytest.mark.parametrize("loss", ["sigmoid", "ipo"])
@pytest.mark.parametrize("pairs", ["all", "last five"])
def test_dpo_log_probs_of_mixed_prompts_are_those_of_whole_sequences(tmp_path, tiny_policy_dir, share, loss, pairs):
    """All pairs: prompts of 1 to 9 tokens make the shared layout wider than the sequences
    right-padded, so it is not used; the last five (prompts of 4 and 5 tokens, a ranking's
    three pairs among them) share their prompts."""
    from rlhf import algos
    from rlhf.experience import Rollout

    trainer = DPOTrainer(dpo_config(tmp_path, tiny_policy_dir, dpo__share_prompt=share, dpo__loss=loss))
    torch.manual_seed(1)
    with torch.no_grad():  # a policy away from its reference, so the two differ
        for p in trainer.policy.parameters():
            p.add_(0.05 * torch.randn_like(p))
    items = _mixed_pairs() if pairs == "all" else _mixed_pairs()[3:]
    if pairs == "all":
        assert max(len(p.chosen.ids) for p in items) == 16  # the third pair's chosen response was cut
    batch, _ = trainer._layout([p.chosen for p in items] + [p.rejected for p in items])
    assert isinstance(batch, Rollout) is (share and pairs == "last five")
    rows = [[p.chosen] for p in items] + [[p.rejected] for p in items]
    ids, positions, mask = collate(rows, trainer.tokenizer.pad_token_id, "cpu")
    with torch.no_grad():
        terms = trainer._pair_terms(trainer.policy, items)
        for model, got in ((trainer.policy, terms.logps), (trainer.ref, terms.ref)):
            expected = algos.sequence_logprobs(token_logprobs(model, ids, positions, trainer.precision), mask,
                                               average=loss == "ipo")
            torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    assert (terms.logps - terms.ref).abs().max() > 1e-3


def test_unshared_dpo_batches_are_as_wide_as_their_longest_sequence_and_project_from_the_first_learned_token(
        tmp_path, tiny_policy_dir):
    """A long prompt with short responses beside a short prompt with long ones: the shared
    layout would be as wide as both longest parts; the sequences right-padded are used, and
    the vocabulary projection runs only from the first learned token on."""
    from rlhf.dpo import PreferencePair
    from rlhf.offline import prompt_and_response

    trainer = DPOTrainer(dpo_config(tmp_path, tiny_policy_dir))
    assert trainer.share_prompt
    g = torch.Generator().manual_seed(0)
    ids = lambda n: torch.randint(3, 60, (n,), generator=g).tolist()  # noqa: E731
    long_prompt, short_prompt = ids(30), ids(2)
    items = [PreferencePair(prompt_and_response(long_prompt, ids(2)), prompt_and_response(long_prompt, ids(3)), 0),
             PreferencePair(prompt_and_response(short_prompt, ids(25)), prompt_and_response(short_prompt, ids(20)), 1)]
    rows = [p.chosen for p in items] + [p.rejected for p in items]
    batch, mask = trainer._layout(rows)
    assert batch.ids.shape[1] == max(len(t.ids) for t in rows) == 33
    assert batch.first == 2 and mask.shape == (4, 31)
    widths = []
    hook = trainer.policy.lm_head.register_forward_hook(lambda m, args, out: widths.append(out.shape[1]))
    with torch.no_grad():
        got = trainer._logprobs(trainer.policy, batch, None)
        ids_, positions, full_mask = collate([[t] for t in rows], trainer.tokenizer.pad_token_id, "cpu")
        full = token_logprobs(trainer.policy, ids_, positions, trainer.precision)
    hook.remove()
    assert widths[0] == 31  # positions 1 .. 31 predict tokens 2 .. 32
    torch.testing.assert_close(got, full[:, 1:], rtol=1e-6, atol=1e-6)
    assert torch.equal(mask, full_mask[:, 1:])


def test_the_rollout_layout_gives_whole_sequence_log_probs_on_absolute_positions():
    """GPT-2 adds learned absolute position embeddings: a position off by one would show."""
    import transformers

    from rlhf import algos
    from rlhf.dpo import as_rollout
    from rlhf.rollout import policy_forward

    torch.manual_seed(0)
    model = transformers.GPT2LMHeadModel(transformers.GPT2Config(vocab_size=64, n_embd=32, n_layer=2, n_head=4,
                                                                 n_positions=64)).double().eval()
    items = _mixed_pairs()
    rows = [p.chosen for p in items] + [p.rejected for p in items]
    ids, positions, mask = collate([[r] for r in rows], 0, "cpu")
    expected = algos.sequence_logprobs(token_logprobs(model, ids, positions, Precision()), mask)
    rollout = as_rollout(rows, 0, "cpu")
    for share in (False, True):
        got = algos.sequence_logprobs(policy_forward(model, rollout, 1.0, share_prefix=share)[0], rollout.response_mask)
        torch.testing.assert_close(got, expected, rtol=1e-6, atol=1e-6)


@pytest.mark.slow
def test_dpo_on_two_processes_makes_the_update_of_one_process(tmp_path, tiny_policy_dir):
    """`rlhf dpo` under `accelerate launch` (2 CPU processes, gloo), each with half of every
    batch and the pairs' prompts shared (the prefix runs on the unwrapped module, one DDP
    forward a backward): the final weights of one process on the whole batches."""
    import sys

    from test_distributed import _launch, _run

    write_jsonl(tmp_path / "dpo.jsonl", preferences(24))
    weights = {}
    for name, batch, world in (("one", 4, 1), ("two", 2, 2)):
        cfg = {"model": {"policy": str(tiny_policy_dir)},
               "data": {"train": str(tmp_path / "dpo.jsonl"), "eval_fraction": 0.0, "max_length": 64,
                        "max_prompt_tokens": 32},
               "dpo": {"beta": 0.5},
               "train": {"out_dir": str(tmp_path / name), "steps": 3, "batch_size": batch, "lr": 2e-3, "threads": 1,
                         "progress": False, "report": False, "save_every": 0, "eval_every": 0}}
        (tmp_path / f"{name}.yaml").write_text(yaml.safe_dump(cfg))
        if world == 1:
            _run([sys.executable, "-m", "rlhf", "dpo", str(tmp_path / f"{name}.yaml")], tmp_path)
        else:
            _launch(tmp_path, "-m", "rlhf", "dpo", str(tmp_path / f"{name}.yaml"))
        weights[name] = load_file(str(tmp_path / name / "final" / "policy" / "model.safetensors"))
    start = load_file(str(tiny_policy_dir / "model.safetensors"))
    assert max((weights["one"][k] - start[k]).abs().max().item() for k in start) > 1e-4  # the steps moved
    for k, w in weights["one"].items():
        torch.testing.assert_close(weights["two"][k], w, rtol=0, atol=2e-6, msg=k)


def test_sft_and_dpo_send_their_metrics_rows_to_tensorboard(tmp_path, tiny_policy_dir):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    def scalars(run):
        acc = EventAccumulator(str(next((run / "tracking").rglob("events.out.tfevents.*")).parent))
        acc.Reload()
        return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}

    for trainer in (SFTTrainer(sft_config(tmp_path, tiny_policy_dir, "s", train__steps=2,
                                          train__report_to=["tensorboard"])),
                    DPOTrainer(dpo_config(tmp_path, tiny_policy_dir, "d", train__steps=2,
                                          train__report_to=["tensorboard"]))):
        trainer.train()
        run = Path(trainer.out_dir)
        logged = scalars(run)
        for row in metrics(run):
            for key, value in row.items():
                if key != "step" and isinstance(value, float):
                    assert (row["step"], pytest.approx(value, rel=1e-6, abs=1e-7)) in logged[key], key
        assert [s for s, _ in logged["train/loss"]] == [1, 2]


def test_an_unknown_tracker_is_refused_for_sft():
    from rlhf.config import ConfigError, load_config

    with pytest.raises(ConfigError, match=r"train\.report_to: expected names among tensorboard.*got 'tensorbored'"):
        load_config(SFTConfig, None, ["data.train=x.jsonl", "train.report_to=[tensorbored]"])
