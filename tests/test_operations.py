"""Operations as a user and a cluster meet them: the smallest config runs, signals stop a run
with a checkpoint, a run directory belongs to one run, resume trusts only what verifies and
runs no pickled code, a full disk is named, and bad values and inputs are one-line errors.

Signals are real signals to real `rlhf ppo` processes; the full disk is a real tmpfs."""

import json
import logging
import os
import pickle
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch

from rlhf.checkpoint import CheckpointError, checkpoints, latest_checkpoint, verify
from rlhf.config import Config, ConfigError, load_config
from rlhf.ppo import PPOTrainer
from rlhf.rundir import RunDirectoryError

ROOT = Path(__file__).resolve().parents[1]

REWARDS = '''
import time


def share_of_a(prompts, responses):
    return [r.count("a") / max(len(r), 1) for r in responses]


def slow_share_of_a(prompts, responses):
    """A slow reward server: each step takes a second, so signals arrive mid-step."""
    time.sleep(1.0)
    return share_of_a(prompts, responses)
'''


@pytest.fixture
def workdir(tmp_path, monkeypatch):
    (tmp_path / "ops_rewards.py").write_text(REWARDS)
    (tmp_path / "prompts.txt").write_text("hello there\nthe sea is\ntell me\nonce upon a time\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.chdir(tmp_path)
    return tmp_path


def small(workdir, policy_dir, name="run", **changes) -> Config:
    """A config of a few milliseconds a step: 2 prompts, 6 new tokens."""
    cfg = Config()
    cfg.model.policy = str(policy_dir)
    cfg.reward.function = "ops_rewards:share_of_a"
    cfg.data.prompts, cfg.data.chat_template = str(workdir / "prompts.txt"), False
    cfg.rollout.batch_size, cfg.rollout.max_new_tokens = 2, 6
    cfg.train.out_dir, cfg.train.save_every, cfg.train.progress, cfg.train.report = str(workdir / name), 0, False, False
    cfg.train.steps, cfg.train.threads = 1, 1
    for dotted, value in changes.items():
        section, key = dotted.split("__")
        setattr(getattr(cfg, section), key, value)
    return cfg


def rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()] if path.is_file() else []


def steps_of(path: Path) -> list[int]:
    return [r["step"] for r in rows(path)]


# ------------------------------------------------------------------------------------------
# 1. The smallest config runs, for either kind of reward
# ------------------------------------------------------------------------------------------


def test_the_smallest_config_runs_with_a_reward_function(workdir, tiny_policy_dir, caplog):
    """{model: {policy}, reward: {function}, data: {prompts}} and nothing else about the
    critic: the default starts the critic from the policy and says so."""
    (workdir / "c.yaml").write_text(textwrap.dedent(f"""\
        model: {{policy: {tiny_policy_dir}}}
        reward: {{function: ops_rewards:share_of_a}}
        data: {{prompts: {workdir / 'prompts.txt'}}}
        """))
    cfg = load_config(Config, workdir / "c.yaml", ["rollout.batch_size=2", "rollout.max_new_tokens=4", "train.steps=1",
                                                   f"train.out_dir={workdir / 'run'}", "train.report=false",
                                                   "train.progress=false"])
    assert cfg.model.critic == "auto"
    with caplog.at_level(logging.INFO, logger="rlhf"):
        trainer = PPOTrainer(cfg)
    assert "model.critic=auto: the critic starts from the policy" in caplog.text
    assert trainer.critic is not None
    trainer.train()
    assert steps_of(workdir / "run" / "metrics.jsonl") == [1]


def test_the_default_critic_starts_from_a_reward_model_with_the_policys_tokenizer(workdir, tiny_policy_dir, caplog):
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    reward_dir = workdir / "decoder_rm"
    torch.manual_seed(1)
    AutoModelForSequenceClassification.from_pretrained(tiny_policy_dir, num_labels=1).save_pretrained(reward_dir)
    AutoTokenizer.from_pretrained(tiny_policy_dir).save_pretrained(reward_dir)
    cfg = small(workdir, tiny_policy_dir, reward__function=None, reward__model=str(reward_dir))
    with caplog.at_level(logging.INFO, logger="rlhf"):
        trainer = PPOTrainer(cfg)
    assert "the critic starts from the reward model's backbone" in caplog.text
    critic = trainer.accelerator.unwrap_model(trainer.critic)
    torch.testing.assert_close(critic.score.weight, trainer.reward.model.score.weight)


# ------------------------------------------------------------------------------------------
# 2. Signals: finish the step, save, exit 75; a second signal aborts; logs cut back on resume
# ------------------------------------------------------------------------------------------


