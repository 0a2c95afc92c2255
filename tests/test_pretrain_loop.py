"""The iBOT pretraining loop on a tiny ViT: resume, checkpoints, NaN stop, collapse warning."""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import signal
import socket

import pytest
import torch

from cytofm.cli import pretrain as pretrain_cli
from cytofm.config import ConfigError
from cytofm.models.loading import load_backbone
from cytofm.models.vit import build_vit
from cytofm.pretrain.checkpoint import REQUIRED_KEYS, list_checkpoints, load_checkpoint
from cytofm.pretrain.config import load_pretrain_config
from cytofm.pretrain.loader import build_pretrain_data
from cytofm.pretrain.masking import MaskingConfig
from cytofm.pretrain.networks import NetworkOutput, forward_selected_tokens
from cytofm.pretrain.trainer import (
    NonFiniteLossError,
    PretrainTrainer,
    describe_non_finite_loss,
    draw_step_masks,
)
from tests.pretrain_helpers import (
    CPU,
    logged_losses,
    run_tiny,
    tiny_config,
    tiny_overrides,
    write_random_images,
)


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    # 16 images with batches of 4: 4 steps per epoch, so step 2 is in the middle of epoch 0.
    return write_random_images(tmp_path_factory.mktemp("images"), 16)


def _tensors_equal(first: dict, second: dict) -> list[str]:
    return [name for name in first if not torch.equal(first[name], second[name])]


def test_resume_mid_epoch_bitwise(images, tmp_path):
    straight, _ = run_tiny(images, tmp_path / "straight", **{"run.max_steps": 4})
    assert straight.steps_per_epoch == 4

    run_tiny(images, tmp_path / "resumed", **{"run.max_steps": 2})
    resumed = PretrainTrainer(
        tiny_config(images, tmp_path / "resumed", **{"run.max_steps": 4}), CPU
    )
    assert resumed.step == 2
    resumed.train()

    expected = load_checkpoint(straight.last_checkpoint)
    actual = load_checkpoint(resumed.last_checkpoint)
    assert actual["step"] == expected["step"] == 4
    for key in ("student", "teacher", "student_head", "teacher_head", "loss"):
        assert _tensors_equal(expected[key], actual[key]) == [], key
    for index, state in expected["optimizer"]["state"].items():
        assert torch.equal(state["exp_avg"], actual["optimizer"]["state"][index]["exp_avg"])
    assert logged_losses(resumed) == logged_losses(straight)[2:]


def test_resume_past_corrupt_newest_checkpoints(images, tmp_path):
    output_dir = tmp_path / "run"
    settings = {"run.save_every_steps": 1, "run.keep_last": 2}
    run_tiny(images, output_dir, **settings, **{"run.max_steps": 2})
    folder = output_dir / "checkpoints"
    good = folder / "checkpoint-000000002.pt"
    (folder / "checkpoint-000000099.pt").write_bytes(good.read_bytes()[:300])
    (folder / "checkpoint-000000100.pt").write_bytes(b"")

    trainer, result = run_tiny(images, output_dir, **settings, **{"run.max_steps": 5})
    assert result.step == 5
    assert result.checkpoint == folder / "checkpoint-000000005.pt"
    assert [step for step, _ in list_checkpoints(output_dir)] == [4, 5]
    assert load_checkpoint(result.checkpoint)["step"] == 5
    assert (folder / "checkpoint-000000099.pt.unreadable").is_file()
    assert (folder / "checkpoint-000000100.pt.unreadable").is_file()


def test_cli_all_checkpoints_unreadable(images, tmp_path, capsys):
    config_file = tmp_path / "tiny.yaml"
    config_file.write_text("{}\n")
    output_dir = tmp_path / "run"
    overrides = tiny_overrides(images, output_dir, **{"run.max_steps": 2})
    assert pretrain_cli.main(["--config", str(config_file), *overrides]) == 0
    folder = output_dir / "checkpoints"
    for path in folder.iterdir():
        path.write_bytes(path.read_bytes()[:1000])
    names = sorted(path.name for path in folder.iterdir())
    capsys.readouterr()

    status = pretrain_cli.main(["--config", str(config_file), *overrides])
    assert status == 2
    errors = capsys.readouterr().err
    assert f"none of the 1 checkpoint(s) in {folder} loads" in errors
    assert "checkpoint-000000002.pt: truncated or corrupt file (1000 bytes" in errors
    assert "Traceback" not in errors
    assert "starting from step 0" not in errors
    assert sorted(path.name for path in folder.iterdir()) == names


