"""One run per output folder: a lock file that a second run into the same `output_dir` stops at.

Two runs writing one folder overwrite each other's checkpoints and final model without a word, and a resume may
then pick up the other run's checkpoint. The first process of a run (rank 0; the others write where it says)
creates `LOCK_NAME` in `output_dir` atomically, holding its host, PID, process start time and the time it
started; it removes the file when the process exits. A second run finds the file and stops with one line naming
the first. A lock left by a process that no longer exists on this host (killed with -9, a crashed machine
rebooted) is taken over with a warning; a lock of another host cannot be checked from here, so it stops the run and
says how to clear it.
"""

import atexit
import json
import logging
import os
import socket
import time
from pathlib import Path

from cli import UserError

logger = logging.getLogger(__name__)

LOCK_NAME = ".run.lock"
# A lock file that stays empty this long was created by a run that died before writing who it is.
EMPTY_LOCK_STALE_S = 10.0


def _process_start(pid: int) -> str | None:
    """When `pid` started, in clock ticks after boot (Linux /proc); None where that cannot be read. A PID that a
    later process reuses has another start time."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return stat.rsplit(")", 1)[1].split()[19]  # field 22, counted after the command name


def _is_running(pid, start: str | None) -> bool:
    # A lock without a usable PID is no run's: os.kill(-1, 0) would ask about every process.
    if not isinstance(pid, int) or pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process: it exists
        return True
    return start is None or _process_start(pid) in (None, start)


def _describe(holder: dict) -> str:
    started = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(holder.get("started", 0)))
    return f"PID {holder.get('pid')} on {holder.get('host')}, started {started}"


class OutputDirLock:
    """The lock of one run on its output folder; `acquire` takes it (or stops the run), `release` gives it back."""

    def __init__(self, output_dir: str | os.PathLike):
        self.path = Path(output_dir) / LOCK_NAME
        self.me = {"host": socket.gethostname(), "pid": os.getpid(), "process_start": _process_start(os.getpid()),
                   "started": time.time()}

    def acquire(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        while not self._create():
            holder = self._holder()
            if holder is None:  # removed meanwhile, being written by a run starting at this instant, or left empty
                time.sleep(0.05)
                holder = self._holder()
            if holder is None:
                if self._age_s() > EMPTY_LOCK_STALE_S:
                    logger.warning("output_dir %s: removing an unreadable lock file left by a run that died while "
                                   "starting", self.path.parent)
                    self.path.unlink(missing_ok=True)
                continue
            if holder.get("host") != self.me["host"]:
                raise UserError(
                    f"output_dir {self.path.parent} is in use by another run ({_describe(holder)}); give another "
                    f"--output_dir, or if that run has ended, delete {self.path}"
                )
            if holder.get("pid") == self.me["pid"]:  # this process, starting a stage again
                break
            if _is_running(holder.get("pid"), holder.get("process_start")):
                raise UserError(
                    f"output_dir {self.path.parent} is in use by another run ({_describe(holder)}); wait for it to "
                    "end or give another --output_dir"
                )
            logger.warning("output_dir %s: taking over the lock of a run that is no longer running (%s)",
                           self.path.parent, _describe(holder))
            self.path.unlink(missing_ok=True)
        self._write()
        atexit.register(self.release)

    def release(self) -> None:
        """Removes the lock file if it is still this process's."""
        holder = self._holder() or {}
        if (holder.get("host"), holder.get("pid")) == (self.me["host"], self.me["pid"]):
            self.path.unlink(missing_ok=True)

    def _age_s(self) -> float:
        try:
            return time.time() - self.path.stat().st_mtime
        except OSError:
            return 0.0

    def _create(self) -> bool:
        try:
            os.close(os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644))
        except FileExistsError:
            return False
        return True

    def _write(self) -> None:
        temporary = self.path.with_name(f"{LOCK_NAME}.{os.getpid()}")
        temporary.write_text(json.dumps(self.me))
        os.replace(temporary, self.path)

    def _holder(self) -> dict | None:
        try:
            return json.loads(self.path.read_text())
        except (OSError, ValueError):
            return None


__all__ = ["LOCK_NAME", "OutputDirLock"]