def start_cli_run(workdir, policy_dir, *args) -> subprocess.Popen:
    (workdir / "long.yaml").write_text(textwrap.dedent(f"""\
        model: {{policy: {policy_dir}}}
        reward: {{function: ops_rewards:slow_share_of_a}}
        data: {{prompts: {workdir / 'prompts.txt'}, chat_template: false}}
        rollout: {{batch_size: 2, max_new_tokens: 4}}
        train: {{steps: 1000, save_every: 0, out_dir: {workdir / 'run'}, progress: false, report: false, threads: 1}}
        """))
    env = {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{workdir}"}
    return subprocess.Popen([sys.executable, "-m", "rlhf", "ppo", str(workdir / "long.yaml"), *args], cwd=workdir,
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def wait_for_steps(process, metrics: Path, n: int, timeout: float = 180.0) -> None:
    end = time.monotonic() + timeout
    while len(steps_of(metrics)) < n:
        if process.poll() is not None or time.monotonic() > end:
            process.kill()
            pytest.fail(f"the run did not log {n} steps: {process.communicate()[1][-2000:]}")
        time.sleep(0.1)


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGUSR1, signal.SIGINT], ids=["SIGTERM", "SIGUSR1", "SIGINT"])
def test_a_stop_signal_finishes_the_step_saves_and_exits_75(workdir, tiny_policy_dir, signum):
    run = workdir / "run"
    process = start_cli_run(workdir, tiny_policy_dir)
    wait_for_steps(process, run / "metrics.jsonl", 1)
    process.send_signal(signum)
    _, err = process.communicate(timeout=180)
    assert process.returncode == 75, err[-2000:]
    assert f"stopped by {signum.name}" in err and f"--resume {run}" in err and "Traceback" not in err
    logged = steps_of(run / "metrics.jsonl")
    assert latest_checkpoint(run).name == f"step-{logged[-1]:06d}"  # the step in flight was finished and saved
    assert verify(latest_checkpoint(run)) is None
    assert not (run / "final").exists()


def test_a_second_signal_aborts_without_saving(workdir, tiny_policy_dir):
    run = workdir / "run"
    process = start_cli_run(workdir, tiny_policy_dir)
    wait_for_steps(process, run / "metrics.jsonl", 1)
    process.send_signal(signal.SIGTERM)
    time.sleep(0.2)  # inside the next step: the reward function sleeps a second
    process.send_signal(signal.SIGTERM)
    _, err = process.communicate(timeout=180)
    assert process.returncode == 130, err[-2000:]
    assert "interrupted" in err
    assert latest_checkpoint(run) is None


def test_resume_cuts_the_logs_back_to_the_checkpoint(workdir, tiny_policy_dir):
    """A run killed after logging step 3 but before saving it: the resumed run logs step 3
    again, so the rows the checkpoint does not hold are dropped first (every step once)."""
    cfg = small(workdir, tiny_policy_dir, train__steps=3, train__save_every=2, train__keep_checkpoints=5)
    PPOTrainer(cfg).train()
    run = workdir / "run"
    shutil.rmtree(run / "checkpoints" / "step-000003")  # killed before this save
    with open(run / "metrics.jsonl", "a") as f:
        f.write('{"step": 4, "reward/sc')  # and a line cut off mid-write
    PPOTrainer.resume(run, ["train.steps=4"]).train()
    assert steps_of(run / "metrics.jsonl") == [1, 2, 3, 4]
    samples = steps_of(run / "samples.jsonl")
    assert samples == sorted(samples) and set(samples) == {1, 2, 3, 4}


def test_a_resumed_linear_schedule_runs_on_as_a_straight_run_of_the_new_length(workdir, tiny_policy_dir):
    """Two steps of a 2-step linear decay end at rate 0; resumed with train.steps=4, step 3
    must learn at the rate a straight 4-step run gives it (lr x (1 - 2/4)), for the policy and
    the critic, not at the restored optimiser's 0; the logged rates then follow the straight run's."""
    changes = dict(ppo__lr_schedule="linear", ppo__lr=1e-3, ppo__critic_lr=3e-3)
    PPOTrainer(small(workdir, tiny_policy_dir, "straight", train__steps=4, **changes)).train()
    PPOTrainer(small(workdir, tiny_policy_dir, "short", train__steps=2, **changes)).train()
    trainer = PPOTrainer.resume(workdir / "short", ["train.steps=4"])
    rates = {name: opt.param_groups[0]["lr"] for name, opt in trainer.updater.optimizers.items()}
    assert rates == {"policy": pytest.approx(1e-3 * 0.5), "critic": pytest.approx(3e-3 * 0.5)}
    trainer.train()
    straight = {r["step"]: r["lr"] for r in rows(workdir / "straight" / "metrics.jsonl")}
    assert rates["policy"] == straight[2]  # the rate step 3 of the straight run used
    assert {r["step"]: r["lr"] for r in rows(workdir / "short" / "metrics.jsonl")} == {**straight, 1: 1e-3 * 0.5, 2: 0.0}


# ------------------------------------------------------------------------------------------
# 3. A run directory belongs to one run
# ------------------------------------------------------------------------------------------