def test_cli_resume_other_width_named(images, tmp_path, capsys):
    config_file = tmp_path / "tiny.yaml"
    config_file.write_text("{}\n")
    output_dir = tmp_path / "run"
    overrides = tiny_overrides(images, output_dir, **{"run.max_steps": 1})
    assert pretrain_cli.main(["--config", str(config_file), *overrides]) == 0
    capsys.readouterr()

    wider = tiny_overrides(images, output_dir, **{"run.max_steps": 2, "model.embed_dim": 64})
    assert pretrain_cli.main(["--config", str(config_file), *wider]) == 2
    errors = capsys.readouterr().err
    checkpoint = output_dir / "checkpoints" / "checkpoint-000000001.pt"
    assert f"the checkpoint {checkpoint} was written by a model with model.embed_dim=32" in errors
    assert "the config asks for model.embed_dim=64" in errors
    assert "Use another run.output_dir" in errors
    assert "Traceback" not in errors


def test_checkpoint_layout_weights_only(images, tmp_path):
    trainer, result = run_tiny(
        images,
        tmp_path / "run",
        **{"run.max_steps": 3, "run.save_every_steps": 1, "run.keep_last": 2},
    )
    assert [step for step, _ in list_checkpoints(tmp_path / "run")] == [2, 3]
    assert result.checkpoint == trainer.last_checkpoint

    state = torch.load(result.checkpoint, map_location="cpu", weights_only=True)
    assert set(REQUIRED_KEYS) <= set(state)
    assert state["format"] == "cytofm-pretrain"
    assert state["version"] == 1
    assert state["step"] == 3
    assert state["epoch"] == 0
    assert state["data"]["step_in_epoch"] == 3
    assert state["data"]["samples_done_per_rank"] == 12
    assert state["config"]["model"]["embed_dim"] == 32
    assert state["model"]["embed_dim"] == 32
    assert state["model"]["patch_size"] == 8
    for key in ("cls_token", "pos_embed", "patch_embed.proj.weight", "blocks.1.attn.qkv.weight"):
        assert key in state["teacher"], key
    assert "mask_token" in state["student"]
    assert not any(key.startswith(("module.", "backbone.")) for key in state["teacher"])
    assert set(state["loss"]) == {"center", "patch_center"}
    assert (tmp_path / "run" / "config.yaml").is_file()


def test_checkpoint_loads_as_backbone(images, tmp_path):
    trainer, result = run_tiny(images, tmp_path / "run", **{"run.max_steps": 2})
    loaded = load_backbone(result.checkpoint)
    assert loaded.embed_dim == 32
    assert loaded.patch_size == 8

    pixels = torch.randn(2, 3, 32, 32)
    teacher = trainer.teacher.backbone.eval()
    with torch.no_grad():
        assert torch.allclose(loaded.model(pixels), teacher(pixels), atol=1e-6)


def _scale_student_output(trainer: PretrainTrainer, field: str, factor: float) -> None:
    """Make the student's ``field`` logits non-finite by multiplying them with ``factor``."""
    healthy_forward = trainer.student_forward

    def broken_forward(*args, **kwargs) -> NetworkOutput:
        output = healthy_forward(*args, **kwargs)
        setattr(output, field, getattr(output, field) * factor)
        return output

    trainer.student_forward = broken_forward


