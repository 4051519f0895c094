"""Multi-process training: two CPU processes (gloo, started by `accelerate launch`) compute the
same PPO update as one process given the same global batch.

Each process takes its half of the global prompt batch, scores it, and contributes to the
advantage whitening, the token-mean losses and the gradient average; after one step the
weights of policy and critic must equal those of one process that saw all prompts. The
responses are fixed (tests/distributed_worker.py) so that both runs see the same
sequences; each process's own sampler is checked apart: same prompt, different samples.
"""

import json
import os
import signal
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch
import yaml

TESTS = Path(__file__).parent
WORKER = TESTS / "distributed_worker.py"
PROMPTS = ["hello there", "the sea is", "tell me", "once upon a time", "my cat", "rain falls", "one two", "why"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _config(tmp_path: Path, policy_dir: Path, batch_size: int, name: str, **ppo) -> Path:
    data = {
        "model": {"policy": str(policy_dir), "critic": "policy"},
        "reward": {"function": "dist_rewards:share_of_a"},
        "data": {"prompts": str(tmp_path / "prompts.txt"), "chat_template": False},
        "rollout": {"batch_size": batch_size, "max_new_tokens": 6, "temperature": 1.0, "early_stop": False},
        # kl_coef > 0: the reference enters the rewards; lr large enough that the step is
        # far above rounding; whitening makes the advantages depend on the whole batch.
        "ppo": {"lr": 1e-3, "kl_coef": 0.1, "epochs": 1, **ppo},
        "train": {"out_dir": str(tmp_path / name), "save_every": 0, "progress": False, "report": False,
                  "threads": 1, "seed": 3},
    }
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def _write_inputs(tmp_path: Path, score: str = 'r.count("a") / max(len(r), 1)') -> None:
    """prompts.txt, and dist_rewards.share_of_a scoring each (prompt p, response r) by `score`."""
    (tmp_path / "prompts.txt").write_text("\n".join(PROMPTS) + "\n")
    (tmp_path / "dist_rewards.py").write_text(textwrap.dedent(f'''
        def share_of_a(prompts, responses):
            return [{score} for p, r in zip(prompts, responses)]
    '''))


def _run(cmd: list[str], cwd: Path, check: bool = True, **env_vars: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(cwd), str(TESTS), os.environ.get("PYTHONPATH", "")]),
           "OMP_NUM_THREADS": "1", **env_vars}
    result = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=300)
    if check:
        assert result.returncode == 0, f"{' '.join(cmd)} failed:\n{result.stdout[-3000:]}\n{result.stderr[-5000:]}"
    return result


def _launch_command(*args: str, launcher: str = "--multi_gpu") -> list[str]:
    """`accelerate launch` of two CPU processes running `args` (a script or `-m module`, then its
    arguments). --multi_gpu is accelerate's torchrun launcher (its --cpu alone wants mpirun for
    several processes)."""
    return [str(Path(sys.executable).parent / "accelerate"), "launch", launcher, "--num_processes", "2",
            "--num_machines", "1", "--main_process_port", str(_free_port()), "--mixed_precision", "no",
            "--dynamo_backend", "no", *args]


def _launch(cwd: Path, *args: str, launcher: str = "--multi_gpu", check: bool = True) -> subprocess.CompletedProcess:
    """`_launch_command` run to its end: ACCELERATE_USE_CPU puts each process on the CPU with
    the gloo backend; HF_HOME in `cwd` keeps any user accelerate config out."""
    return _run(_launch_command(*args, launcher=launcher), cwd, check, ACCELERATE_USE_CPU="true",
                HF_HOME=str(cwd / "hf"))


