"""What every training loop (`rlhf ppo`, `rlhf sft`, `rlhf dpo`) does around its steps: it
holds the run directory's lock while it runs, and a stop signal ends it after the current
step, with a checkpoint, instead of in the middle of one.
"""

from __future__ import annotations

import logging
import signal
from contextlib import contextmanager

from rlhf.rundir import RunLock

log = logging.getLogger(__name__)

STOP_SIGNALS = ("SIGINT", "SIGTERM", "SIGUSR1")
"""Ctrl-C; what SLURM and Kubernetes send before SIGKILL; SLURM's early warning
(`sbatch --signal=USR1@120`)."""


@contextmanager
def running(trainer):
    """Around a trainer's loop: take the run lock again if an earlier loop released it,
    catch the stop signals (`trainer.stop_signal` names the one that arrived), and on the
    way out restore the previous handlers and release the lock."""
    if trainer.run_lock is None and trainer.engine.is_main:
        trainer.run_lock = RunLock(trainer.out_dir)
    trainer.stop_signal = None
    previous = stop_after_step_on_signal(trainer)
    try:
        yield
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
        if trainer.run_lock is not None:
            trainer.run_lock.release()
            trainer.run_lock = None


def stop_agreed(trainer) -> bool:
    """True once a stop signal arrived; every process stops at the same step (a signal may
    reach some of them only)."""
    stop = trainer.stop_signal is not None
    if trainer.engine.world > 1 and trainer.engine.reduce_mean(float(stop)) > 0 and not stop:
        trainer.stop_signal, stop = "a signal to another process", True
    return stop


def stop_after_step_on_signal(trainer) -> dict:
    """Each of STOP_SIGNALS asks the loop to stop after this step and save; a second one
    aborts at once (KeyboardInterrupt). Returns the previous handlers by signal ({} off the
    main thread, where signals cannot be caught)."""
    def request_stop(signum, frame):
        if trainer.stop_signal is not None:
            raise KeyboardInterrupt
        trainer.stop_signal = signal.Signals(signum).name
        log.warning("%s: stopping after this step and saving a checkpoint (send it again to abort without saving)",
                    trainer.stop_signal)

    previous = {}
    try:
        for name in STOP_SIGNALS:
            if hasattr(signal, name):
                signum = getattr(signal, name)
                previous[signum] = signal.signal(signum, request_stop)
    except ValueError:
        pass
    return previous


def log_stopped(trainer, command: str) -> None:
    """Once, on the main process: every process stopped at the same step."""
    if not trainer.engine.is_main:
        return
    log.warning("stopped by %s after step %d; the checkpoint is saved: continue with `rlhf %s --resume %s`",
                trainer.stop_signal, trainer.step, command, trainer.out_dir)
