"""Checkpoints of a run: written atomically with a manifest of sizes and checksums, verified
before loading, and read without unpickling anything that could run code.

A checkpoint is what the engine saves (weights as safetensors, optimiser and schedule states
and random states read back by `torch.load(weights_only=True)`), the trainer's own state as
JSON plus safetensors, and `manifest.json`. It is written into a temporary directory, synced
and renamed when complete; resume takes the newest checkpoint whose files match its manifest
and falls back to the one before, with a warning, when they do not.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import pickle
import re
import shutil
import traceback
from pathlib import Path

from rlhf.errors import UserInputError
from rlhf.optim import restore_schedule
from rlhf.rundir import truncate_logs, write_failure

log = logging.getLogger(__name__)

MANIFEST = "manifest.json"
STATE_JSON = "trainer_state.json"
STATE_TENSORS = "trainer_state.safetensors"


class CheckpointError(UserInputError):
    """No checkpoint that can be resumed from, and why."""


class TrainerState:
    """What resume needs beyond weights and optimisers: the step, the learning-rate
    schedules, the KL controller, the prompt stream, the health monitor and the
    minibatch-shuffling generator of every process."""

    def __init__(self, trainer):
        self.trainer = trainer

    def state_dict(self) -> dict:
        """Called on every process (the main process's copy is saved): the shared state, and
        the shuffling generator of every process, in rank order."""
        t = self.trainer
        shuffle = t.engine.gather_objects([t.shuffle_rng.get_state()])
        return {"step": t.step, "kl_ctl": t.kl_ctl.state_dict(), "prompts": t.stream.state_dict(),
                "monitor": t.monitor.state_dict(), "shuffle_rng": shuffle,
                "schedules": {name: s.state_dict() for name, s in t.updater.schedulers.items()}}

    def load_state_dict(self, state: dict) -> None:
        t = self.trainer
        t.step = state["step"]
        t.kl_ctl.load_state_dict(state["kl_ctl"])
        t.stream.load_state_dict(state["prompts"])
        t.monitor.load_state_dict(state["monitor"])
        for name, scheduler in t.updater.schedulers.items():
            restore_schedule(scheduler, state["schedules"][name])
        shuffle = state["shuffle_rng"]
        world, rank = t.engine.world, t.engine.rank
        if len(shuffle) != world and rank == 0:
            log.warning("resuming on %d processes a run checkpointed on %d: prompts are sharded and "
                        "samples drawn differently, so it continues the run but does not repeat it exactly",
                        world, len(shuffle))
        if rank < len(shuffle):
            t.shuffle_rng.set_state(shuffle[rank])


def checkpoints(root: Path) -> list[tuple[int, Path]]:
    """(step, directory) of every complete checkpoint under `root`."""
    found = []
    for d in root.glob("step-*"):
        m = re.fullmatch(r"step-(\d+)", d.name)
        if m and d.is_dir():
            found.append((int(m.group(1)), d))
    return found


def latest_checkpoint(run_dir: Path) -> Path | None:
    """The newest complete checkpoint (temporary directories of interrupted saves are ignored)."""
    found = checkpoints(Path(run_dir) / "checkpoints")
    return max(found)[1] if found else None


# What resume may change ----------------------------------------------------------------

RESUMABLE = ("train.", "eval.", "diagnostics.", "model.cache_dir", "reward.batch_size", "rollout.share_prompt_prefix")
"""Config fields (or sections) that take effect when a run resumes: how long it runs, how
it logs, evaluates and checks itself, and switches of speed that keep the maths. The rest is fixed by the checkpoint (models, the
optimiser's learning rates, the KL controller) or by the run's identity (data, seed)."""
FIXED = ("train.seed", "train.out_dir")
"""Fields under RESUMABLE that are fixed all the same."""


def resume_config(run_dir: Path, overrides: list[str], config_cls=None, resumable: tuple = RESUMABLE,
                  fixed: tuple = FIXED):
    """The config a run resumes with: its config.yaml (a `config_cls`, by default PPO's
    `Config`) plus `overrides`, refused (naming the fields) where an override could not take
    effect: only fields under `resumable`, but not those in `fixed`, may change."""
    import copy

    from rlhf.config import Config, ConfigError, apply_overrides, from_dict, read_yaml

    config_cls = config_cls or Config
    config_path = Path(run_dir) / "config.yaml"
    if not config_path.is_file():
        raise UserInputError(f"--resume {run_dir}: no config.yaml there; is it a run directory?")
    saved = read_yaml(config_path)
    saved.setdefault("train", {})["out_dir"] = str(run_dir)  # the directory may have moved
    try:
        cfg = from_dict(config_cls, apply_overrides(copy.deepcopy(saved), overrides))
    except ConfigError:
        _refuse_another_commands_run(run_dir, saved, config_cls)
        raise
    refuse_fixed_changes(from_dict(config_cls, saved), cfg, resumable, fixed)
    return cfg


def _refuse_another_commands_run(run_dir: Path, saved: dict, config_cls) -> None:
    """Where `config_cls` could not read a run's config: if another command's config can, name
    that command (instead of the first key this one does not know)."""
    from rlhf.config import Config, ConfigError, from_dict
    from rlhf.dpo import DPOConfig
    from rlhf.sft import SFTConfig

    for command, other in (("ppo", Config), ("sft", SFTConfig), ("dpo", DPOConfig)):
        if other is config_cls:
            continue
        try:
            from_dict(other, saved)
        except ConfigError:
            continue
        raise UserInputError(f"--resume {run_dir}: this is a run of `rlhf {command}`; continue it with "
                             f"`rlhf {command} --resume {run_dir}`")


def refuse_fixed_changes(saved, wanted, resumable: tuple = RESUMABLE, fixed: tuple = FIXED) -> None:
    """Raise naming every override that a resumed run could not honour (the run's config
    would claim a value its checkpoint does not have); log the ones that take effect."""
    import dataclasses

    from rlhf.config import flat_keys

    before, after = flat_keys(dataclasses.asdict(saved)), flat_keys(dataclasses.asdict(wanted))
    changed = [k for k in after if before.get(k) != after[k]]
    refused = [k for k in changed if k in fixed or not k.startswith(resumable)]
    if refused:
        allowed = ", ".join(f"{r}*" if r.endswith(".") else r for r in resumable)
        raise CheckpointError(
            f"--resume: {', '.join(refused)} cannot change when a run resumes (fixed by its checkpoint or its "
            f"identity); only {allowed} can, but not {', '.join(fixed)}; start a new run for the others")
    for key in changed:
        log.info("resume: %s = %r (was %r)", key, after[key], before.get(key))


def restore_run(trainer, run_dir: Path) -> Path:
    """Load the newest checkpoint that verifies into `trainer` (built for resuming, from
    `resume_config`); only once it has loaded are the logs cut back to its step and
    config.yaml rewritten with the overrides. A failure releases the run's lock."""
    from rlhf.config import save_config

    run_dir = Path(run_dir)
    try:
        checkpoint = load_checkpoint(trainer.engine, run_dir, trainer.state)
    except BaseException:
        if trainer.run_lock is not None:
            trainer.run_lock.release()
        raise
    if trainer.engine.is_main:
        truncate_logs(run_dir, trainer.step)
        save_config(trainer.cfg, run_dir / "config.yaml")
    log.info("resumed from %s at step %d", checkpoint, trainer.step)
    total = getattr(trainer, "total_steps", None) or trainer.cfg.train.steps
    if trainer.step >= total and trainer.engine.is_main:
        log.warning("%s is already at step %d of %d: nothing to train (its last checkpoint, final save and report "
                    "are written again); pass train.steps=N to train on", run_dir, trainer.step, total)
    return checkpoint


# Writing ------------------------------------------------------------------------------


def save_checkpoint(engine, out_dir: Path, step: int, keep: int, trainer_state: dict) -> Path:
    """Everything the engine holds and `trainer_state` (`TrainerState.state_dict()`, taken on
    every process), into checkpoints/step-N: written into a temporary directory, given its
    manifest, synced to disk and renamed when complete; only the newest `keep` are kept.
    A failed write (a full disk) removes the temporary directory and raises one line."""
    root = out_dir / "checkpoints"
    target, tmp = root / f"step-{step:06d}", root / f".tmp-step-{step:06d}"
    if engine.is_main:
        root.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)
    engine.wait()
    try:
        engine.save_state(str(tmp))
        if engine.is_main:
            write_trainer_state(tmp, trainer_state)
        engine.wait()
        if engine.is_main:
            write_manifest(tmp, step)
            sync_tree(tmp)
    except Exception as e:
        if engine.is_main:
            error = write_failure(target, e, previous=latest_checkpoint(out_dir))
            # The failed writer's open file lives on in the traceback's frames: the space of a
            # removed file is freed only once it is closed.
            chained = e
            while chained is not None:
                traceback.clear_frames(chained.__traceback__)
                chained = chained.__cause__ or chained.__context__
            shutil.rmtree(tmp, ignore_errors=True)
            if error is not None:
                raise error from None
        raise
    engine.wait()
    if engine.is_main:
        shutil.rmtree(target, ignore_errors=True)
        tmp.rename(target)
        sync_tree(root, files=False)
        for old in sorted(checkpoints(root))[:-keep]:
            shutil.rmtree(old[1], ignore_errors=True)
    engine.wait()
    return target


def write_trainer_state(directory: Path, state: dict) -> None:
    """The shuffling generators' states (`shuffle_rng`, if the trainer has them) as
    safetensors, everything else as JSON."""
    from safetensors.torch import save_file

    state = dict(state)
    generators = state.pop("shuffle_rng", None)
    (Path(directory) / STATE_JSON).write_text(json.dumps(state))
    if generators is not None:
        save_file({f"shuffle_rng.{i}": g for i, g in enumerate(generators)}, str(Path(directory) / STATE_TENSORS))


def read_trainer_state(directory: Path) -> dict:
    from safetensors.torch import load_file

    state = json.loads((Path(directory) / STATE_JSON).read_text())
    if (Path(directory) / STATE_TENSORS).is_file():
        tensors = load_file(str(Path(directory) / STATE_TENSORS))
        state["shuffle_rng"] = [tensors[f"shuffle_rng.{i}"] for i in range(len(tensors))]
    return state


def _digest(path: Path) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def _files(directory: Path) -> list[str]:
    return sorted(str(p.relative_to(directory)) for p in Path(directory).rglob("*") if p.is_file())


def write_manifest(directory: Path, step: int) -> None:
    files = {name: {"size": (directory / name).stat().st_size, "sha256": _digest(directory / name)}
             for name in _files(directory)}
    (directory / MANIFEST).write_text(json.dumps({"step": step, "files": files}, indent=1))


def sync_tree(directory: Path, files: bool = True) -> None:
    """fsync every file under `directory` and the directories themselves, so that a rename
    that follows never points at data still in the page cache when the machine goes down."""
    paths = [p for p in Path(directory).rglob("*") if files or p.is_dir()] + [Path(directory)]
    for path in paths:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


# Reading ------------------------------------------------------------------------------


def verify(directory: Path, rank: int = 0) -> str | None:
    """What is wrong with a checkpoint (None: its files are exactly those of its manifest,
    with their sizes and checksums, and this process's random states read back)."""
    path = Path(directory) / MANIFEST
    if not path.is_file():
        return "no manifest.json (incomplete, or written by an earlier version whose trainer state is a pickle)"
    try:
        files = json.loads(path.read_text())["files"]
    except (ValueError, KeyError, TypeError):
        return "manifest.json is not readable"
    present = set(_files(directory)) - {MANIFEST}
    custom = sorted(name for name in present if name.startswith("custom_checkpoint"))
    if custom:  # Accelerate would unpickle these with weights_only=False: code could run
        return f"holds {', '.join(custom)}, which rlhf never writes and will not unpickle"
    extra, missing = sorted(present - set(files)), sorted(set(files) - present)
    if extra or missing:
        return f"files {'not in its manifest: ' + ', '.join(extra) if extra else 'missing: ' + ', '.join(missing)}"
    for name, expected in files.items():
        size = (Path(directory) / name).stat().st_size
        if size != expected["size"]:
            return f"{name} has {size} bytes, its manifest says {expected['size']} (truncated?)"
        if _digest(Path(directory) / name) != expected["sha256"]:
            return f"{name} does not match its checksum (corrupt)"
    return _unreadable_random_states(Path(directory), rank)


def _unreadable_random_states(directory: Path, rank: int) -> str | None:
    """Accelerate skips random states it cannot read with an info message, and the resumed
    run then samples differently: read them here first (weights_only, as Accelerate does)."""
    from accelerate.utils import load
    from accelerate.utils.constants import RNG_STATE_NAME

    if (directory / "sharded").is_dir():  # the FSDP2 engine's own files (rlhf.fsdp_engine)
        from safetensors.torch import load_file

        path = directory / f"{RNG_STATE_NAME}_{rank}.json"
        reader = lambda _: (json.loads(path.read_text()), load_file(str(path.with_suffix(".safetensors"))))
    else:
        path, reader = directory / f"{RNG_STATE_NAME}_{rank}.pkl", load
    if rank > 0 and not path.is_file():
        return None  # more processes than the run was written with: they keep their own states
    try:
        reader(path)
    except Exception as e:  # torch raises several types for a file it cannot unpickle
        return f"{path.name} is not readable ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})"
    return None


def load_checkpoint(engine, run_dir: Path, state: TrainerState) -> Path:
    """Load the newest checkpoint that verifies into the engine's models, optimisers and
    schedules and into `state`; a newer one that does not is named in a warning and skipped."""
    problems = []
    for _, directory in sorted(checkpoints(Path(run_dir) / "checkpoints"), reverse=True):
        problem = verify(directory, engine.rank)
        if problem is None:
            try:
                engine.load_state(str(directory))
            except pickle.UnpicklingError as e:
                raise CheckpointError(f"{directory}: a file holds objects that torch's safe loader (weights_only) "
                                      f"refuses, so it was not loaded: {str(e).splitlines()[0]}") from None
            try:
                state.load_state_dict(read_trainer_state(directory))
            except KeyError as e:
                raise CheckpointError(
                    f"{directory}: its trainer state ({STATE_JSON}) has no {e.args[0]!r}: it was written by an "
                    "older version of rlhf, which saved less; resume it with that version, or start a new run "
                    "from its weights") from None
            if problems:
                log.warning("resuming from %s instead of the newer %s", directory.name, "; ".join(problems))
            return directory
        problems.append(f"{directory.name}: {problem}")
        log.warning("checkpoint %s is not usable: %s; trying the one before", directory, problem)
    detail = f" ({'; '.join(problems)})" if problems else " under checkpoints/"
    raise CheckpointError(f"--resume {run_dir}: no usable checkpoint{detail}")


def save_final(engine, out_dir: Path, models, tokenizer, lora: bool) -> Path:
    """final/policy and final/critic (or final/value_head.safetensors, or no critic for a
    critic-free estimator), loadable by plain transformers. Plain transformers has no
    adapter to load: a LoRA policy is saved merged, with final/adapter beside it."""
    from rlhf.models import atomic_save_pretrained

    final = out_dir / "final"
    # Every process takes part: a sharding engine gathers the whole weights.
    policy = engine.full_model(models.policy)
    critic = engine.full_model(models.critic) if models.critic is not None else None
    head = engine.full_state_dict(models.value_head) if models.value_head is not None else None
    if not engine.is_main:
        return final
    save_policy(final, policy, tokenizer, lora)
    if critic is not None:
        atomic_save_pretrained([critic, tokenizer], final / "critic")
    elif head is not None:
        from safetensors.torch import save_file

        save_file(head, str(final / "value_head.safetensors"))
    return final


def save_policy(final: Path, policy, tokenizer, lora: bool) -> Path:
    """final/policy, a causal LM with its tokenizer that plain transformers loads (and that
    `model.policy` of any command accepts); a LoRA policy is saved merged, its adapter in
    final/adapter. Call on the main process only."""
    import copy

    from rlhf.models import atomic_save_pretrained

    if lora:
        atomic_save_pretrained([policy], final / "adapter")
        # Merged in fp32 (a bf16 run stores its frozen base in bf16, where W + dW would round
        # most of a small update away), and saved all in fp32, like the master weights.
        policy = copy.deepcopy(policy).float().merge_and_unload()
    atomic_save_pretrained([policy, tokenizer], final / "policy")
    return final / "policy"
