"""Collapse signals and the collapse warning."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from cytofm.pretrain.monitoring import CollapseThresholds, collapse_signals, detect_collapse

N, K, D = 64, 32, 48


def healthy_inputs():
    generator = torch.Generator().manual_seed(0)
    logits = torch.randn(N, K, generator=generator) / 0.1
    embeddings = torch.randn(N, D, generator=generator)
    return F.softmax(logits, dim=-1), embeddings


def test_healthy_batch_has_no_warning():
    probs, embeddings = healthy_inputs()
    signals = collapse_signals(probs, embeddings)
    assert detect_collapse(signals) is None
    assert signals["teacher_information_ratio"] > 0.3
    assert signals["active_prototypes"] > 10


def test_constant_teacher_outputs_warn():
    probs, embeddings = healthy_inputs()
    constant = probs[:1].expand(N, K)
    signals = collapse_signals(constant, embeddings)
    assert signals["teacher_information_ratio"] == pytest.approx(0.0, abs=1e-6)
    assert signals["top_prototype_share"] == 1.0
    assert signals["active_prototypes"] == 1.0
    warning = detect_collapse(signals)
    assert warning is not None
    assert "barely depend on the image" in warning


def test_uniform_teacher_outputs_warn():
    _, embeddings = healthy_inputs()
    uniform = torch.full((N, K), 1.0 / K)
    signals = collapse_signals(uniform, embeddings)
    assert signals["teacher_entropy"] == pytest.approx(math.log(K), rel=1e-5)
    assert signals["teacher_entropy_ratio"] == pytest.approx(1.0, rel=1e-5)
    warning = detect_collapse(signals)
    assert warning is not None
    assert "near uniform" in warning


def test_identical_embeddings_warn():
    probs, _ = healthy_inputs()
    embeddings = torch.randn(1, D).expand(N, D)
    signals = collapse_signals(probs, embeddings)
    assert signals["cls_std"] == pytest.approx(0.0, abs=1e-5)
    warning = detect_collapse(signals)
    assert warning is not None
    assert "CLS embeddings" in warning


def test_cls_std_near_one_for_spread_embeddings():
    generator = torch.Generator().manual_seed(1)
    embeddings = torch.randn(4096, D, generator=generator)
    signals = collapse_signals(torch.full((4096, K), 1.0 / K), embeddings)
    assert signals["cls_std"] == pytest.approx(1.0, abs=0.05)


def test_prototype_share_checked_only_for_large_batches():
    probs = F.one_hot(torch.tensor([0, 0, 0, 1]), K).float() * 0.9 + 0.1 / K
    embeddings = torch.randn(4, D)
    signals = collapse_signals(probs, embeddings)
    limits = CollapseThresholds(min_teacher_information_ratio=0.0, max_top_prototype_share=0.5)
    assert detect_collapse(signals, limits) is None
    limits.min_batch_for_share = 4
    assert "one prototype" in detect_collapse(signals, limits)


def test_information_ratio_one_for_distinct_one_hot():
    probs = torch.eye(K)[:16]
    signals = collapse_signals(probs, torch.randn(16, D))
    assert signals["teacher_information_ratio"] == pytest.approx(1.0, abs=1e-5)
    assert signals["teacher_entropy"] == pytest.approx(0.0, abs=1e-5)


def test_detect_collapse_silent_before_start_step():
    probs, embeddings = healthy_inputs()
    signals = collapse_signals(probs[:1].expand(N, K), embeddings)
    limits = CollapseThresholds(start_step=100)
    assert detect_collapse(signals, limits, step=99) is None
    assert detect_collapse(signals, limits, step=100) is not None
    assert detect_collapse(signals, limits) is not None