def test_a_second_live_run_is_refused_naming_the_first(workdir, tiny_policy_dir):
    run = workdir / "run"
    holder = subprocess.Popen(
        [sys.executable, "-c", f"from rlhf.rundir import RunLock; lock = RunLock({str(run)!r}); print('locked', flush=True); "
                               "import time; time.sleep(600)"],
        env={**os.environ, "PYTHONPATH": str(ROOT)}, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(RunDirectoryError, match=f"another run \\(pid {holder.pid}\\) is using this directory"):
            PPOTrainer(small(workdir, tiny_policy_dir))
    finally:
        holder.kill()
        holder.wait()
    PPOTrainer(small(workdir, tiny_policy_dir)).train()  # a dead run's lock is gone with its process


def test_a_new_run_refuses_a_directory_holding_a_run(workdir, tiny_policy_dir):
    run = workdir / "run"
    PPOTrainer(small(workdir, tiny_policy_dir, train__steps=2)).train()
    (run / "notes.txt").write_text("mine")
    with pytest.raises(RunDirectoryError, match=r"already holds a run \(config.yaml, metrics.jsonl.*--resume.*--overwrite"):
        PPOTrainer(small(workdir, tiny_policy_dir))
    assert steps_of(run / "metrics.jsonl") == [1, 2]
    PPOTrainer(small(workdir, tiny_policy_dir), overwrite=True).train()
    assert steps_of(run / "metrics.jsonl") == [1]
    assert [s for s, _ in checkpoints(run / "checkpoints")] == [1]
    assert (run / "notes.txt").read_text() == "mine"  # only the run's own files are replaced


def test_cli_refuses_a_used_directory_with_one_line(workdir, tiny_policy_dir, capsys):
    from rlhf.cli import main

    PPOTrainer(small(workdir, tiny_policy_dir)).train()
    (workdir / "c.yaml").write_text(f"model: {{policy: {tiny_policy_dir}}}\nreward: {{function: ops_rewards:share_of_a}}\n"
                                    f"data: {{prompts: prompts.txt}}\ntrain: {{out_dir: {workdir / 'run'}}}\n")
    assert main(["ppo", str(workdir / "c.yaml")]) == 2
    err = capsys.readouterr().err
    last = err.strip().splitlines()[-1]
    assert last.startswith("rlhf ppo: error: ") and "already holds a run" in last and "Traceback" not in err
    # Settings after a flag are overrides as well as before it.
    assert main(["ppo", str(workdir / "c.yaml"), "--overwrite", "train.steps=1", "rollout.batch_size=2",
                 "rollout.max_new_tokens=4", "train.progress=false", "train.report=false"]) == 0
    assert steps_of(workdir / "run" / "metrics.jsonl") == [1]
    assert main(["ppo", "--resume", str(workdir / "run"), "--overwrite", "train.steps=2"]) == 2
    assert "takes overrides only" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["ppo", str(workdir / "c.yaml"), "--overwrite", "--bogus"])


# ------------------------------------------------------------------------------------------
# 4. Resume trusts only what it can honour and what verifies
# ------------------------------------------------------------------------------------------


@pytest.fixture
def two_checkpoints(workdir, tiny_policy_dir):
    PPOTrainer(small(workdir, tiny_policy_dir, train__steps=2, train__save_every=1)).train()
    return workdir / "run"


def test_resume_refuses_overrides_it_cannot_honour_and_keeps_config_yaml(two_checkpoints):
    run = two_checkpoints
    before = (run / "config.yaml").read_bytes()
    with pytest.raises(CheckpointError, match=r"model\.lora, ppo\.lr cannot change when a run resumes"):
        PPOTrainer.resume(run, ["ppo.lr=0.5", "model.lora=true", "train.steps=3"])
    with pytest.raises(ConfigError, match=r"train\.keep_checkpoints: expected a positive integer"):
        PPOTrainer.resume(run, ["train.keep_checkpoints=0"])
    with pytest.raises(CheckpointError, match=r"train\.seed"):
        PPOTrainer.resume(run, ["train.seed=7"])
    assert (run / "config.yaml").read_bytes() == before
    # A switch of speed that keeps the maths may change.
    trainer = PPOTrainer.resume(run, ["train.steps=3", "train.log_samples_every=2", "rollout.share_prompt_prefix=false"])
    trainer.train()
    assert trainer.step == 3
    saved = load_config(Config, run / "config.yaml")  # recorded once it took effect
    assert saved.train.steps == 3 and saved.rollout.share_prompt_prefix is False


def test_resuming_a_finished_run_says_there_is_nothing_to_train(two_checkpoints, caplog):
    with caplog.at_level(logging.WARNING, logger="rlhf"):
        PPOTrainer.resume(two_checkpoints).train()  # the loop ends at once, releasing the run's lock
    assert f"{two_checkpoints} is already at step 2 of 2: nothing to train" in caplog.text
    assert "train.steps=N" in caplog.text
    assert steps_of(two_checkpoints / "metrics.jsonl") == [1, 2]
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="rlhf"):
        PPOTrainer.resume(two_checkpoints, ["train.steps=3"])
    assert "nothing to train" not in caplog.text


