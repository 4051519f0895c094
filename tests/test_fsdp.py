"""FSDP2 (`train.distributed: fsdp2`) on two CPU processes (gloo, `accelerate launch`):
the sharded update equals one unsharded process's on the same global batch, each process
holds about half the parameters and optimiser state, the final checkpoint is a plain
transformers one, and a sharded checkpoint resumes a run exactly."""

import json
import sys
from pathlib import Path

import pytest
import torch
import yaml

from test_distributed import TESTS, _config, _launch, _run, _write_inputs

WORKER = TESTS / "fsdp_worker.py"


def _fsdp_config(tmp_path: Path, policy_dir: Path, batch_size: int, name: str, distributed: str = "fsdp2",
                 **sections) -> Path:
    path = _config(tmp_path, policy_dir, batch_size, name)
    data = yaml.safe_load(path.read_text())
    data["train"]["distributed"] = distributed
    for section, values in sections.items():
        data.setdefault(section, {}).update(values)
    path.write_text(yaml.safe_dump(data))
    return path


@pytest.mark.slow
@pytest.mark.parametrize("critic", ["model", "head"])
def test_fsdp2_on_two_processes_makes_the_update_of_one_unsharded_process(tmp_path, tiny_policy_dir, critic):
    _write_inputs(tmp_path, 'r.count("a") / max(len(r), 1) + 0.1 * len(p)')
    model = {"value_head": critic == "head"}
    runs = {}
    for name, distributed, world in (("ddp1", "ddp", 1), ("fsdp1", "fsdp2", 1), ("fsdp2", "fsdp2", 2)):
        out = tmp_path / f"{name}.pt"
        config = str(_fsdp_config(tmp_path, tiny_policy_dir, 4 // world, name, distributed,
                                  model=model, train={"shard_reference": world == 2}))
        if world == 1:
            _run([sys.executable, str(WORKER), config, str(out)], tmp_path)
        else:
            _launch(tmp_path, str(WORKER), config, str(out))
        runs[name] = torch.load(out, weights_only=False)
    one, sharded = runs["ddp1"], runs["fsdp2"]
    assert (one["engine"], one["world"], sharded["engine"], sharded["world"]) == ("AccelerateEngine", 1, "FSDP2Engine", 2)

    from safetensors.torch import load_file

    initial = load_file(str(tiny_policy_dir / "model.safetensors"))
    assert max((one["policy"][k] - initial[k]).abs().max().item() for k in initial) > 1e-4  # the step moved
    for part in ("policy", "critic"):
        assert one[part].keys() == sharded[part].keys()
        for name, weight in one[part].items():
            torch.testing.assert_close(sharded[part][name], weight, rtol=0, atol=2e-6, msg=f"{part}.{name}")
            torch.testing.assert_close(runs["fsdp1"][part][name], weight, rtol=0, atol=2e-6, msg=f"{part}.{name}")
    for key in ("reward/score_mean", "kl/ref_mean", "value/explained_variance", "response/length_mean"):
        assert sharded["metrics"][key] == pytest.approx(one["metrics"][key], rel=1e-5, abs=1e-6), key
    # Generation runs on a gathered whole copy: the same sample as the unsharded policy's.
    assert torch.equal(runs["fsdp1"]["sample"], one["sample"])

    # Parameters and optimiser state per process: about half on each of two processes.
    whole = runs["fsdp1"]["bytes"][0]
    for part in ("policy", "critic"):
        halves = [held[part] for held in sharded["bytes"]]
        assert max(halves) < 0.55 * whole[part], (part, halves, whole[part])
        assert sum(halves) >= whole[part]  # nothing lost (shards pad to equal rows)

    # The final checkpoint: whole, loadable by plain transformers, equal to the trained weights.
    from transformers import AutoModelForCausalLM, AutoModelForTokenClassification

    final = tmp_path / "fsdp2" / "final"
    loaded = AutoModelForCausalLM.from_pretrained(final / "policy").state_dict()
    for name, weight in sharded["policy"].items():
        torch.testing.assert_close(loaded[name], weight, rtol=0, atol=0, msg=name)
    if critic == "model":
        loaded = AutoModelForTokenClassification.from_pretrained(final / "critic").state_dict()
    else:
        loaded = load_file(str(final / "value_head.safetensors"))
    for name, weight in sharded["critic"].items():
        torch.testing.assert_close(loaded[name], weight, rtol=0, atol=0, msg=name)


