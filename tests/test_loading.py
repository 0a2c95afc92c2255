"""load_backbone on every supported layout, built here with exact key names and nesting."""

from __future__ import annotations

import argparse
import logging
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from cytofm import load_backbone
from cytofm.models.checkpoint_formats import CheckpointError, UnsafeCheckpointError
from cytofm.models.loading import BackboneKeyError
from cytofm.models.vit import build_vit

EMBED_DIM = 128  # 2 heads of 64 dimensions, so the heads-from-width rule applies


def source_model(init_values=None, img_size=64, reg_tokens=0, seed=0):
    torch.manual_seed(seed)
    model = build_vit(
        "vit_small",
        embed_dim=EMBED_DIM,
        depth=2,
        num_heads=2,
        patch_size=16,
        img_size=img_size,
        init_values=init_values,
        reg_tokens=reg_tokens,
    )
    with torch.no_grad():
        model.mask_token.normal_()
        if init_values is not None:
            for block in model.blocks:
                block.ls1.gamma.uniform_(0.5, 1.5)
                block.ls2.gamma.uniform_(0.5, 1.5)
    return model.eval()


def timm_backbone_keys(model):
    return {k: v.clone() for k, v in model.state_dict().items() if k != "mask_token"}


def ibot_backbone_keys(model):
    """The same weights in iBOT's names: gamma_1/gamma_2 and masked_embed [1, D]."""
    converted = {}
    for key, value in model.state_dict().items():
        if key == "mask_token":
            converted["masked_embed"] = value.reshape(1, -1).clone()
            continue
        key = key.replace(".ls1.gamma", ".gamma_1").replace(".ls2.gamma", ".gamma_2")
        converted[key] = value.clone()
    return converted


def fake_head(prefix):
    return {
        f"{prefix}head.mlp.0.weight": torch.randn(32, EMBED_DIM),
        f"{prefix}head.mlp.0.bias": torch.randn(32),
        f"{prefix}head.last_layer.weight_g": torch.ones(64, 1),
        f"{prefix}head.last_layer.weight_v": torch.randn(64, 16),
        f"{prefix}head.last_layer2.weight_v": torch.randn(64, 16),
    }


def release_args():
    """An iBOT argparse namespace whose pickle holds numpy scalars, like the release's."""
    return argparse.Namespace(
        arch="vit_base",
        patch_size=np.int64(16),
        lr=np.float64(5e-4),
        pred_ratio=[np.float64(0.0), np.float64(0.3)],
        global_crops_scale=(0.14, 1.0),
        out_dim=8192,
        dtype_seen=np.dtype("float32"),
    )


def assert_same_outputs(loaded, model, size=64):
    images = torch.randn(2, 3, size, size)
    with torch.no_grad():
        expected = model.forward_tokens(images)
        actual = loaded.model.forward_tokens(images)
    assert torch.equal(actual, expected)


def test_cytofm_release_layout(tmp_path):
    teacher = source_model(init_values=0.1, seed=1)
    student = source_model(init_values=0.1, seed=2)
    checkpoint = {
        "teacher": {
            **{
                f"backbone.{k}": v
                for k, v in ibot_backbone_keys(teacher).items()
                if k != "masked_embed"
            },
            **fake_head(""),
        },
        "student": {
            **{f"module.backbone.{k}": v for k, v in ibot_backbone_keys(student).items()},
            **fake_head("module."),
        },
        "optimizer": {"state": {}, "param_groups": [{"lr": 0.1, "params": [0, 1]}]},
        "epoch": 100,
        "args": release_args(),
        "ibot_loss": {"center": torch.zeros(1, 64), "center2": torch.zeros(1, 1, 64)},
    }
    path = tmp_path / "cytofm_vitb16.pth"
    torch.save(checkpoint, path)
    with pytest.raises(pickle.UnpicklingError):
        torch.load(path, weights_only=True)  # the numpy-holding args need the allow-list

    loaded = load_backbone(path)
    assert loaded.source_format == "ibot"
    assert loaded.embed_dim == EMBED_DIM
    assert loaded.patch_size == 16
    assert loaded.img_size == (64, 64)
    assert not loaded.model.training
    assert_same_outputs(loaded, teacher)

    loaded_student = load_backbone(path, which="student")
    assert_same_outputs(loaded_student, student)
    assert torch.equal(loaded_student.model.mask_token, student.mask_token)


