"""A lock file that keeps a second training process out of a run folder.

Two processes that train into the same folder overwrite each other's checkpoints and delete
them in rotation. The process that writes checkpoints (rank 0) creates ``run.lock`` with
``O_CREAT | O_EXCL``, which fails when the file exists. On NFS this works from NFSv3 and Linux
2.6 on (open(2) man page). The file contains the host name and process id of its holder as JSON.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

LOCK_NAME = "run.lock"


class RunLockedError(RuntimeError):
    """Another process holds the lock of the run folder."""


@dataclass
class RunLock:
    """A lock file created by this process.

    Attributes:
        path: The lock file.
        hostname: Host of this process, as written into the file.
        pid: Process id of this process, as written into the file.
    """

    path: Path
    hostname: str
    pid: int

    def release(self) -> None:
        """Delete the lock file, unless another process has replaced it."""
        holder = read_lock_holder(self.path)
        if holder is None:
            logger.warning("lock file %s was missing or unreadable at exit", self.path)
            return
        if holder.get("hostname") != self.hostname or holder.get("pid") != self.pid:
            logger.warning(
                "lock file %s now names %s, not this process, so it is left in place",
                self.path,
                _describe_holder(holder),
            )
            return
        self.path.unlink(missing_ok=True)


def acquire_run_lock(output_dir: Path) -> RunLock:
    """Create the run folder if needed and take its lock.

    A lock left by a process that no longer runs on this host is taken over with a warning.
    A lock held by a running process, or by any process on another host, is respected,
    because this host cannot check whether a process on another host still runs.

    Raises:
        RunLockedError: another process holds the lock, naming it and how to remove the lock.
        OSError: the folder cannot be created or written (for example, a path component is a
            file or permission is denied).
    """
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    path = output_dir / LOCK_NAME
    hostname = socket.gethostname()
    pid = os.getpid()
    content = json.dumps(
        {"hostname": hostname, "pid": pid, "started": time.strftime("%Y-%m-%d %H:%M:%S")}
    )
    # Three attempts, because a lock can vanish or be taken over between the checks.
    for _ in range(3):
        try:
            descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        except FileExistsError:
            holder = read_lock_holder(path)
            if holder is None and not path.exists():
                continue
            if holder is None or not _is_stale(holder, hostname):
                raise RunLockedError(_locked_message(path, holder, hostname)) from None
            logger.warning(
                "taking over the lock %s of %s, which no longer runs",
                path,
                _describe_holder(holder),
            )
            # NOTE: two processes that take over the same stale lock at once can both succeed,
            # because the check and the unlink are two steps.
            path.unlink(missing_ok=True)
            continue
        with os.fdopen(descriptor, "w") as handle:
            handle.write(content + "\n")
        return RunLock(path, hostname, pid)
    raise RunLockedError(
        f"could not take the lock {path}: other processes keep creating it. Check which "
        "processes train into this folder"
    )


def read_lock_holder(path: Path) -> dict[str, Any] | None:
    """Return the JSON content of a lock file, or None if it is missing or not valid JSON."""
    try:
        holder = json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return None
    return holder if isinstance(holder, dict) else None


def _is_stale(holder: dict[str, Any], hostname: str) -> bool:
    """Return True if the holder ran on this host and its process no longer exists."""
    pid = holder.get("pid")
    if holder.get("hostname") != hostname or not isinstance(pid, int) or pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except PermissionError:  # the process exists but belongs to another user
        return False
    return False


def _describe_holder(holder: dict[str, Any]) -> str:
    started = f", started {holder['started']}" if "started" in holder else ""
    return f"process {holder.get('pid')} on host {holder.get('hostname')}{started}"


def _locked_message(path: Path, holder: dict[str, Any] | None, hostname: str) -> str:
    if holder is None:
        holder_text = (
            f"{path} exists but names no holder (it may be in the middle of being written)"
        )
    elif holder.get("hostname") == hostname:
        holder_text = f"{_describe_holder(holder)} holds {path} and is still running"
    else:
        holder_text = (
            f"{_describe_holder(holder)} holds {path}, and whether it still runs cannot be "
            "checked from this host"
        )
    return (
        f"run folder {path.parent} is in use: {holder_text}. Two runs in one folder delete each "
        f"other's checkpoints. Use another run.output_dir, or, if that run has ended, delete "
        f"{path} and start again"
    )