def test_nan_loss_stops_and_keeps_checkpoint(images, tmp_path):
    output_dir = tmp_path / "run"
    run_tiny(images, output_dir, **{"run.max_steps": 2})
    checkpoint = list_checkpoints(output_dir)[-1][1]
    digest = hashlib.sha256(checkpoint.read_bytes()).hexdigest()

    trainer = PretrainTrainer(tiny_config(images, output_dir, **{"run.max_steps": 4}), CPU)
    _scale_student_output(trainer, "cls_logits", float("nan"))
    with pytest.raises(NonFiniteLossError) as error:
        trainer.train()
    message = str(error.value)
    assert "step 3" in message
    assert "cls=nan" in message
    assert "total=nan" in message
    assert "patch=" in message
    assert f"The last checkpoint, {checkpoint}, is intact." in message
    assert "run.precision=fp32" not in message

    assert [step for step, _ in list_checkpoints(output_dir)] == [2]
    assert hashlib.sha256(checkpoint.read_bytes()).hexdigest() == digest
    assert load_checkpoint(checkpoint)["step"] == 2


def test_nan_loss_without_checkpoint_named(images, tmp_path):
    output_dir = tmp_path / "run"
    trainer = PretrainTrainer(tiny_config(images, output_dir, **{"run.max_steps": 2}), CPU)
    _scale_student_output(trainer, "patch_logits", float("inf"))
    with pytest.raises(NonFiniteLossError) as error:
        trainer.train()
    message = str(error.value)
    assert "step 1" in message
    assert f"No checkpoint was written to {output_dir} yet" in message
    assert "is intact" not in message
    assert "run.precision=fp32" not in message
    assert list_checkpoints(output_dir) == []


def test_nan_message_suggests_fp32_for_bf16(tmp_path):
    message = describe_non_finite_loss(
        {"total": math.nan, "cls": math.nan, "patch": 1.5},
        step=7,
        epoch=1,
        last_checkpoint=None,
        output_dir=tmp_path,
        precision="bf16",
    )
    assert message.startswith("non-finite loss at step 7 (epoch 1): total=nan, cls=nan, patch=1.5.")
    assert "use run.precision=fp32 to rule out bf16 overflow" in message


def test_constant_teacher_warns_collapse(images, tmp_path, caplog):
    trainer = PretrainTrainer(tiny_config(images, tmp_path / "run", **{"run.max_steps": 2}), CPU)
    out_dim = trainer.config.head.out_dim

    def constant_teacher(global_crops, masks, mask_inputs=False, mask_index=None) -> NetworkOutput:
        num_images = global_crops.shape[0]
        num_masked = int(masks.sum())
        return NetworkOutput(
            cls_logits=torch.zeros(num_images, out_dim),
            patch_logits=torch.zeros(num_masked, out_dim),
            cls_embeddings=torch.ones(num_images, 32),
        )

    trainer.teacher_forward = constant_teacher
    with caplog.at_level(logging.WARNING, logger="cytofm.pretrain.metrics"):
        trainer.train()
    warnings = [
        record.getMessage() for record in caplog.records if record.levelno == logging.WARNING
    ]
    assert len(warnings) == 2
    assert "possible collapse" in warnings[0]
    assert "near uniform" in warnings[0]
    assert "nearly identical" in warnings[0]
    assert trainer.metrics.history[0]["collapse/teacher_entropy_ratio"] == pytest.approx(1.0)


def test_unknown_config_key_named(tmp_path):
    with pytest.raises(ConfigError, match="optim.learning_rate"):
        load_pretrain_config(None, ["optim.learning_rate=1e-3"])
    with pytest.raises(ConfigError, match="run.keep_last"):
        load_pretrain_config(None, ["run.keep_last=0"])


def test_masks_independent_of_world_size():
    settings = {"seed": 3, "epoch": 0, "num_global_crops": 2, "grid": (4, 4)}
    masking = MaskingConfig(ratios=[0.5], ratio_variations=[0.2])
    whole = draw_step_masks(
        masking, step=5, batch_size_per_rank=4, rank=0, world_size=1, **settings
    )
    whole = whole.view(2, 4, 16)
    assert whole.any()

    # Two ranks of 2 images hold the interleaved halves of the same global batch of 4.
    for rank in range(2):
        half = draw_step_masks(
            masking, step=5, batch_size_per_rank=2, rank=rank, world_size=2, **settings
        )
        assert torch.equal(half.view(2, 2, 16), whole[:, rank::2])

    later = draw_step_masks(
        masking, step=6, batch_size_per_rank=4, rank=0, world_size=1, **settings
    )
    assert not torch.equal(later.view(2, 4, 16), whole)