@pytest.mark.parametrize("damage", ["flip_weights", "truncate_random_states", "drop_file"])
def test_a_damaged_newest_checkpoint_falls_back_to_the_one_before(two_checkpoints, damage, caplog):
    run = two_checkpoints
    newest = run / "checkpoints" / "step-000002"
    if damage == "flip_weights":
        path = newest / "model.safetensors"
        data = bytearray(path.read_bytes())
        data[-10] ^= 0xFF
        path.write_bytes(bytes(data))
    elif damage == "truncate_random_states":
        path = newest / "random_states_0.pkl"
        path.write_bytes(path.read_bytes()[:40])
    else:
        (newest / "optimizer.bin").unlink()
    with caplog.at_level(logging.WARNING, logger="rlhf"):
        trainer = PPOTrainer.resume(run, ["train.steps=3"])
    assert trainer.step == 1
    assert "step-000002 is not usable" in caplog.text
    trainer.train()
    assert steps_of(run / "metrics.jsonl") == [1, 2, 3]


def test_a_truncated_random_state_file_is_an_error_when_no_checkpoint_is_left(two_checkpoints):
    run = two_checkpoints
    for _, directory in checkpoints(run / "checkpoints"):
        path = directory / "random_states_0.pkl"
        path.write_bytes(path.read_bytes()[:40])
    with pytest.raises(CheckpointError, match=r"no usable checkpoint .*step-000002: random_states_0.pkl has \d+ bytes"):
        PPOTrainer.resume(run, ["train.steps=3"])


@pytest.mark.parametrize("key", ["schedules", "monitor"])
def test_a_trainer_state_from_an_older_version_is_one_line_naming_what_it_lacks(two_checkpoints, key):
    from rlhf.checkpoint import STATE_JSON

    newest = two_checkpoints / "checkpoints" / "step-000002"
    state = json.loads((newest / STATE_JSON).read_text())
    del state[key]
    (newest / STATE_JSON).write_text(json.dumps(state))
    _update_manifest(newest)
    with pytest.raises(CheckpointError, match=rf"step-000002: its trainer state .* has no '{key}': it was written "
                                              r"by an older version of rlhf"):
        PPOTrainer.resume(two_checkpoints, ["train.steps=3"])
    assert (two_checkpoints / "checkpoints" / "step-000002" / STATE_JSON).is_file()  # nothing removed


