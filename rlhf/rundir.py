"""A run directory owned by one run.

A lock keeps a second live run out; a new run refuses a directory that holds another run's
files (unless asked to replace them); on resume the logs are cut back to the checkpoint's
step, so that no step appears twice.
"""

from __future__ import annotations

import errno
import fcntl
import json
import logging
import os
import shutil
from pathlib import Path

from rlhf.errors import UserInputError

log = logging.getLogger(__name__)

LOCK_FILE = "run.lock"
LOGS = ("metrics.jsonl", "alerts.jsonl", "samples.jsonl", "tokens.jsonl")
"""The per-step logs: JSON lines, each with a `step`."""
RUN_FILES = ("config.yaml", *LOGS, "checkpoints", "final", "report.html", "plots", "tracking")
"""What a run writes; `overwrite` removes exactly these."""


class RunDirectoryError(UserInputError):
    """A run directory that is in use or holds another run."""


class WriteError(UserInputError):
    """A file of the run that could not be written: the path and the cause."""


def _free_bytes(path: Path) -> int:
    path = Path(path)
    while not path.exists() and path != path.parent:
        path = path.parent
    return shutil.disk_usage(path).free


def write_failure(target: Path, error: BaseException, previous: Path | None = None,
                  partial: bool = True) -> WriteError | None:
    """The one-line error for a failed write of `target`, or None when `error` is not a write
    failure. Call it before the partial files are removed: a full disk reads as full only
    while they take the space. torch's zip writer reports a full disk as "unexpected pos"
    or "PytorchStreamWriter failed", safetensors as an I/O error: the free space decides.
    `partial`: the caller removes what it had written (said in the message)."""
    text = str(error)
    free = _free_bytes(target)
    said_full = getattr(error, "errno", None) == errno.ENOSPC or "No space left" in text
    if not (said_full or isinstance(error, OSError) or any(s in text for s in ("unexpected pos", "PytorchStreamWriter",
                                                                              "I/O error", "IoError"))):
        return None
    kept = ("; the partial files were removed" if partial else "") + (f"; {previous} is intact" if previous else "")
    if said_full or free < 64 * 1024:
        return WriteError(f"{target}: the disk is full ({free} bytes free){kept}; "
                          "free some space (or lower train.keep_checkpoints) and continue the run with --resume")
    cause = text.splitlines()[0] if text else type(error).__name__
    return WriteError(f"{target}: writing failed ({type(error).__name__}: {cause}){kept}")


class RunLock:
    """An exclusive lock on `run_dir/run.lock` (flock), holding the owner's pid. The kernel
    drops it when the process ends, however it ends, so a crashed run leaves no stale lock."""

    def __init__(self, run_dir: Path):
        self.path = Path(run_dir) / LOCK_FILE
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._file = open(self.path, "a+")
        try:
            fcntl.flock(self._file, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            self._file.seek(0)
            owner = self._file.read().strip() or "unknown"
            self._file.close()
            raise RunDirectoryError(
                f"{run_dir}: another run (pid {owner}) is using this directory; wait for it to end "
                "or choose another train.out_dir") from None
        self._file.seek(0)
        self._file.truncate()
        self._file.write(f"{os.getpid()}\n")
        self._file.flush()

    def release(self) -> None:
        if not self._file.closed:
            fcntl.flock(self._file, fcntl.LOCK_UN)
            self._file.close()


def own_run_dir(engine, run_dir: Path, overwrite: bool | None, write_config, command: str = "ppo") -> RunLock | None:
    """Lock `run_dir` (on the main process; the lock is returned) and, for a new run
    (`overwrite` not None), refuse or clear another run's files, then `write_config()`.
    `command` (`rlhf ppo`, `rlhf sft`...) is named in the ways out of a refusal.
    Every process learns of a refusal, so that none waits for the others at a collective."""
    problem, lock = None, None
    if engine.is_main:
        try:
            lock = RunLock(run_dir)
            if overwrite is not None:
                claim_for_new_run(run_dir, overwrite, command)
                write_config()
        except RunDirectoryError as e:
            if lock is not None:
                lock.release()
            problem = str(e)
    problems = [p for p in engine.gather_objects([problem]) if p]
    if problems:
        raise RunDirectoryError(problems[0])
    return lock


def claim_for_new_run(run_dir: Path, overwrite: bool, command: str = "ppo") -> None:
    """Refuse a directory that already holds a run, naming the ways out; with `overwrite`,
    remove that run's files (only those: other files in the directory are left alone)."""
    run_dir = Path(run_dir)
    found = [name for name in RUN_FILES if (run_dir / name).exists()]
    if not found:
        return
    if not overwrite:
        from rlhf.checkpoint import checkpoints  # it imports this module

        if not checkpoints(run_dir / "checkpoints"):  # e.g. a run that failed in its first steps
            raise RunDirectoryError(
                f"{run_dir} holds a run that saved no checkpoint ({', '.join(found)}): nothing to resume; replace it "
                f"with `rlhf {command} --overwrite ...` or choose another train.out_dir")
        raise RunDirectoryError(
            f"{run_dir} already holds a run ({', '.join(found)}); continue it with `rlhf {command} --resume {run_dir}`, "
            f"choose another train.out_dir, or replace it with `rlhf {command} --overwrite ...`")
    log.warning("%s: removing the previous run's %s (overwrite)", run_dir, ", ".join(found))
    for name in found:
        path = run_dir / name
        if path.is_dir():
            shutil.rmtree(path)
        else:
            path.unlink()


def append_row(path: Path, row: dict) -> None:
    """One JSON line appended to a log; a failed write (a full disk) is one line."""
    try:
        with open(path, "a") as f:
            f.write(json.dumps(row) + "\n")
    except OSError as e:
        raise write_failure(path, e, partial=False) from None


def truncate_logs(run_dir: Path, step: int) -> dict[str, int]:
    """Drop the rows after `step` from every per-step log (written by steps the checkpoint
    does not hold, which the resumed run writes again); returns the rows dropped per file.
    Each file is rewritten through a temporary file and a rename."""
    dropped = {}
    for name in LOGS:
        path = Path(run_dir) / name
        if not path.is_file():
            continue
        kept, n = [], 0
        for line in path.read_bytes().splitlines(keepends=True):
            if not line.strip():
                continue
            try:
                row_step = json.loads(line).get("step")
            except (ValueError, AttributeError):
                row_step = None  # an unreadable line (a crash mid-write) goes too
            if isinstance(row_step, int) and row_step <= step:
                kept.append(line if line.endswith(b"\n") else line + b"\n")
            else:
                n += 1
        if n:
            tmp = path.with_name(path.name + ".tmp")
            tmp.write_bytes(b"".join(kept))
            os.replace(tmp, path)
            dropped[name] = n
    if dropped:
        log.warning("resuming at step %d: dropped the later rows of %s", step,
                    ", ".join(f"{k} ({v})" for k, v in dropped.items()))
    return dropped
