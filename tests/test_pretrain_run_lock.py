"""The lock file that keeps a second training process out of a run folder."""

from __future__ import annotations

import json
import logging
import os
import socket
import subprocess

import pytest

from cytofm.pretrain.run_lock import RunLockedError, acquire_run_lock, read_lock_holder

HOST = socket.gethostname()


def _write_lock(folder, hostname: str, pid: int) -> str:
    folder.mkdir(parents=True, exist_ok=True)
    text = json.dumps({"hostname": hostname, "pid": pid, "started": "2024-01-01 00:00:00"})
    (folder / "run.lock").write_text(text)
    return text


def _dead_pid() -> int:
    process = subprocess.Popen(["true"])
    process.wait()
    return process.pid


def test_lock_names_holder_and_release_removes(tmp_path):
    folder = tmp_path / "new" / "run"
    lock = acquire_run_lock(folder)
    holder = read_lock_holder(folder / "run.lock")
    assert holder["hostname"] == HOST
    assert holder["pid"] == os.getpid()

    lock.release()
    assert not (folder / "run.lock").exists()


def test_lock_held_by_running_process(tmp_path):
    lock = acquire_run_lock(tmp_path)
    written = (tmp_path / "run.lock").read_text()
    with pytest.raises(RunLockedError) as error:
        acquire_run_lock(tmp_path)
    message = str(error.value)
    assert f"process {os.getpid()} on host {HOST}" in message
    assert "is still running" in message
    assert f"delete {tmp_path / 'run.lock'}" in message
    assert (tmp_path / "run.lock").read_text() == written
    lock.release()


def test_stale_lock_on_this_host_taken_over(tmp_path, caplog):
    dead = _dead_pid()
    _write_lock(tmp_path, HOST, dead)
    with caplog.at_level(logging.WARNING, logger="cytofm.pretrain.run_lock"):
        lock = acquire_run_lock(tmp_path)
    assert f"taking over the lock {tmp_path / 'run.lock'} of process {dead}" in caplog.text
    assert read_lock_holder(tmp_path / "run.lock")["pid"] == os.getpid()
    lock.release()


def test_lock_from_other_host_respected(tmp_path):
    written = _write_lock(tmp_path, "gpu-node-17", _dead_pid())
    with pytest.raises(RunLockedError) as error:
        acquire_run_lock(tmp_path)
    message = str(error.value)
    assert "on host gpu-node-17" in message
    assert "cannot be checked from this host" in message
    assert f"delete {tmp_path / 'run.lock'}" in message
    assert (tmp_path / "run.lock").read_text() == written


def test_empty_lock_respected(tmp_path):
    (tmp_path / "run.lock").write_text("")
    with pytest.raises(RunLockedError, match="names no holder"):
        acquire_run_lock(tmp_path)
    assert (tmp_path / "run.lock").read_text() == ""


def test_release_keeps_lock_of_other_process(tmp_path):
    lock = acquire_run_lock(tmp_path)
    replaced = _write_lock(tmp_path, "gpu-node-17", 42)
    lock.release()
    assert (tmp_path / "run.lock").read_text() == replaced


def test_lock_under_file_raises_os_error(tmp_path):
    (tmp_path / "cell.png").write_bytes(b"png")
    with pytest.raises(NotADirectoryError):
        acquire_run_lock(tmp_path / "cell.png" / "run")