@pytest.mark.parametrize("init_values", [None, 1e-1])
def test_selected_tokens_match_full_forward(init_values):
    torch.manual_seed(0)
    backbone = build_vit(
        "vit_tiny",
        embed_dim=32,
        depth=2,
        num_heads=2,
        patch_size=8,
        img_size=32,
        init_values=init_values,
        reg_tokens=1,
    ).train()
    images = torch.randn(3, 3, 32, 32)
    masks = torch.zeros(3, 16, dtype=torch.bool)
    masks[0, [1, 5]] = True
    masks[2, 7] = True
    # CLS of every image (column 0) and the masked patches after the 2 prefix tokens.
    rows = torch.tensor([0, 1, 2, 0, 0, 2])
    columns = torch.tensor([0, 0, 0, 3, 7, 9])

    selected = forward_selected_tokens(backbone, images, masks, rows, columns)
    selected.pow(2).sum().backward()
    selected_grads = {name: p.grad.clone() for name, p in backbone.named_parameters()}
    backbone.zero_grad()

    full = backbone.forward_tokens(images, masks)[rows, columns]
    full.pow(2).sum().backward()
    assert torch.allclose(selected, full, atol=1e-5)
    for name, param in backbone.named_parameters():
        assert torch.allclose(selected_grads[name], param.grad, atol=1e-5), name


def test_cli_trains_and_rejects_bad_keys(images, tmp_path, capsys):
    config_file = tmp_path / "tiny.yaml"
    config_file.write_text("run:\n  max_steps: 2\n")
    output_dir = tmp_path / "run"
    overrides = tiny_overrides(images, output_dir)

    assert pretrain_cli.main(["--config", str(config_file), *overrides]) == 0
    assert (output_dir / "train.log").is_file()
    assert "step 2: loss" in (output_dir / "train.log").read_text()
    assert [step for step, _ in list_checkpoints(output_dir)] == [2]
    assert not (output_dir / "run.lock").exists()
    saved = load_pretrain_config(output_dir / "config.yaml")
    assert saved.run.max_steps == 2
    assert saved.model.embed_dim == 32

    capsys.readouterr()
    # The command replaces the root logger's handlers, so its messages go to stderr only.
    status = pretrain_cli.main(["--config", str(config_file), "optim.lrr=1"])
    assert status == 2
    assert "unknown config key(s): optim.lrr" in capsys.readouterr().err


def test_cli_rejects_locked_run_folder(images, tmp_path, capsys):
    config_file = tmp_path / "tiny.yaml"
    config_file.write_text("run:\n  max_steps: 2\n")
    output_dir = tmp_path / "run"
    output_dir.mkdir()
    # This test process is alive, so its lock is in use.
    holder = {"hostname": socket.gethostname(), "pid": os.getpid(), "started": "09:00"}
    (output_dir / "run.lock").write_text(json.dumps(holder))

    status = pretrain_cli.main(["--config", str(config_file), *tiny_overrides(images, output_dir)])
    assert status == 2
    errors = capsys.readouterr().err
    assert f"run folder {output_dir} is in use: process {os.getpid()}" in errors
    assert "Traceback" not in errors
    assert json.loads((output_dir / "run.lock").read_text()) == holder
    assert sorted(path.name for path in output_dir.iterdir()) == ["run.lock"]


def test_cli_rejects_output_dir_under_file(images, tmp_path, capsys):
    config_file = tmp_path / "tiny.yaml"
    config_file.write_text("run:\n  max_steps: 2\n")
    (tmp_path / "cell.png").write_bytes(b"png")
    output_dir = tmp_path / "cell.png" / "run"

    status = pretrain_cli.main(["--config", str(config_file), *tiny_overrides(images, output_dir)])
    assert status == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1
    assert f"cannot create the run folder run.output_dir={output_dir}" in lines[0]
    assert f"({tmp_path / 'cell.png'} is a file, not a folder)" in lines[0]


