"""The shipped demo config trains on the synthetic demo set and on real smears.

iBOT's CLS loss is a cross-entropy: the teacher's entropy plus the KL divergence between
teacher and student. Over the first few dozen steps the entropy part rises (the centre settles
and the temperature warms up), so the total can rise while the student learns. These tests
check the KL part, ``loss/cls_kl``, which falls only if the student learns to predict the
teacher.
"""

from __future__ import annotations

import math
from pathlib import Path

import pytest

from cytofm.data.demo import generate_demo_set
from cytofm.pretrain.config import load_pretrain_config
from cytofm.pretrain.trainer import PretrainTrainer
from tests.pretrain_helpers import CPU, DEMO_CONFIG


def _train_demo_config(images: Path, output_dir: Path, *extra: str) -> list[dict[str, float]]:
    overrides = [
        f"data.sources=[{{path: '{images}'}}]",
        f"run.output_dir={output_dir}",
        "data.batch_size_per_gpu=8",
        "data.num_workers=0",
        "run.max_steps=24",
        "run.log_every_steps=1",
        "run.num_threads=1",
        "run.progress_bar=false",
        *extra,
    ]
    trainer = PretrainTrainer(load_pretrain_config(DEMO_CONFIG, overrides), CPU)
    result = trainer.train()
    assert result.step == 24
    return trainer.metrics.history


def _assert_student_learns(history: list[dict[str, float]]) -> None:
    assert len(history) == 24
    assert all(math.isfinite(entry["loss/total"]) for entry in history)
    kl = [entry["loss/cls_kl"] for entry in history]
    first = sum(kl[:3]) / 3
    last = sum(kl[-8:]) / 8
    assert last < 0.6 * first, f"KL part of the CLS loss did not fall: {kl}"


@pytest.mark.slow
def test_demo_config_learns_on_demo_set(tmp_path):
    demo = tmp_path / "demo"
    generate_demo_set(demo, num_images=48, image_size=128, seed=1)
    _assert_student_learns(_train_demo_config(demo / "images", tmp_path / "run"))


@pytest.mark.slow
@pytest.mark.realdata
def test_demo_config_learns_on_smears(shared_data, tmp_path):
    images = shared_data / "rbc-smears" / "images"
    history = _train_demo_config(images, tmp_path / "run", "data.samples_per_epoch=96")
    _assert_student_learns(history)