@pytest.mark.slow
def test_two_processes_make_the_update_of_one_process_on_the_global_batch(tmp_path, tiny_policy_dir):
    _write_inputs(tmp_path, 'r.count("a") / max(len(r), 1) + 0.1 * len(p)')
    one, two = tmp_path / "one.pt", tmp_path / "two.pt"
    # A linear decay: each process steps its schedule once per step, as one process does.
    _run([sys.executable, str(WORKER), str(_config(tmp_path, tiny_policy_dir, 4, "one", lr_schedule="linear")), str(one)],
         tmp_path)
    _launch(tmp_path, str(WORKER), str(_config(tmp_path, tiny_policy_dir, 2, "two", lr_schedule="linear")), str(two))
    one, two = torch.load(one), torch.load(two)
    assert (one["world"], two["world"]) == (1, 2)

    from safetensors.torch import load_file

    initial = load_file(str(tiny_policy_dir / "model.safetensors"))
    moved = max((one["policy"][k] - initial[k]).abs().max().item() for k in initial)
    assert moved > 1e-4, "the step must change the weights for the comparison to mean anything"
    for part in ("policy", "critic"):
        for name, weight in one[part].items():
            torch.testing.assert_close(two[part][name], weight, rtol=0, atol=2e-6, msg=f"{part}.{name}")

    # Metrics are reduced over processes: the two-process run logs the one-process numbers,
    # and the learning rate for the next step is the one-process schedule's.
    assert one["metrics"]["lr"] == pytest.approx(1e-3 * (1 - 1 / 20))
    for key in ("lr", "reward/score_mean", "reward/raw_mean", "kl/ref_mean", "response/length_mean",
                "value/explained_variance", "response/distinct2"):
        assert two["metrics"][key] == pytest.approx(one["metrics"][key], rel=1e-5, abs=1e-6), key
    # Every process samples with its own seed: the same prompt gets different responses.
    assert not torch.equal(two["samples"][0], two["samples"][1])


@pytest.mark.slow
def test_two_processes_resume_where_they_stopped(tmp_path, tiny_policy_dir):
    """`accelerate launch -m rlhf ppo`: 2 steps, stop, `--resume` for 2 more == 4 steps
    straight, on two processes with real sampling and minibatches: every process gets back
    its own sampling and shuffling random states, and the shared prompt position."""
    _write_inputs(tmp_path)

    def launch(*args: str) -> None:
        _launch(tmp_path, "-m", "rlhf", "ppo", *args)

    def config(name: str, steps: int) -> Path:
        path = _config(tmp_path, tiny_policy_dir, 2, name)
        data = yaml.safe_load(path.read_text())
        data["rollout"].update({"max_new_tokens": 8, "early_stop": True})
        data["ppo"].update({"epochs": 2, "minibatch_size": 1})  # shuffled minibatches on each process
        data["train"].update({"steps": steps, "save_every": 2})
        path.write_text(yaml.safe_dump(data))
        return path

    launch(str(config("straight", 4)))
    launch(str(config("stopped", 2)))
    launch("--resume", str(tmp_path / "stopped"), "train.steps=4")

    def rows(name: str) -> list[dict]:
        lines = (tmp_path / name / "metrics.jsonl").read_text().splitlines()
        return [{k: v for k, v in json.loads(x).items() if not k.startswith(("time/", "throughput/"))} for x in lines]

    straight, resumed = rows("straight"), rows("stopped")
    assert [r["step"] for r in resumed] == [r["step"] for r in straight] and len(straight) == 4
    for a, b in zip(straight, resumed):
        for k in a:
            assert b[k] == pytest.approx(a[k], rel=1e-5, abs=1e-6), (a["step"], k)
    from safetensors.torch import load_file

    wa = load_file(str(tmp_path / "straight" / "final" / "policy" / "model.safetensors"))
    wb = load_file(str(tmp_path / "stopped" / "final" / "policy" / "model.safetensors"))
    for k in wa:
        torch.testing.assert_close(wb[k], wa[k], rtol=1e-5, atol=1e-6)


def test_parameter_sharding_setups_are_refused_with_one_line(tmp_path):
    """Accelerate's own FSDP, DeepSpeed and Megatron-LM wrap the models themselves: refused at
    start, naming the setting and pointing to train.distributed=fsdp2. (Accelerate builds no FSDP accelerator on a
    CPU-only machine, so the check is fed the distributed type alone; a real single-process
    Accelerator passes.)"""
    from types import SimpleNamespace

    from accelerate import Accelerator
    from accelerate.utils import DistributedType

    from rlhf.config import UserInputError
    from rlhf.ppo import check_data_parallel

    check_data_parallel(Accelerator(cpu=True))
    for kind in (DistributedType.FSDP, DistributedType.DEEPSPEED, DistributedType.MEGATRON_LM):
        with pytest.raises(UserInputError, match=f"distributed type {kind.value} is not supported.*fsdp2"):
            check_data_parallel(SimpleNamespace(distributed_type=kind))