def test_cli_sigterm_in_setup_releases_lock(images, tmp_path, monkeypatch):
    def terminated_during_setup(self, *args, **kwargs):
        os.kill(os.getpid(), signal.SIGTERM)

    monkeypatch.setattr(PretrainTrainer, "__init__", terminated_during_setup)
    config_file = tmp_path / "tiny.yaml"
    config_file.write_text("{}\n")
    output_dir = tmp_path / "run"

    with pytest.raises(SystemExit) as exit_info:
        pretrain_cli.main(["--config", str(config_file), *tiny_overrides(images, output_dir)])
    assert exit_info.value.code == 128 + signal.SIGTERM
    assert not (output_dir / "run.lock").exists()
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL


def test_grad_checkpointing_same_weights(images, tmp_path):
    plain, _ = run_tiny(images, tmp_path / "plain", **{"run.max_steps": 2})
    checkpointed, _ = run_tiny(
        images, tmp_path / "checkpointed", **{"run.max_steps": 2, "run.grad_checkpointing": True}
    )
    assert checkpointed.student.backbone.grad_checkpointing
    expected = load_checkpoint(plain.last_checkpoint)["student"]
    actual = load_checkpoint(checkpointed.last_checkpoint)["student"]
    for name, tensor in expected.items():
        assert torch.allclose(actual[name], tensor, atol=1e-6), name


def test_bf16_autocast_close_to_fp32(images, tmp_path):
    settings = {"run.max_steps": 2, "model.drop_path_rate": 0.0}
    full, _ = run_tiny(images, tmp_path / "fp32", **settings)
    half, _ = run_tiny(images, tmp_path / "bf16", **settings, **{"run.precision": "bf16"})
    assert half.precision.name == "bf16"
    assert logged_losses(half) == pytest.approx(logged_losses(full), rel=0.05)
    assert logged_losses(half) != logged_losses(full)


def test_sigterm_saves_checkpoint_and_stops(images, tmp_path, caplog):
    output_dir = tmp_path / "run"
    trainer = _trainer_signalling_at_step(images, output_dir, [signal.SIGTERM])
    with caplog.at_level(logging.WARNING, logger="cytofm.pretrain.trainer"):
        result = trainer.train()
    assert result.step == 2
    assert [step for step, _ in list_checkpoints(output_dir)] == [2]
    assert "received SIGTERM" in caplog.text
    # The default handler is back, so a later SIGTERM would end the process as usual.
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL


def _trainer_signalling_at_step(images, output_dir, signals: list[int]) -> PretrainTrainer:
    """Build a 6-step run whose second step sends ``signals`` to this process."""
    trainer = PretrainTrainer(
        tiny_config(images, output_dir, **{"run.max_steps": 6, "run.save_every_steps": 100}),
        CPU,
    )
    healthy_step = trainer.train_step
    calls = []

    def step_then_signal(*args, **kwargs):
        calls.append(1)
        result = healthy_step(*args, **kwargs)
        if len(calls) == 2:
            for signal_number in signals:
                os.kill(os.getpid(), signal_number)
        return result

    trainer.train_step = step_then_signal
    return trainer


def test_sigint_saves_checkpoint_and_stops(images, tmp_path, caplog):
    output_dir = tmp_path / "run"
    trainer = _trainer_signalling_at_step(images, output_dir, [signal.SIGINT])
    with caplog.at_level(logging.WARNING, logger="cytofm.pretrain"):
        result = trainer.train()
    assert result.step == 2
    assert result.stop_signal == signal.SIGINT
    assert [step for step, _ in list_checkpoints(output_dir)] == [2]
    assert "Press Ctrl-C again to stop at once" in caplog.text
    assert "received SIGINT: saved a checkpoint at step 2 and stopped" in caplog.text
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler


def test_second_sigint_aborts_without_saving(images, tmp_path):
    output_dir = tmp_path / "run"
    trainer = _trainer_signalling_at_step(images, output_dir, [signal.SIGINT, signal.SIGINT])
    with pytest.raises(KeyboardInterrupt):
        trainer.train()
    assert trainer.step == 1
    assert list_checkpoints(output_dir) == []
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler


