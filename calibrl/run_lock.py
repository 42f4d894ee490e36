"""One trainer per run folder: ``<run>/trainer.lock`` holds the pid of the trainer that owns the folder.

Two trainers writing one folder would interleave checkpoints, prune each other's files and leave one
run's results overwritten by the other's. The lock is an exclusive ``flock`` on the lock file, held for
the trainer's lifetime: the kernel releases it when the process dies, even by SIGKILL, so a lock left
behind by a dead trainer is taken over. The file records the owner's pid and host for the message of a
refused second trainer; where ``flock`` is not available the recorded pid decides (alive: refused, dead:
taken over).
"""

from __future__ import annotations

import json
import os
import socket
from typing import Optional

from .config import ConfigError

LOCK_NAME = "trainer.lock"

try:
    import fcntl
except ImportError:  # not POSIX: the pid check alone
    fcntl = None


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, owned by someone else
        return True
    return True


def _owner(path: str) -> dict:
    try:
        with open(path, encoding="utf-8") as handle:
            return json.load(handle)
    except (OSError, ValueError):
        return {}


class RunLock:
    """The lock of one run folder; ``acquire`` raises ConfigError when another live trainer holds it."""

    def __init__(self, run_dir: str):
        self.path = os.path.join(run_dir, LOCK_NAME)
        self._fd: Optional[int] = None

    def acquire(self) -> "RunLock":
        os.makedirs(os.path.dirname(self.path) or ".", exist_ok=True)
        while True:
            fd = self._lock_once()
            if fd is not None:
                self._fd = fd
                return self

    def _lock_once(self) -> Optional[int]:
        """The locked descriptor, or None when the file was removed by its releasing owner meanwhile (retry)."""
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            if fcntl is not None:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except BlockingIOError:
                    self._refuse(_owner(self.path))
                try:
                    if os.stat(self.path).st_ino != os.fstat(fd).st_ino:
                        os.close(fd)
                        return None
                except FileNotFoundError:
                    os.close(fd)
                    return None
            else:
                owner = _owner(self.path)
                if owner.get("pid") not in (None, os.getpid()) and _pid_alive(int(owner["pid"])):
                    self._refuse(owner)
            record = json.dumps({"pid": os.getpid(), "host": socket.gethostname()}).encode()
            os.ftruncate(fd, 0)
            os.pwrite(fd, record + b"\n", 0)
        except BaseException:
            os.close(fd)
            raise
        return fd

    def _refuse(self, owner: dict) -> None:
        who = f"pid {owner.get('pid', '?')} on {owner.get('host', '?')}"
        raise ConfigError(
            f"run folder {os.path.dirname(self.path)} is in use by another trainer ({who}, lock file "
            f"{self.path}); wait for it to finish, stop it, or choose another --out"
        )

    def release(self) -> None:
        """Remove the lock file and drop the lock (idempotent)."""
        if self._fd is None:
            return
        try:
            os.remove(self.path)
        except FileNotFoundError:
            pass
        os.close(self._fd)  # closing the descriptor releases the flock
        self._fd = None

    def __del__(self):
        try:
            self.release()
        except Exception:  # interpreter shutdown: the kernel drops the lock with the process anyway
            pass
