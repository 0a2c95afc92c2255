"""Checkpoint rotation and the handling of unreadable checkpoints in a run folder."""

from __future__ import annotations

import logging

from cytofm.pretrain.checkpoint import (
    REQUIRED_KEYS,
    checkpoint_path,
    list_checkpoints,
    load_latest_checkpoint,
    save_checkpoint,
)


def _state(step: int) -> dict:
    state = {key: 0 for key in REQUIRED_KEYS}
    state.update(format="cytofm-pretrain", version=1, step=step)
    return state


def _steps(output_dir) -> list[int]:
    return [step for step, _ in list_checkpoints(output_dir)]


def test_rotation_keeps_newest_written(tmp_path):
    save_checkpoint(_state(1), tmp_path, keep_last=5)
    save_checkpoint(_state(2), tmp_path, keep_last=5)
    # A file with a later step in its name than the run has reached.
    checkpoint_path(tmp_path, 50).write_bytes(b"not a checkpoint")

    written = save_checkpoint(_state(3), tmp_path, keep_last=2)
    assert written == checkpoint_path(tmp_path, 3)
    assert written.is_file()
    assert _steps(tmp_path) == [2, 3, 50]

    save_checkpoint(_state(4), tmp_path, keep_last=1)
    assert _steps(tmp_path) == [4, 50]


def test_unreadable_checkpoints_set_aside(tmp_path, caplog):
    good = save_checkpoint(_state(18), tmp_path, keep_last=5)
    truncated = checkpoint_path(tmp_path, 99)
    truncated.write_bytes(good.read_bytes()[:200])
    empty = checkpoint_path(tmp_path, 100)
    empty.write_bytes(b"")

    with caplog.at_level(logging.WARNING, logger="cytofm.pretrain.checkpoint"):
        state = load_latest_checkpoint(tmp_path, set_aside_unreadable=True)
    assert state["step"] == 18
    assert _steps(tmp_path) == [18]
    folder = tmp_path / "checkpoints"
    assert (folder / "checkpoint-000000099.pt.unreadable").is_file()
    assert (folder / "checkpoint-000000100.pt.unreadable").is_file()
    assert not truncated.exists()
    assert not empty.exists()
    assert "checkpoint-000000100.pt: empty file (0 bytes)" in caplog.text
    assert "checkpoint-000000099.pt: PytorchStreamReader failed" in caplog.text


def test_set_aside_never_overwrites(tmp_path):
    folder = tmp_path / "checkpoints"
    folder.mkdir()
    (folder / "checkpoint-000000007.pt.unreadable").write_bytes(b"first")
    checkpoint_path(tmp_path, 7).write_bytes(b"second")

    assert load_latest_checkpoint(tmp_path, set_aside_unreadable=True) is None
    assert (folder / "checkpoint-000000007.pt.unreadable").read_bytes() == b"first"
    assert (folder / "checkpoint-000000007.pt-2.unreadable").read_bytes() == b"second"


def test_unreadable_left_in_place_by_default(tmp_path):
    checkpoint_path(tmp_path, 5).parent.mkdir()
    checkpoint_path(tmp_path, 5).write_bytes(b"")
    assert load_latest_checkpoint(tmp_path) is None
    assert _steps(tmp_path) == [5]