def test_cli_second_sigint_exits_130(images, tmp_path, capsys, monkeypatch):
    healthy_step = PretrainTrainer.train_step

    def step_then_interrupt_twice(self, *args, **kwargs):
        result = healthy_step(self, *args, **kwargs)
        os.kill(os.getpid(), signal.SIGINT)
        os.kill(os.getpid(), signal.SIGINT)
        return result

    monkeypatch.setattr(PretrainTrainer, "train_step", step_then_interrupt_twice)
    config_file = tmp_path / "tiny.yaml"
    config_file.write_text("run:\n  max_steps: 2\n")
    overrides = tiny_overrides(images, tmp_path / "run")

    assert pretrain_cli.main(["--config", str(config_file), *overrides]) == 130
    errors = capsys.readouterr().err
    assert "interrupted without saving. Run the same command again" in errors
    assert "Traceback" not in errors
    assert not (tmp_path / "run" / "run.lock").exists()


@pytest.mark.parametrize(
    ("signal_number", "expected_status"),
    [(signal.SIGINT, 130), (signal.SIGTERM, 0), (signal.SIGUSR1, 0)],
)
def test_cli_stop_signal_exit_status(
    images, tmp_path, capsys, monkeypatch, signal_number, expected_status
):
    healthy_step = PretrainTrainer.train_step

    def step_then_signal(self, *args, **kwargs):
        result = healthy_step(self, *args, **kwargs)
        os.kill(os.getpid(), signal_number)
        return result

    monkeypatch.setattr(PretrainTrainer, "train_step", step_then_signal)
    config_file = tmp_path / "tiny.yaml"
    config_file.write_text("run:\n  max_steps: 3\n")
    output_dir = tmp_path / "run"

    status = pretrain_cli.main(["--config", str(config_file), *tiny_overrides(images, output_dir)])
    assert status == expected_status
    assert [step for step, _ in list_checkpoints(output_dir)] == [1]
    errors = capsys.readouterr().err
    name = signal.Signals(signal_number).name
    assert f"stopped by {name} at step 1 before the end of the run: exit status" in errors
    assert "done: step" not in errors


class _InterruptOwnProcess(torch.utils.data.Dataset):
    """Sends SIGINT to the process that loads an item, as Ctrl-C does to loader workers."""

    def __len__(self) -> int:
        return 4

    def __getitem__(self, index: int) -> int:
        os.kill(os.getpid(), signal.SIGINT)
        return index


def test_loader_workers_survive_sigint(images, tmp_path):
    config = tiny_config(images, tmp_path / "run", **{"data.num_workers": 1})
    worker_init_fn = build_pretrain_data(config, CPU).loader.worker_init_fn
    loader = torch.utils.data.DataLoader(
        _InterruptOwnProcess(), batch_size=2, num_workers=1, worker_init_fn=worker_init_fn
    )
    assert [batch.tolist() for batch in loader] == [[0, 1], [2, 3]]


def test_resume_with_changed_config_keeps_old(images, tmp_path, caplog):
    output_dir = tmp_path / "run"
    run_tiny(images, output_dir, **{"run.max_steps": 1})
    first = (output_dir / "config.yaml").read_text()
    config = tiny_config(images, output_dir, **{"run.max_steps": 2, "optim.lr": 0.123})
    with caplog.at_level(logging.WARNING, logger="cytofm.pretrain.trainer"):
        PretrainTrainer(config, CPU).train()
    assert "config changed on resume at step 1" in caplog.text
    assert "optim.lr" in caplog.text
    assert (output_dir / "config.before-step1.yaml").read_text() == first
    assert "lr: 0.123" in (output_dir / "config.yaml").read_text()


def test_resume_with_nothing_to_do_keeps_config(images, tmp_path):
    output_dir = tmp_path / "run"
    run_tiny(images, output_dir, **{"run.max_steps": 2})
    config_file = output_dir / "config.yaml"
    with config_file.open("a") as handle:
        handle.write("# note added by hand\n")
    written = config_file.read_text()

    _, result = run_tiny(images, output_dir, **{"run.max_steps": 2, "optim.lr": 0.123})
    assert result.step == 2
    assert config_file.read_text() == written
    assert sorted(output_dir.glob("config*.yaml")) == [config_file]
