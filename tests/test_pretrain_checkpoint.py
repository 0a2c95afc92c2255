"""Checkpoint rotation and the handling of unreadable checkpoints in a run folder."""

from __future__ import annotations

import logging

import pytest
import torch

from cytofm.pretrain.checkpoint import (
    REQUIRED_KEYS,
    CheckpointMismatchError,
    UnreadableCheckpointsError,
    check_checkpoint_fits,
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
        path, state = load_latest_checkpoint(tmp_path, set_aside_unreadable=True)
    assert path == good
    assert state["step"] == 18
    assert _steps(tmp_path) == [18]
    folder = tmp_path / "checkpoints"
    assert (folder / "checkpoint-000000099.pt.unreadable").is_file()
    assert (folder / "checkpoint-000000100.pt.unreadable").is_file()
    assert not truncated.exists()
    assert not empty.exists()
    assert "checkpoint-000000100.pt: empty file (0 bytes)" in caplog.text
    assert "checkpoint-000000099.pt: truncated or corrupt file (200 bytes" in caplog.text


def test_set_aside_never_overwrites(tmp_path):
    save_checkpoint(_state(3), tmp_path, keep_last=5)
    folder = tmp_path / "checkpoints"
    (folder / "checkpoint-000000007.pt.unreadable").write_bytes(b"first")
    checkpoint_path(tmp_path, 7).write_bytes(b"second")

    path, _ = load_latest_checkpoint(tmp_path, set_aside_unreadable=True)
    assert path == checkpoint_path(tmp_path, 3)
    assert (folder / "checkpoint-000000007.pt.unreadable").read_bytes() == b"first"
    # The number goes before the suffixes, so every set-aside name ends in .unreadable.
    assert (folder / "checkpoint-000000007-2.pt.unreadable").read_bytes() == b"second"


def test_unreadable_left_in_place_by_default(tmp_path):
    save_checkpoint(_state(3), tmp_path, keep_last=5)
    checkpoint_path(tmp_path, 5).write_bytes(b"")
    path, _ = load_latest_checkpoint(tmp_path)
    assert path == checkpoint_path(tmp_path, 3)
    assert _steps(tmp_path) == [3, 5]


def test_all_unreadable_raises_renames_nothing(tmp_path):
    good = save_checkpoint(_state(196), tmp_path, keep_last=5)
    data = good.read_bytes()
    good.write_bytes(data[: len(data) // 2])
    checkpoint_path(tmp_path, 198).write_bytes(b"")
    before = sorted(path.name for path in (tmp_path / "checkpoints").iterdir())

    with pytest.raises(UnreadableCheckpointsError) as error:
        load_latest_checkpoint(tmp_path, set_aside_unreadable=True)
    message = str(error.value)
    assert "none of the 2 checkpoint(s)" in message
    assert "checkpoint-000000198.pt: empty file (0 bytes)" in message
    assert f"checkpoint-000000196.pt: truncated or corrupt file ({len(data) // 2} bytes" in message
    assert "Nothing was renamed or deleted" in message
    assert f"move these files out of {tmp_path / 'checkpoints'}" in message
    assert sorted(path.name for path in (tmp_path / "checkpoints").iterdir()) == before


@pytest.mark.parametrize("kept_fraction", [0.1, 0.5])
def test_truncated_reason_names_truncation(tmp_path, kept_fraction):
    # torch raises OSError "[Errno 22] Invalid argument" for some cut points and
    # RuntimeError "PytorchStreamReader failed ..." for others.
    state = _state(12)
    state["student"] = {"weight": torch.arange(100_000, dtype=torch.float32)}
    path = save_checkpoint(state, tmp_path, keep_last=5)
    data = path.read_bytes()
    kept = int(len(data) * kept_fraction)
    path.write_bytes(data[:kept])

    with pytest.raises(UnreadableCheckpointsError) as error:
        load_latest_checkpoint(tmp_path)
    assert f"checkpoint-000000012.pt: truncated or corrupt file ({kept} bytes" in str(error.value)


def test_no_checkpoints_returns_none(tmp_path):
    assert load_latest_checkpoint(tmp_path) is None
    (tmp_path / "checkpoints").mkdir()
    (tmp_path / "checkpoints" / "checkpoint-000000004.pt.unreadable").write_bytes(b"")
    assert load_latest_checkpoint(tmp_path) is None


_BACKBONE = {
    "arch": "vit_small",
    "patch_size": 16,
    "img_size": 224,
    "embed_dim": 384,
    "depth": 12,
    "num_heads": 6,
    "init_values": None,
    "reg_tokens": 0,
    "mlp_ratio": 4.0,
    "qkv_bias": True,
    "qk_norm": False,
}
_HEAD = {
    "out_dim": 8192,
    "patch_out_dim": 8192,
    "shared": True,
    "hidden_dim": 2048,
    "bottleneck_dim": 256,
    "num_layers": 3,
    "norm_last_layer": True,
}


def _saved(**model: object) -> dict:
    return {"model": {**_BACKBONE, **model}, "config": {"head": dict(_HEAD)}}


def test_fit_check_accepts_same_model(tmp_path):
    # A tuple and a list of the same sizes, and another layer-scale value, still fit.
    saved = _saved(img_size=[224, 224])
    check_checkpoint_fits(tmp_path / "c.pt", saved, {**_BACKBONE, "img_size": (224, 224)}, _HEAD)
    saved = _saved(init_values=1e-5)
    check_checkpoint_fits(tmp_path / "c.pt", saved, {**_BACKBONE, "init_values": 0.1}, _HEAD)


def test_fit_check_names_width_and_depth(tmp_path):
    current = {**_BACKBONE, "embed_dim": 32, "depth": 2, "num_heads": 2}
    with pytest.raises(CheckpointMismatchError) as error:
        check_checkpoint_fits(tmp_path / "c.pt", _saved(), current, _HEAD)
    message = str(error.value)
    assert f"the checkpoint {tmp_path / 'c.pt'} was written by a model with" in message
    assert "model.embed_dim=384, model.depth=12, model.num_heads=6" in message
    assert "the config asks for model.embed_dim=32, model.depth=2, model.num_heads=2" in message
    assert "Use another run.output_dir" in message
    assert "(model.embed_dim=384 model.depth=12 model.num_heads=6)" in message


def test_fit_check_names_arch_and_layer_scale(tmp_path):
    current = {**_BACKBONE, "arch": "vit_base", "embed_dim": 768, "init_values": 1e-5}
    with pytest.raises(CheckpointMismatchError) as error:
        check_checkpoint_fits(tmp_path / "c.pt", _saved(), current, _HEAD)
    message = str(error.value)
    assert 'model.arch="vit_small", model.embed_dim=384, model.init_values=null' in message
    assert 'asks for model.arch="vit_base", model.embed_dim=768, model.init_values=1e-05' in message


def test_fit_check_names_head_setting(tmp_path):
    with pytest.raises(CheckpointMismatchError) as error:
        check_checkpoint_fits(tmp_path / "c.pt", _saved(), _BACKBONE, {**_HEAD, "out_dim": 4096})
    message = str(error.value)
    assert "written by a model with head.out_dim=8192" in message
    assert "asks for head.out_dim=4096" in message