class _Payload:
    """What a malicious pickle holds: unpickling it creates a file (in a real attack, runs a
    shell command)."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def _update_manifest(directory: Path) -> None:
    """An attacker who can write the run directory can rewrite the manifest too."""
    from rlhf.checkpoint import write_manifest

    (directory / "manifest.json").unlink()
    write_manifest(directory, 2)


@pytest.mark.parametrize("planted", ["custom_checkpoint_0.pkl", "random_states_0.pkl", "optimizer.bin"])
@pytest.mark.parametrize("manifest", ["as_written", "rewritten"])
def test_a_planted_pickle_is_never_executed(two_checkpoints, planted, manifest):
    run = two_checkpoints
    marker = run.parent / "pwned"
    newest = run / "checkpoints" / "step-000002"
    older = run / "checkpoints" / "step-000001"
    for directory in (newest, older):
        (directory / planted).write_bytes(pickle.dumps(_Payload(marker)))
        if manifest == "rewritten":
            _update_manifest(directory)
    with pytest.raises(CheckpointError):
        PPOTrainer.resume(run, ["train.steps=3"])
    assert not marker.exists()


# ------------------------------------------------------------------------------------------
# 5. A full disk is named, and the partial checkpoint removed
# ------------------------------------------------------------------------------------------


def _tree_size(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def test_a_full_disk_is_named_and_the_partial_checkpoint_removed(workdir, tiny_policy_dir):
    """A tmpfs with room for the run and one checkpoint: the second save fills it."""
    PPOTrainer(small(workdir, tiny_policy_dir, "measure", train__steps=1)).train()
    one = _tree_size(workdir / "measure" / "checkpoints")
    mount = workdir / "small_disk"
    mount.mkdir()
    size = _tree_size(workdir / "measure") - _tree_size(workdir / "measure" / "final") + one // 2 + 64 * 1024
    if subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(mount)],
                      capture_output=True).returncode != 0:
        pytest.skip("mounting a tmpfs needs root")
    try:
        from rlhf.rundir import WriteError

        cfg = small(workdir, tiny_policy_dir, train__steps=3, train__save_every=1, train__keep_checkpoints=3)
        cfg.train.out_dir = str(mount / "run")
        with pytest.raises(WriteError, match=r"step-000002: the disk is full .*step-000001 is intact") as info:
            PPOTrainer(cfg).train()
        assert "\n" not in str(info.value), str(info.value)
        root = mount / "run" / "checkpoints"
        assert not list(root.glob(".tmp-*"))
        assert [s for s, _ in checkpoints(root)] == [1] and verify(root / "step-000001") is None
        assert shutil.disk_usage(mount).free > one // 4  # the partial files' space is free again
    finally:
        subprocess.run(["umount", str(mount)], check=True)


def test_another_write_failure_is_one_line_and_leaves_no_partial_checkpoint(workdir, tiny_policy_dir):
    """A file-size limit (RLIMIT_FSIZE; Python ignores SIGXFSZ, so the write fails with
    EFBIG) stops the first checkpoint's weights half-way: one line naming the path and the
    cause, exit status 2, no temporary directory left."""
    import resource

    (workdir / "c.yaml").write_text(textwrap.dedent(f"""\
        model: {{policy: {tiny_policy_dir}}}
        reward: {{function: ops_rewards:share_of_a}}
        data: {{prompts: {workdir / 'prompts.txt'}, chat_template: false}}
        rollout: {{batch_size: 2, max_new_tokens: 4}}
        train: {{steps: 1, out_dir: {workdir / 'run'}, progress: false, report: false, threads: 1}}
        """))
    limit = 64 * 1024  # below the tiny models' weights, above every log line
    process = subprocess.run(
        [sys.executable, "-m", "rlhf", "ppo", str(workdir / "c.yaml")], cwd=workdir, capture_output=True, text=True,
        env={**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{workdir}"}, timeout=300,
        preexec_fn=lambda: resource.setrlimit(resource.RLIMIT_FSIZE, (limit, resource.RLIM_INFINITY)))
    assert process.returncode == 2, process.stderr[-2000:]
    last = process.stderr.strip().splitlines()[-1]
    assert last.startswith("rlhf ppo: error: ") and "step-000001: writing failed (" in last, last
    assert "Traceback" not in process.stderr
    assert not list((workdir / "run" / "checkpoints").glob(".tmp-*")) and latest_checkpoint(workdir / "run") is None


# ------------------------------------------------------------------------------------------
# 6. Values that do damage are refused at load, by field
# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("override", [
    "ppo.minibatch_size=-2", "ppo.max_grad_norm=-1", "train.keep_checkpoints=0", "train.save_every=-1",
    "ppo.critic_lr=-1", "rollout.top_k=-5", "ppo.clip_eps_high=-3", "ppo.lr=.nan", "ppo.kl_coef=.inf",
    "ppo.adam_eps=0", "model.lora_r=0", "model.lora_dropout=1.0", "reward.batch_size=0", "reward.clip=-1",
    "eval.num_prompts=0", "train.seed=-1", "train.threads=0", "ppo.clip_eps=1.5", "diagnostics.cooldown=-1",
    "ppo.kl_horizon=0", "reward.max_length=0",
])
def test_damaging_values_are_refused_naming_the_field(override):
    name = override.split("=")[0]
    with pytest.raises(ConfigError, match=rf"^{name}: expected "):
        load_config(Config, None, [override])


def test_every_numeric_field_has_a_range():
    import dataclasses
    import typing

    from rlhf.config import RANGES

    numeric = []
    for section, section_type in typing.get_type_hints(Config).items():
        hints = typing.get_type_hints(section_type)
        for f in dataclasses.fields(section_type):
            args = typing.get_args(hints[f.name]) or (hints[f.name],)
            if any(a in (int, float) for a in args):
                numeric.append(f"{section}.{f.name}")
    assert sorted(set(numeric) - set(RANGES)) == []
    load_config(Config, None, [])  # the defaults are in range


# ------------------------------------------------------------------------------------------
# 7. Bad inputs: one line naming the file, line, field or response
# ------------------------------------------------------------------------------------------


def test_prompts_that_are_not_utf8_or_have_unknown_roles(tmp_path):
    from rlhf.data import DataError, load_prompts

    (tmp_path / "p.txt").write_bytes(b"fine\nna\xefve \xff\n")
    with pytest.raises(DataError, match=r"p\.txt line 2: not UTF-8"):
        load_prompts(tmp_path / "p.txt")
    for role, shown in (("wizard", "'wizard'"), (3, "3")):
        (tmp_path / "c.jsonl").write_text(json.dumps({"messages": [{"role": "user", "content": "hi"},
                                                                   {"role": role, "content": "x"}]}) + "\n")
        with pytest.raises(DataError, match=rf"c\.jsonl line 1: messages\[1\]\.role: expected one of system, "
                                            rf"developer, user, assistant, tool, ipython, got {shown}"):
            load_prompts(tmp_path / "c.jsonl")


@pytest.mark.parametrize("returned,message", [
    (["1.5", "2"], r"response 0: expected a real number, got str '1.5'"),
    ([True, False], r"response 0: expected a real number, got bool True"),
    ({"a": 1.0, "b": 2.0}, r"expected a list of numbers \(one per response\), got dict"),
    (torch.ones(2, 1), r"expected one real number per response, got a 2-D Tensor"),
    ((x for x in (1.0, 2.0)), r"got generator"),
    ([1.0, [2.0]], r"response 1: expected a real number, got list"),
])
def test_reward_functions_must_return_real_numbers(returned, message):
    from rlhf.rewards import RewardError, call_text_function

    with pytest.raises(RewardError, match=message):
        call_text_function(lambda p, r: returned, ["p", "q"], ["a", "b"], "reward.function")


def test_reward_functions_may_return_numpy_and_tensors():
    import numpy as np

    from rlhf.rewards import call_text_function

    for returned in ([1, 2.5], (np.float32(1), np.int64(2)), [torch.tensor(1.0), torch.tensor(2)], np.array([1.0, 2.0]),
                     torch.tensor([1, 2])):
        out = call_text_function(lambda p, r: returned, ["p", "q"], ["a", "b"], "reward.function")
        assert out.dtype == torch.float32 and out.shape == (2,)


def test_a_model_directory_whose_config_is_not_json(tmp_path):
    from rlhf.models import ModelError, resolve_model

    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(ModelError, match=r"model\.policy: .*config\.json is not valid JSON"):
        resolve_model(str(tmp_path), field="model.policy")


def test_prompt_plus_new_tokens_beyond_learned_positions(workdir, tiny_policy_dir):
    from tiny import tiny_tokenizer
    from transformers import GPT2Config, GPT2LMHeadModel

    gpt2 = workdir / "gpt2"
    tokenizer = tiny_tokenizer(gpt2)
    GPT2LMHeadModel(GPT2Config(vocab_size=len(tokenizer), n_positions=16, n_embd=16, n_layer=1, n_head=2,
                               eos_token_id=tokenizer.eos_token_id)).save_pretrained(gpt2)
    cfg = small(workdir, gpt2, rollout__max_new_tokens=8)  # "once upon a time" is 16 byte tokens
    with pytest.raises(ConfigError, match=r"rollout\.max_new_tokens: the longest prompt \(16 tokens\) plus 8 new "
                                          r"tokens exceeds the policy's 16 positions"):
        PPOTrainer(cfg)


def test_yaml_errors_name_the_file_and_bench_names_a_missing_config(tmp_path, capsys):
    from rlhf.cli import main

    (tmp_path / "bad.yaml").write_text("ppo:\n  lr: [1e-5\n")
    with pytest.raises(ConfigError, match=rf"config file {tmp_path / 'bad.yaml'} line \d+ column \d+: not valid YAML"):
        load_config(Config, tmp_path / "bad.yaml")
    assert main(["bench", str(tmp_path / "missing.yaml")]) == 2
    err = capsys.readouterr().err
    assert "missing.yaml: not found" in err and "Traceback" not in err


# ------------------------------------------------------------------------------------------
# 8. Architectures: a separate critic where transformers has no token classifier; Falcon
# ------------------------------------------------------------------------------------------

_BASE = dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=2,
             max_position_embeddings=64)
ARCHITECTURES = {
    "opt": ("OPTConfig", "OPTForCausalLM", dict(hidden_size=16, ffn_dim=32, num_hidden_layers=1, num_attention_heads=2,
                                                 word_embed_proj_dim=16, max_position_embeddings=64)),
    "olmo2": ("Olmo2Config", "Olmo2ForCausalLM", _BASE),
    "granite": ("GraniteConfig", "GraniteForCausalLM", _BASE),
    "olmoe": ("OlmoeConfig", "OlmoeForCausalLM", dict(_BASE, num_experts=4, num_experts_per_tok=2)),
    "gemma3": ("Gemma3TextConfig", "Gemma3ForCausalLM", dict(_BASE, head_dim=8, sliding_window=16)),
    "falcon": ("FalconConfig", "FalconForCausalLM", dict(hidden_size=16, num_hidden_layers=1, num_attention_heads=2)),
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM", _BASE),
    "qwen3": ("Qwen3Config", "Qwen3ForCausalLM", dict(_BASE, head_dim=8)),
    "mistral": ("MistralConfig", "MistralForCausalLM", _BASE),
    "gemma": ("GemmaConfig", "GemmaForCausalLM", dict(_BASE, head_dim=8)),
    "gemma2": ("Gemma2Config", "Gemma2ForCausalLM", dict(_BASE, head_dim=8, sliding_window=16)),
    "phi3": ("Phi3Config", "Phi3ForCausalLM", _BASE),
    "gpt2": ("GPT2Config", "GPT2LMHeadModel", dict(n_embd=16, n_layer=1, n_head=2, n_positions=64)),
    "gpt_neox": ("GPTNeoXConfig", "GPTNeoXForCausalLM", dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                                             num_attention_heads=2, max_position_embeddings=64)),
    "stablelm": ("StableLmConfig", "StableLmForCausalLM", _BASE),
    "bloom": ("BloomConfig", "BloomForCausalLM", dict(hidden_size=16, n_layer=1, n_head=2)),
    "qwen2_moe": ("Qwen2MoeConfig", "Qwen2MoeForCausalLM", dict(_BASE, num_experts=4, num_experts_per_tok=2,
                                                                moe_intermediate_size=16,
                                                                shared_expert_intermediate_size=16)),
    "mixtral": ("MixtralConfig", "MixtralForCausalLM", dict(_BASE, num_local_experts=4, num_experts_per_tok=2)),
}
"""Tiny causal LMs of every family tried (Llama is the suite's own); the first five have no
token-classification class in transformers."""


@pytest.mark.parametrize("arch", list(ARCHITECTURES))
def test_a_separate_critic_trains_on_every_architecture(workdir, arch):
    """Full fine-tuning with a separate critic trains on each. OPT, OLMo 2, Granite, OLMoE and
    Gemma 3 have no token-classification class: their critic is the base model plus a value
    head, saved as a base-model directory and value_head.safetensors. Falcon adds to its MLP
    output in place, which the oneDNN linear layers of fp32 full fine-tuning allow."""
    import transformers
    from safetensors.torch import load_file
    from tiny import tiny_tokenizer

    from rlhf.models import TrunkValueModel

    config_cls, model_cls, sizes = ARCHITECTURES[arch]
    policy_dir = workdir / arch
    tok = tiny_tokenizer(policy_dir)
    torch.manual_seed(0)
    config = getattr(transformers, config_cls)(vocab_size=len(tok), pad_token_id=tok.pad_token_id,
                                               eos_token_id=tok.eos_token_id, bos_token_id=tok.bos_token_id, **sizes)
    getattr(transformers, model_cls)(config).save_pretrained(policy_dir)
    trainer = PPOTrainer(small(workdir, policy_dir, model__critic="policy", train__steps=2, ppo__lr=1e-3))
    start = {k: v.clone() for k, v in trainer.models.unwrapped_policy().state_dict().items()}
    trainer.train()
    moved = trainer.models.unwrapped_policy().state_dict()
    assert any(not torch.equal(start[k], moved[k]) for k in start)
    final = workdir / "run" / "final" / "critic"
    critic = trainer.accelerator.unwrap_model(trainer.critic)
    if arch not in ("opt", "olmo2", "granite", "olmoe", "gemma3"):
        assert transformers.AutoModelForTokenClassification.from_pretrained(final).config.num_labels == 1
        return
    assert isinstance(critic, TrunkValueModel)
    assert critic.score.weight.abs().sum() > 0  # the zero head learned
    torch.testing.assert_close(load_file(str(final / "value_head.safetensors"))["weight"], critic.score.weight)
    reloaded = TrunkValueModel.from_pretrained(final)
    ids = torch.tensor([[5, 6, 7, 8]])
    with torch.no_grad():
        torch.testing.assert_close(reloaded(ids).logits, critic(ids).logits, rtol=1e-5, atol=1e-5)


# ------------------------------------------------------------------------------------------
# Experiment tracking through Accelerate's trackers
# ------------------------------------------------------------------------------------------


def _scalars(run: Path) -> dict[str, list[tuple[int, float]]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out: dict[str, list] = {}
    for directory in sorted({events.parent for events in (run / "tracking").rglob("events.out.tfevents.*")}):
        acc = EventAccumulator(str(directory))
        acc.Reload()
        for tag in acc.Tags()["scalars"]:
            out[tag] = [(e.step, e.value) for e in acc.Scalars(tag)]
    return out


def test_tensorboard_gets_the_metrics_rows_under_their_names(workdir, tiny_policy_dir):
    pytest.importorskip("tensorboard")
    run = workdir / "run"
    PPOTrainer(small(workdir, tiny_policy_dir, train__steps=3, train__save_every=2, train__keep_checkpoints=5,
                     train__report_to=["tensorboard"])).train()
    logged = _scalars(run)
    for row in rows(run / "metrics.jsonl"):
        for key in ("reward/score_mean", "kl/ref_mean", "policy/entropy"):
            assert (row["step"], pytest.approx(row[key], rel=1e-6, abs=1e-7)) in logged[key]
    assert [s for s, _ in logged["reward/score_mean"]] == [1, 2, 3]
    # Resumed from step 2 (as if killed before saving step 3): step 3 is logged again, once.
    shutil.rmtree(run / "checkpoints" / "step-000003")
    PPOTrainer.resume(run, ["train.steps=4"]).train()
    logged = _scalars(run)
    assert [s for s, _ in logged["reward/score_mean"]] == [1, 2, 3, 4]
    assert [v for _, v in logged["reward/score_mean"]] == pytest.approx(
        [r["reward/score_mean"] for r in rows(run / "metrics.jsonl")], rel=1e-6, abs=1e-7)


def test_unknown_tracker_is_refused_at_load():
    with pytest.raises(ConfigError, match=r"train\.report_to: expected names among tensorboard, wandb.*got 'tensorbored'"):
        load_config(Config, None, ["train.report_to=[tensorbored]"])


@pytest.mark.skipif(not __import__("rlhf.onednn").onednn.available(), reason="this torch build has no oneDNN linear")
def test_bf16_lora_decoding_keeps_the_adapters_update():
    """bf16 keeps 8 bits of mantissa: decoding with W + dW merged into bf16 rounds a small
    update away and samples from (nearly) the base policy. The decoding weights keep the
    adapter apart, so decoding computes what the training forward computes."""
    from peft import LoraConfig, get_peft_model
    from tiny import tiny_llama

    from rlhf.backend import frozen_linears_to_bf16
    from rlhf.onednn import packed_for_decoding

    model = get_peft_model(tiny_llama(vocab_size=64, hidden=64, layers=2),
                           LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", task_type="CAUSAL_LM"))
    torch.manual_seed(0)
    for name, p in model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=1e-4)  # a small trained update: |dW| ~ 1e-3 |W|, below bf16 rounding
    frozen_linears_to_bf16(model)
    ids = torch.randint(0, 64, (4, 9))
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        trained = model(input_ids=ids).logits.float()
        with model.disable_adapter():
            base = model(input_ids=ids).logits.float()
        with packed_for_decoding(model, ids.numel(), torch.bfloat16):
            decoded = model(input_ids=ids).logits.float()
    update = (trained - base).abs().mean()
    assert update > 0
    assert (decoded - trained).abs().mean() < 0.25 * update


def test_a_bf16_lora_run_saves_a_float32_merged_policy(workdir, tiny_policy_dir):
    from safetensors.torch import load_file

    cfg = small(workdir, tiny_policy_dir, model__lora=True, model__lora_r=4, model__dtype="bfloat16", ppo__lr=1e-2,
                train__steps=2)
    trainer = PPOTrainer(cfg)
    trainer.train()
    merged = load_file(str(workdir / "run" / "final" / "policy" / "model.safetensors"))
    assert {t.dtype for t in merged.values()} == {torch.float32}
    policy = trainer.models.unwrapped_policy()
    layer = policy.base_model.model.model.layers[0].self_attn.q_proj
    expected = layer.base_layer.weight.float() + layer.get_delta_weight("default").float()
    torch.testing.assert_close(merged["model.layers.0.self_attn.q_proj.weight"], expected)


# ------------------------------------------------------------------------------------------
# Prompts from the formats people keep them in
# ------------------------------------------------------------------------------------------


def test_prompts_from_json_parquet_csv_and_a_named_column(tmp_path):
    import datasets

    from rlhf.data import DataError, load_prompts

    texts = ["first prompt", "second, with a comma", "third"]
    (tmp_path / "p.json").write_text(json.dumps([{"prompt": t} for t in texts]))
    datasets.Dataset.from_dict({"question": texts, "id": [1, 2, 3]}).to_parquet(str(tmp_path / "p.parquet"))
    datasets.Dataset.from_dict({"question": texts}).to_csv(str(tmp_path / "p.csv"), index=False)
    assert [p.text for p in load_prompts(tmp_path / "p.json")] == texts
    assert [p.text for p in load_prompts(tmp_path / "p.parquet", "question")] == texts
    assert [p.text for p in load_prompts(tmp_path / "p.csv", "question")] == texts
    with pytest.raises(DataError, match=r"p\.parquet row 0: expected a `prompt` or `messages` field, found \['id', 'question'\]"):
        load_prompts(tmp_path / "p.parquet")
    (tmp_path / "bad.json").write_text('[{"prompt": "a"}, "b"]')
    with pytest.raises(DataError, match=r"bad\.json item 1: expected a JSON object, got str"):
        load_prompts(tmp_path / "bad.json")


def test_chat_prompts_without_a_chat_template_are_warned_about(tmp_path, caplog):
    from tiny import tiny_tokenizer

    from rlhf.data import load_prompts, tokenize_prompts

    (tmp_path / "c.jsonl").write_text(json.dumps({"messages": [{"role": "user", "content": "hi"}]}) + "\n")
    prompts = load_prompts(tmp_path / "c.jsonl")
    tokenizer = tiny_tokenizer()
    with caplog.at_level(logging.WARNING, logger="rlhf"):
        tokenize_prompts(prompts, tokenizer, 64, chat_template=True)
    assert "no chat template" not in caplog.text
    tokenizer.chat_template = None
    with caplog.at_level(logging.WARNING, logger="rlhf"):
        tokenize_prompts(prompts, tokenizer, 64, chat_template=True, system_prompt="be brief")
    assert "chat prompts are their contents joined by newlines, without roles" in caplog.text


def test_a_run_that_failed_before_its_first_checkpoint_is_named_as_one_to_overwrite(workdir, tiny_policy_dir):
    """Nothing to resume: the refusal says to replace it, not to `--resume` (which would fail)."""
    (workdir / "broken_rewards.py").write_text("def crash(prompts, responses):\n    return 1 / 0\n")
    from rlhf.rewards import RewardError

    # The error names where in the user's code it arose.
    with pytest.raises(RewardError, match=r"raised ZeroDivisionError: division by zero \(.*broken_rewards\.py line 2, "
                                          r"in crash\)"):
        PPOTrainer(small(workdir, tiny_policy_dir, reward__function="broken_rewards:crash")).train()
    with pytest.raises(RunDirectoryError, match=r"holds a run that saved no checkpoint \(config.yaml\): nothing to "
                                                r"resume; replace it with `rlhf ppo --overwrite"):
        PPOTrainer(small(workdir, tiny_policy_dir))
    PPOTrainer(small(workdir, tiny_policy_dir), overwrite=True).train()