def test_teacher_under_module_prefix(tmp_path):
    teacher = source_model(seed=3)
    checkpoint = {
        "teacher": {f"module.backbone.{k}": v for k, v in timm_backbone_keys(teacher).items()},
        "student": {f"module.backbone.{k}": v for k, v in timm_backbone_keys(teacher).items()},
        "epoch": 3,
    }
    path = tmp_path / "dino.pth"
    torch.save(checkpoint, path)
    loaded = load_backbone(path)
    assert loaded.source_format == "dino"
    assert_same_outputs(loaded, teacher)


@pytest.mark.parametrize("suffix", [".pth", ".bin", ".safetensors"])
def test_timm_uni_state_dict(tmp_path, suffix):
    model = source_model(init_values=1e-5, reg_tokens=0, seed=4)
    state_dict = timm_backbone_keys(model)
    path = tmp_path / f"pytorch_model{suffix}"
    if suffix == ".safetensors":
        save_file({k: v.contiguous() for k, v in state_dict.items()}, str(path))
    else:
        torch.save(state_dict, path)
    loaded = load_backbone(path)
    assert loaded.source_format == "state_dict"
    assert loaded.spec.init_values is not None
    assert_same_outputs(loaded, model)


def test_wrapped_state_dict_with_registers(tmp_path):
    model = source_model(reg_tokens=4, seed=5)
    path = tmp_path / "wrapped.pth"
    torch.save({"state_dict": timm_backbone_keys(model), "epoch": 1}, path)
    loaded = load_backbone(path)
    assert loaded.spec.reg_tokens == 4
    assert_same_outputs(loaded, model)


def test_cytofm_pretrain_checkpoint(tmp_path):
    model = source_model(seed=6)
    other = source_model(seed=7)
    checkpoint = {
        "format": "cytofm-pretrain",
        "version": 1,
        "student": other.state_dict(),
        "teacher": model.state_dict(),
        "model": {"arch": "vit_small", "num_heads": 2, "depth": 2, "embed_dim": EMBED_DIM},
        "step": 10,
        "config": {"run": {"seed": 0}},
    }
    path = tmp_path / "checkpoint.pt"
    torch.save(checkpoint, path)
    assert_same_outputs(load_backbone(path), model)
    assert_same_outputs(load_backbone(path, which="student"), other)