@pytest.mark.slow
def test_fsdp2_grpo_groups_make_the_update_of_one_process(tmp_path, tiny_policy_dir):
    """GRPO groups of 2 under FSDP2, shared prompt prefixes asked for: the sharded forwards
    keep the plain forward (the prompt's gradient would enter a layer through its cache,
    where FSDP2 has no hook to gather its weights), and the update equals one unsharded
    process's, with and without shared prefixes."""
    _write_inputs(tmp_path)
    group = {"rollout": {"samples_per_prompt": 2}, "ppo": {"algo": "grpo"}}
    runs = {}
    for name, distributed, world, share in (("ddp1", "ddp", 1, True), ("plain1", "ddp", 1, False),
                                            ("fsdp2", "fsdp2", 2, True)):
        out = tmp_path / f"{name}.pt"
        config = str(_fsdp_config(tmp_path, tiny_policy_dir, 4 // world, name, distributed, ppo=group["ppo"],
                                  rollout={**group["rollout"], "share_prompt_prefix": share},
                                  train={"shard_reference": world == 2}))
        if world == 1:
            _run([sys.executable, str(WORKER), config, str(out)], tmp_path)
        else:
            _launch(tmp_path, str(WORKER), config, str(out))
        runs[name] = torch.load(out, weights_only=False)
    one = runs["ddp1"]
    assert runs["fsdp2"]["engine"] == "FSDP2Engine" and list(one) and "critic" not in one
    for other in ("fsdp2", "plain1"):
        for name, weight in one["policy"].items():
            torch.testing.assert_close(runs[other]["policy"][name], weight, rtol=0, atol=2e-6, msg=f"{other} {name}")
        for key in ("reward/score_mean", "kl/ref_mean", "response/length_mean"):
            assert runs[other]["metrics"][key] == pytest.approx(one["metrics"][key], rel=1e-5, abs=1e-6), key


@pytest.mark.slow
def test_fsdp2_resumes_from_a_sharded_checkpoint_exactly(tmp_path, tiny_policy_dir):
    """2 steps, stop, `--resume` for 2 more == 4 steps straight, on two FSDP2 processes with
    real sampling (on the gathered copy, refreshed after the resume) and shuffled minibatches."""
    _write_inputs(tmp_path)

    def config(name: str, steps: int) -> Path:
        return _fsdp_config(tmp_path, tiny_policy_dir, 2, name, rollout={"max_new_tokens": 8, "early_stop": True},
                            ppo={"epochs": 2, "minibatch_size": 1},
                            train={"steps": steps, "save_every": 2, "shard_reference": True})

    _launch(tmp_path, "-m", "rlhf", "ppo", str(config("straight", 4)))
    _launch(tmp_path, "-m", "rlhf", "ppo", str(config("stopped", 2)))
    shards = sorted(p.name for p in (tmp_path / "stopped" / "checkpoints" / "step-000002" / "sharded").iterdir())
    assert len([s for s in shards if s.endswith(".distcp")]) == 2, shards  # one file per process
    _launch(tmp_path, "-m", "rlhf", "ppo", "--resume", str(tmp_path / "stopped"), "train.steps=4")

    def rows(name: str) -> list[dict]:
        lines = (tmp_path / name / "metrics.jsonl").read_text().splitlines()
        return [{k: v for k, v in json.loads(x).items() if not k.startswith(("time/", "throughput/"))} for x in lines]

    straight, resumed = rows("straight"), rows("stopped")
    assert [r["step"] for r in resumed] == [1, 2, 3, 4] == [r["step"] for r in straight]
    for a, b in zip(straight, resumed):
        for k in a:
            assert b[k] == pytest.approx(a[k], rel=1e-5, abs=1e-6), (a["step"], k)
    from safetensors.torch import load_file

    wa = load_file(str(tmp_path / "straight" / "final" / "policy" / "model.safetensors"))
    wb = load_file(str(tmp_path / "stopped" / "final" / "policy" / "model.safetensors"))
    assert wa.keys() == wb.keys()
    for k in wa:
        torch.testing.assert_close(wb[k], wa[k], rtol=1e-5, atol=1e-6)


def test_fsdp2_with_lora_is_refused_at_load(tmp_path):
    from rlhf.config import Config, ConfigError, from_dict

    with pytest.raises(ConfigError, match="train.distributed: fsdp2 with model.lora"):
        from_dict(Config, {"model": {"lora": True}, "train": {"distributed": "fsdp2"}}).validate()
    with pytest.raises(ConfigError, match="train.distributed: expected one of 'ddp', 'fsdp2'"):
        from_dict(Config, {"train": {"distributed": "zero3"}})


def test_resuming_with_the_other_engine_is_one_line(tmp_path, tiny_policy_dir):
    """A checkpoint written by one engine, read by the other: one line naming the setting."""
    _write_inputs(tmp_path)
    path = _fsdp_config(tmp_path, tiny_policy_dir, 2, "run", distributed="ddp", train={"steps": 1})
    _run([sys.executable, "-m", "rlhf", "ppo", str(path)], tmp_path)
    result = _run([sys.executable, "-m", "rlhf", "ppo", "--resume", str(tmp_path / "run"), "train.steps=2",
                   "train.distributed=fsdp2"], tmp_path, check=False)
    assert result.returncode != 0
    assert "error: --resume: " in result.stderr and "was written with train.distributed=ddp" in result.stderr, \
        result.stderr[-2000:]
    assert "Traceback" not in result.stderr
