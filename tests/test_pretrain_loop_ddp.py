"""``cytofm-pretrain`` under ``torchrun`` with two CPU processes (gloo)."""

from __future__ import annotations

import os
import re
import subprocess
import sys

import pytest
import torch

from cytofm.pretrain.checkpoint import load_checkpoint
from cytofm.pretrain.trainer import PretrainTrainer
from tests.pretrain_helpers import (
    CPU,
    REPO_ROOT,
    logged_losses,
    tiny_config,
    tiny_overrides,
    write_random_images,
)

LOSS_LINE = re.compile(r"step (\d+): loss ([0-9.]+) \(cls ([0-9.]+), patch ([0-9.]+)\)")


@pytest.mark.slow
def test_torchrun_matches_single_process(tmp_path):
    images = write_random_images(tmp_path / "images", 16)
    # No stochastic depth: its random draws differ between one process and two.
    settings = {"model.drop_path_rate": 0.0, "run.max_steps": 2, "run.num_threads": 1}

    ddp_dir = tmp_path / "ddp"
    config_file = tmp_path / "empty.yaml"
    config_file.write_text("{}\n")
    overrides = tiny_overrides(images, ddp_dir, **settings, **{"data.batch_size_per_gpu": 2})
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node",
        "2",
        "-m",
        "cytofm.cli.pretrain",
        "--config",
        str(config_file),
        *overrides,
    ]
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT), "OMP_NUM_THREADS": "1"}
    completed = subprocess.run(
        command, env=env, capture_output=True, text=True, timeout=300, check=False
    )
    assert completed.returncode == 0, completed.stderr[-3000:]

    checkpoint_files = sorted(path.name for path in (ddp_dir / "checkpoints").iterdir())
    assert checkpoint_files == ["checkpoint-000000002.pt"]
    ddp_losses = [
        float(match.group(2)) for match in LOSS_LINE.finditer((ddp_dir / "train.log").read_text())
    ]
    assert len(ddp_losses) == 2

    # One process with the same global batch of 4 images.
    single = PretrainTrainer(tiny_config(images, tmp_path / "single", **settings), CPU)
    single.train()
    assert ddp_losses == pytest.approx(logged_losses(single), abs=2e-4)

    ddp_state = load_checkpoint(ddp_dir / "checkpoints" / checkpoint_files[0])
    single_state = load_checkpoint(single.last_checkpoint)
    assert ddp_state["data"]["world_size"] == 2
    for key in ("student", "teacher", "student_head"):
        for name, expected in single_state[key].items():
            assert torch.allclose(ddp_state[key][name], expected, atol=1e-5), f"{key}.{name}"
    assert torch.allclose(ddp_state["loss"]["center"], single_state["loss"]["center"], atol=1e-5)