def test_saved_at_224_runs_at_other_sizes(tmp_path):
    model = source_model(img_size=224, seed=8)
    path = tmp_path / "vit224.pth"
    torch.save(timm_backbone_keys(model), path)
    loaded = load_backbone(path)
    assert loaded.img_size == (224, 224)
    for height, width in [(96, 96), (336, 336), (224, 160)]:
        with torch.no_grad():
            tokens = loaded.model.forward_tokens(torch.randn(1, 3, height, width))
        assert tokens.shape == (1, 1 + (height // 16) * (width // 16), EMBED_DIM)


def test_img_size_resamples_pos_embed(tmp_path, caplog):
    model = source_model(img_size=64, seed=9)
    path = tmp_path / "vit64.pth"
    torch.save(timm_backbone_keys(model), path)
    with caplog.at_level(logging.INFO, logger="cytofm.models.loading"):
        loaded = load_backbone(path, img_size=96)
    assert loaded.model.pos_embed.shape == (1, 1 + 36, EMBED_DIM)
    assert "Resampled position embedding" in caplog.text
    assert "4x4 to a 6x6" in caplog.text
    # The CLS position is carried over unchanged.
    assert torch.equal(loaded.model.pos_embed[:, 0], model.pos_embed[:, 0])
    assert loaded.model.grid_size == (6, 6)


def test_wrong_prefix_names_keys(tmp_path):
    model = source_model(seed=10)
    path = tmp_path / "prefixed.pth"
    torch.save({f"vision_tower.{k}": v for k, v in timm_backbone_keys(model).items()}, path)
    with pytest.raises(BackboneKeyError, match=r"missing.*cls_token.*vision_tower\.blocks\.0"):
        load_backbone(path)
    loaded = load_backbone(path, key_prefix="vision_tower.")
    assert_same_outputs(loaded, model)


def test_missing_block_names_keys(tmp_path):
    model = build_vit("vit_small", embed_dim=EMBED_DIM, depth=3, num_heads=2, img_size=64).eval()
    state_dict = {
        k: v for k, v in timm_backbone_keys(model).items() if not k.startswith("blocks.1.")
    }
    path = tmp_path / "missing_block.pth"
    torch.save(state_dict, path)
    with pytest.raises(BackboneKeyError, match=r"blocks\.1\.attn\.qkv\.weight"):
        load_backbone(path)


def test_missing_last_block_with_arch_hint(tmp_path):
    model = source_model(seed=11)
    state_dict = {
        k: v for k, v in timm_backbone_keys(model).items() if not k.startswith("blocks.1.")
    }
    path = tmp_path / "truncated.pth"
    torch.save(
        {
            "format": "cytofm-pretrain",
            "teacher": state_dict,
            "student": state_dict,
            "model": {"depth": 2, "num_heads": 2},
        },
        path,
    )
    with pytest.raises(BackboneKeyError, match="missing"):
        load_backbone(path)


def test_unexpected_key_named(tmp_path):
    model = source_model(seed=12)
    state_dict = timm_backbone_keys(model)
    state_dict["blocks.0.attn.extra_bias"] = torch.zeros(3)
    path = tmp_path / "extra.pth"
    torch.save(state_dict, path)
    with pytest.raises(BackboneKeyError, match="blocks.0.attn.extra_bias"):
        load_backbone(path)


def test_unknown_layout_named(tmp_path):
    path = tmp_path / "odd.pth"
    torch.save({"weights": [1, 2, 3], "name": "x"}, path)
    with pytest.raises(CheckpointError, match="unknown checkpoint layout.*name, weights"):
        load_backbone(path)


def test_missing_file_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="nothing.pth"):
        load_backbone(tmp_path / "nothing.pth")


class _Exploit:
    """Unpickling this would create a marker file."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def test_malicious_pickle_rejected(tmp_path):
    marker = tmp_path / "pwned"
    model = source_model(seed=13)
    path = tmp_path / "evil.pth"
    torch.save({"state_dict": timm_backbone_keys(model), "payload": _Exploit(marker)}, path)
    assert not marker.exists()
    with pytest.raises(UnsafeCheckpointError, match="trust_pickle=True"):
        load_backbone(path)
    assert not marker.exists()


@pytest.mark.parametrize(
    ("content", "expected"),
    [
        (b"", "is empty"),
        (b"model:\n  depth: 12\n", "not a readable PyTorch checkpoint"),
        (bytes(range(256)) * 20, "not a readable PyTorch checkpoint"),
    ],
    ids=["empty", "yaml", "random-bytes"],
)
def test_non_checkpoint_files_named(tmp_path, content, expected):
    path = tmp_path / "weights.pth"
    path.write_bytes(content)
    with pytest.raises(CheckpointError, match=expected) as raised:
        load_backbone(path)
    assert "weights.pth" in str(raised.value)
    assert not isinstance(raised.value, UnsafeCheckpointError)
    assert "trust_pickle" not in str(raised.value)


def test_directory_rejected(tmp_path):
    folder = tmp_path / "model.pth"
    folder.mkdir()
    with pytest.raises(CheckpointError, match="is a folder, not a checkpoint file") as raised:
        load_backbone(folder)
    assert "contains no *.pt" in str(raised.value)


def test_folder_lists_checkpoints_inside(tmp_path):
    folder = tmp_path / "run"
    (folder / "checkpoints").mkdir(parents=True)
    for name in ("teacher.pth", "checkpoints/checkpoint-0002.pt", "notes.txt", "model.bin"):
        (folder / name).write_bytes(b"x")
    with pytest.raises(CheckpointError) as raised:
        load_backbone(folder)
    message = str(raised.value)
    assert f"{folder} is a folder" in message
    assert str(folder / "checkpoints" / "checkpoint-0002.pt") in message
    assert str(folder / "teacher.pth") in message
    assert str(folder / "model.bin") in message
    assert "notes.txt" not in message


def test_garbage_file_gives_no_torch_advice(tmp_path):
    path = tmp_path / "weights.pth"
    path.write_bytes(bytes(range(256)) * 20)
    with pytest.raises(CheckpointError) as raised:
        load_backbone(path)
    message = str(raised.value)
    assert message == f"{path}: not a readable PyTorch checkpoint (Unsupported operand 0)"


def test_unsafe_pickle_message_is_ours(tmp_path):
    path = tmp_path / "evil.pth"
    torch.save({"payload": _Exploit(tmp_path / "marker")}, path)
    with pytest.raises(UnsafeCheckpointError) as raised:
        load_backbone(path)
    message = str(raised.value)
    assert message.startswith(f"{path}: not loaded because its pickle refers to getattr,")
    assert "trust_pickle=True" in message
    assert "two options" not in message
    assert "weights_only" not in message
    assert ". ." not in message


def test_img_size_not_patch_multiple_rejected(tmp_path):
    model = source_model(seed=15)  # patch 16
    path = tmp_path / "vit.pth"
    torch.save(timm_backbone_keys(model), path)
    with pytest.raises(ValueError) as raised:
        load_backbone(path, img_size=60)
    message = str(raised.value)
    assert "img_size=60 is not a multiple of the patch size 16" in message
    assert "img_size=48 or 64" in message


def test_num_heads_not_dividing_width_rejected(tmp_path):
    model = source_model(seed=16)  # width 128
    path = tmp_path / "vit.pth"
    torch.save(timm_backbone_keys(model), path)
    with pytest.raises(ValueError) as raised:
        load_backbone(path, num_heads=3)
    message = str(raised.value)
    assert "num_heads=3 does not divide the width embed_dim=128" in message
    assert "[1, 2, 4, 8, 16, 32, 64, 128]" in message


@pytest.mark.parametrize("arch", ["vit_base", "vit_tiny"])
def test_arch_disagreeing_with_weights_rejected(tmp_path, arch):
    model = source_model(seed=17)  # width 128, depth 2
    path = tmp_path / "vit.pth"
    torch.save(timm_backbone_keys(model), path)
    with pytest.raises(ValueError) as raised:
        load_backbone(path, arch=arch)
    message = str(raised.value)
    assert f"arch={arch!r}" in message
    assert "(width 128, depth 2)" in message
    assert str(path) in message


def test_unknown_arch_rejected(tmp_path):
    model = source_model(seed=18)
    path = tmp_path / "vit.pth"
    torch.save(timm_backbone_keys(model), path)
    with pytest.raises(ValueError, match="unknown arch 'vit_huge'"):
        load_backbone(path, arch="vit_huge")


def test_unsafe_pickle_hint_names_options(tmp_path):
    path = tmp_path / "evil.pth"
    torch.save({"payload": _Exploit(tmp_path / "marker")}, path)
    with pytest.raises(UnsafeCheckpointError) as raised:
        load_backbone(path)
    message = str(raised.value)
    assert "backbone.trust_pickle=true" in message
    assert "--trust-pickle" in message
    assert "\x1b[" not in message


def test_recorded_depth_wins_over_preset(tmp_path):
    torch.manual_seed(14)
    model = build_vit("vit_tiny", depth=2, patch_size=16, img_size=32).eval()
    path = tmp_path / "shallow_tiny.pt"
    torch.save(
        {
            "format": "cytofm-pretrain",
            "teacher": model.state_dict(),
            "student": model.state_dict(),
            "model": {"arch": "vit_tiny", "embed_dim": 192, "depth": 2, "num_heads": 3},
        },
        path,
    )
    loaded = load_backbone(path)
    assert loaded.spec.depth == 2
    assert_same_outputs(loaded, model, size=32)
