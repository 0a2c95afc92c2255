"""Cosine and warmup schedules: boundary values and the Schedules helper."""

from __future__ import annotations

import math

import pytest

from cytofm.pretrain.schedules import (
    Schedules,
    cosine_schedule,
    linear_warmup_then_constant,
    scale_learning_rate,
)


def test_cosine_warmup_boundaries():
    total, warmup = 100, 10
    assert cosine_schedule(0, total, 1.0, 0.1, warmup, 0.2) == 0.2
    assert cosine_schedule(5, total, 1.0, 0.1, warmup, 0.2) == pytest.approx(0.6)
    assert cosine_schedule(warmup, total, 1.0, 0.1, warmup, 0.2) == 1.0
    assert cosine_schedule(total - 1, total, 1.0, 0.1, warmup, 0.2) == 0.1
    assert cosine_schedule(total + 50, total, 1.0, 0.1, warmup, 0.2) == 0.1


def test_cosine_midpoint_and_monotone():
    total = 101
    # The decay covers steps 0..100, so step 50 is halfway.
    assert cosine_schedule(50, total, 1.0, 0.0) == pytest.approx(0.5)
    values = [cosine_schedule(step, total, 1.0, 0.0) for step in range(total)]
    assert values[0] == 1.0
    assert all(a >= b for a, b in zip(values, values[1:]))


def test_cosine_increasing_schedule():
    # Teacher momentum rises from 0.996 to 1.
    assert cosine_schedule(0, 10, 0.996, 1.0) == 0.996
    assert cosine_schedule(9, 10, 0.996, 1.0) == 1.0
    assert 0.996 < cosine_schedule(4, 10, 0.996, 1.0) < 1.0


def test_cosine_warmup_filling_run_ends_at_final():
    assert cosine_schedule(4, 5, 1.0, 0.5, warmup_steps=4) == 0.5
    assert cosine_schedule(0, 1, 1.0, 0.5) == 0.5


def test_cosine_rejects_invalid():
    with pytest.raises(ValueError):
        cosine_schedule(-1, 10, 1.0, 0.0)
    with pytest.raises(ValueError):
        cosine_schedule(0, 0, 1.0, 0.0)


def test_linear_warmup_then_constant_boundaries():
    assert linear_warmup_then_constant(0, 30, 0.04, 0.07) == 0.04
    assert linear_warmup_then_constant(15, 30, 0.04, 0.07) == pytest.approx(0.055)
    assert linear_warmup_then_constant(30, 30, 0.04, 0.07) == 0.07
    assert linear_warmup_then_constant(1000, 30, 0.04, 0.07) == 0.07
    assert linear_warmup_then_constant(0, 0, 0.04, 0.07) == 0.07


def test_scale_learning_rate():
    assert scale_learning_rate(5e-4, 1024) == pytest.approx(2e-3)
    assert scale_learning_rate(5e-4, 256) == 5e-4
    with pytest.raises(ValueError):
        scale_learning_rate(5e-4, 0)


def test_schedules_boundaries_from_epochs():
    schedules = Schedules.from_epochs(
        epochs=100,
        steps_per_epoch=10,
        lr=2e-3,
        lr_warmup_epochs=10,
        teacher_temp_warmup_epochs=30,
        min_lr=1e-6,
    )
    assert schedules.total_steps == 1000
    start = schedules(0)
    assert start.lr == 0.0
    assert start.weight_decay == 0.04
    assert start.teacher_momentum == 0.996
    assert start.teacher_temp == 0.04
    assert start.teacher_patch_temp == 0.04

    assert schedules(100).lr == 2e-3
    assert schedules(300).teacher_temp == 0.07
    assert schedules(300).teacher_patch_temp == 0.07
    assert schedules(299).teacher_temp < 0.07

    end = schedules(999)
    assert end.lr == 1e-6
    assert end.weight_decay == 0.4
    assert end.teacher_momentum == 1.0


def test_schedules_pure_function_of_step():
    schedules = Schedules(total_steps=50, lr=1.0, lr_warmup_steps=5)
    assert schedules(17) == schedules(17)
    expected = 1e-6 + 0.5 * (1.0 - 1e-6) * (1 + math.cos(math.pi * (17 - 5) / (50 - 1 - 5)))
    assert schedules(17).lr == pytest.approx(expected)