@pytest.mark.parametrize("fsdp_args", [(), ("--fsdp_version", "2")], ids=["fsdp1", "fsdp2"])
def test_fsdp_launch_on_cpus_ends_with_one_line(tmp_path, tiny_policy_dir, fsdp_args):
    """`accelerate launch --use_fsdp` where there is no accelerator. FSDP1: Accelerate cannot
    build its state. FSDP2: Accelerate quietly sets up data parallelism while transformers loads
    every process's weights but the first on the meta device, and the run would stop deep inside
    torch. Either way the CLI says so in one line per process, without a traceback."""
    _write_inputs(tmp_path)
    result = _launch(tmp_path, *fsdp_args, "-m", "rlhf", "ppo", str(_config(tmp_path, tiny_policy_dir, 2, "fsdp")),
                     launcher="--use_fsdp", check=False)
    assert result.returncode != 0
    assert "error: accelerate config:" in result.stderr, result.stderr[-3000:]
    assert "Traceback" not in result.stderr.split("error: accelerate config:")[0]  # nothing before the line
    assert "rlhf/ppo.py" not in result.stderr  # no traceback through our code
    if fsdp_args:
        assert "FSDP was asked for" in result.stderr and "train.distributed=fsdp2" in result.stderr


def _kill_processes_running(path: Path) -> None:
    """SIGKILL every process whose command line names `path` (the launcher starts its
    processes in sessions of their own: killing the launcher leaves them running)."""
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        try:
            if str(path).encode() in cmdline.read_bytes():
                os.kill(int(cmdline.parent.name), signal.SIGKILL)
        except (OSError, ValueError):
            pass  # ended meanwhile


@pytest.mark.slow
@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGUSR1], ids=["SIGTERM", "SIGUSR1"])
def test_a_signal_to_the_launcher_stops_every_process_after_a_step_with_a_checkpoint(tmp_path, tiny_policy_dir,
                                                                                        signum):
    """What a scheduler does to `accelerate launch`: the signal goes to the launcher, whose
    torch elastic agent passes it on to the processes (SIGUSR1 only when named in
    PET_SIGNALS_TO_HANDLE, torchrun's --signals_to_handle) and exits 128 + the signal's
    number once they have ended. They finish the step, save one checkpoint and say once how to continue, which then
    runs on to the end."""
    _write_inputs(tmp_path)
    (tmp_path / "slow_rewards.py").write_text(textwrap.dedent('''
        import time

        def share_of_a(prompts, responses):
            time.sleep(1.0)  # a slow reward server: the signal arrives mid-step
            return [r.count("a") / max(len(r), 1) for r in responses]
        '''))
    path = _config(tmp_path, tiny_policy_dir, 2, "run")
    data = yaml.safe_load(path.read_text())
    data["reward"]["function"] = "slow_rewards:share_of_a"
    data["train"]["steps"] = 1000
    path.write_text(yaml.safe_dump(data))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tmp_path), str(TESTS), os.environ.get("PYTHONPATH", "")]),
           "OMP_NUM_THREADS": "1", "ACCELERATE_USE_CPU": "true", "HF_HOME": str(tmp_path / "hf"),
           "PET_SIGNALS_TO_HANDLE": "SIGTERM,SIGINT,SIGHUP,SIGQUIT,SIGUSR1"}
    process = subprocess.Popen(_launch_command("-m", "rlhf", "ppo", str(path)), cwd=tmp_path, env=env,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    run = tmp_path / "run"
    try:
        deadline = time.monotonic() + 240
        while not (run / "metrics.jsonl").exists() or not (run / "metrics.jsonl").read_text().strip():
            if process.poll() is not None or time.monotonic() > deadline:
                pytest.fail("the run logged no step")
            time.sleep(0.1)
        process.send_signal(signum)
        _, err = process.communicate(timeout=240)
    finally:  # whatever happened, no process of this run outlives the test
        _kill_processes_running(path)
        process.kill()
        process.communicate()
    assert process.returncode == 128 + signum, err[-3000:]
    assert err.count(f"rlhf ppo: stopped by {signum.name} after step") == 1, err[-3000:]
    assert f"the same launch command with -m rlhf ppo --resume {run}" in err and "Traceback" not in err

    from rlhf.checkpoint import latest_checkpoint, verify

    logged = [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert latest_checkpoint(run).name == f"step-{logged[-1]:06d}" and verify(latest_checkpoint(run)) is None
    _launch(tmp_path, "-m", "rlhf", "ppo", "--resume", str(run), f"train.steps={logged[-1] + 1}")
    resumed = [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert resumed == list(range(1, logged[-1] + 2))
