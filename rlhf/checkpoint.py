"""Checkpoints of a run: written atomically, found again for resume."""

from __future__ import annotations

import logging
import re
import shutil
from pathlib import Path

log = logging.getLogger(__name__)


class TrainerState:
    """What resume needs beyond weights, optimisers and schedules (registered with the
    engine): the step, the KL controller, the prompt stream, the health monitor and the
    minibatch-shuffling generator of every process."""

    def __init__(self, trainer):
        self.trainer = trainer

    def state_dict(self) -> dict:
        """Called on every process (the main process's copy is saved): the shared state, and
        the shuffling generator of every process, in rank order."""
        t = self.trainer
        shuffle = t.engine.gather_objects([t.shuffle_rng.get_state()])
        return {"step": t.step, "kl_ctl": t.kl_ctl.state_dict(), "prompts": t.stream.state_dict(),
                "monitor": t.monitor.state_dict(), "shuffle_rng": shuffle}

    def load_state_dict(self, state: dict) -> None:
        t = self.trainer
        t.step = state["step"]
        t.kl_ctl.load_state_dict(state["kl_ctl"])
        t.stream.load_state_dict(state["prompts"])
        t.monitor.load_state_dict(state["monitor"])
        shuffle = state["shuffle_rng"]
        if not isinstance(shuffle, list):  # checkpoints written before states were kept per process
            shuffle = [shuffle]
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


def save_checkpoint(engine, out_dir: Path, step: int, keep: int) -> Path:
    """Everything the engine holds, into checkpoints/step-N: written into a temporary
    directory and renamed when complete; only the newest `keep` are kept (0: all)."""
    root = out_dir / "checkpoints"
    target, tmp = root / f"step-{step:06d}", root / f".tmp-step-{step:06d}"
    if engine.is_main:
        root.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)
    engine.wait()
    engine.save_state(str(tmp))
    engine.wait()
    if engine.is_main:
        shutil.rmtree(target, ignore_errors=True)
        tmp.rename(target)
        for old in sorted(checkpoints(root))[: -keep or None]:
            shutil.rmtree(old[1], ignore_errors=True)
    engine.wait()
    return target


def save_final(engine, out_dir: Path, models, tokenizer, lora: bool) -> Path:
    """final/policy and final/critic (or final/value_head.safetensors, or no critic for a
    critic-free estimator), loadable by plain transformers. Plain transformers has no adapter to load: a LoRA policy is saved merged,
    with final/adapter beside it."""
    import copy

    from rlhf.models import atomic_save_pretrained

    final = out_dir / "final"
    # Every process takes part: a sharding engine gathers the whole weights.
    policy = engine.full_model(models.policy)
    critic = engine.full_model(models.critic) if models.critic is not None else None
    head = engine.full_state_dict(models.value_head) if models.value_head is not None else None
    if not engine.is_main:
        return final
    if lora:
        atomic_save_pretrained([policy], final / "adapter")
        policy = copy.deepcopy(policy).merge_and_unload()
    atomic_save_pretrained([policy, tokenizer], final / "policy")
    if critic is not None:
        atomic_save_pretrained([critic, tokenizer], final / "critic")
    elif head is not None:
        from safetensors.torch import save_file

        save_file(head, str(final / "value_head.safetensors"))
    return final
