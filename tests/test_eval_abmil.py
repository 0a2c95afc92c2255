"""Tests of the bag-level heads: padding, masking, and the gated attention formula."""

from __future__ import annotations

import pytest
import torch

from cytofm.evaluation.abmil import (
    GatedAttentionMIL,
    MeanPoolingMIL,
    StandardizedHead,
    build_mil_head,
    feature_statistics,
    pad_bags,
)


def _head(kind: str) -> torch.nn.Module:
    torch.manual_seed(0)
    return build_mil_head(kind, 12, 3, hidden_dim=16, attention_dim=8, dropout=0.25).eval()


@pytest.mark.parametrize("kind", ["abmil", "mean"])
def test_padded_bag_matches_bare_bag(kind):
    head = _head(kind)
    short = torch.randn(5, 12)
    long = torch.randn(9, 12)
    features, mask = pad_bags([short, long])
    with torch.no_grad():
        padded = head(features, mask)
        bare = head(short.unsqueeze(0))
    torch.testing.assert_close(padded.logits[0], bare.logits[0], rtol=0, atol=1e-6)
    torch.testing.assert_close(padded.attention[0, :5], bare.attention[0], rtol=0, atol=1e-6)


@pytest.mark.parametrize("kind", ["abmil", "mean"])
def test_attention_sums_to_one_zero_on_padding(kind):
    head = _head(kind)
    features, mask = pad_bags([torch.randn(n, 12) for n in (1, 4, 7)])
    with torch.no_grad():
        attention = head(features, mask).attention
    sums = attention.sum(dim=1)
    torch.testing.assert_close(sums, torch.ones(3), rtol=0, atol=1e-6)
    assert torch.equal(attention[~mask], torch.zeros(int((~mask).sum())))
    assert bool((attention[mask] > 0).all())


def test_padding_values_do_not_leak():
    head = _head("abmil")
    features, mask = pad_bags([torch.randn(3, 12), torch.randn(6, 12)])
    poisoned = features.clone()
    poisoned[0, 3:] = float("nan")
    with torch.no_grad():
        clean = head(features, mask)
        dirty = head(poisoned, mask)
    assert torch.equal(clean.logits, dirty.logits)
    assert torch.equal(clean.attention, dirty.attention)


def test_gated_attention_matches_formula():
    head = _head("abmil")
    assert isinstance(head, GatedAttentionMIL)
    bag = torch.randn(6, 12)
    with torch.no_grad():
        output = head(bag.unsqueeze(0))
        linear, _, _ = head.embed
        h = torch.relu(bag @ linear.weight.T + linear.bias)
        v = torch.tanh(h @ head.attention_v.weight.T + head.attention_v.bias)
        u = torch.sigmoid(h @ head.attention_u.weight.T + head.attention_u.bias)
        scores = (v * u) @ head.attention_w.weight.T + head.attention_w.bias
        weights = torch.exp(scores - scores.max())
        weights = (weights / weights.sum()).squeeze(1)
        pooled = weights @ h
        logits = pooled @ head.classifier.weight.T + head.classifier.bias
    torch.testing.assert_close(output.attention[0], weights, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(output.logits[0], logits, rtol=1e-5, atol=1e-6)


def test_mean_head_is_linear_on_mean():
    head = _head("mean")
    assert isinstance(head, MeanPoolingMIL)
    bag = torch.randn(4, 12)
    with torch.no_grad():
        logits = head(bag.unsqueeze(0)).logits[0]
        expected = head.classifier(bag.mean(dim=0))
    torch.testing.assert_close(logits, expected, rtol=1e-5, atol=1e-6)


def test_head_sizes_configurable():
    head = GatedAttentionMIL(10, 4, hidden_dim=7, attention_dim=5, dropout=0.1)
    assert head.embed[0].weight.shape == (7, 10)
    assert head.attention_v.weight.shape == (5, 7)
    assert head.classifier.weight.shape == (4, 7)
    assert head.embed[2].p == 0.1
    defaults = GatedAttentionMIL(10, 2)
    assert defaults.embed[0].out_features == 512
    assert defaults.attention_v.out_features == 256
    assert defaults.embed[2].p == 0.25


def test_empty_bag_in_batch_raises():
    head = _head("abmil")
    features = torch.randn(2, 3, 12)
    mask = torch.tensor([[True, True, False], [False, False, False]])
    with pytest.raises(ValueError, match=r"positions \[1\]"):
        head(features, mask)


def test_single_class_rejected():
    with pytest.raises(ValueError, match="num_classes"):
        GatedAttentionMIL(8, 1)
    with pytest.raises(ValueError, match="unknown MIL head"):
        build_mil_head("max", 8, 2)


def test_pad_bags_shapes_and_mask():
    features, mask = pad_bags([torch.ones(2, 3), torch.ones(4, 3)])
    assert features.shape == (2, 4, 3)
    assert mask.tolist() == [[True, True, False, False], [True, True, True, True]]
    assert torch.equal(features[0, 2:], torch.zeros(2, 3))


def test_feature_statistics_match_concatenation():
    bags = [torch.randn(n, 5) * 3 + 2 for n in (4, 7, 1, 9)]
    mean, std = feature_statistics(bags, [0, 2, 3])
    stacked = torch.cat([bags[0], bags[2], bags[3]])
    torch.testing.assert_close(mean, stacked.mean(dim=0), rtol=0, atol=1e-5)
    torch.testing.assert_close(std, stacked.std(dim=0, correction=0), rtol=0, atol=1e-5)


def test_standardized_head_padding_and_scale():
    head = _head("abmil")
    mean, std = torch.full((12,), 5.0), torch.full((12,), 10.0)
    wrapped = StandardizedHead(head, mean, std).eval()
    short, long = torch.randn(3, 12), torch.randn(8, 12)
    features, mask = pad_bags([short * 10 + 5, long * 10 + 5])
    with torch.no_grad():
        padded = wrapped(features, mask)
        direct = head(short.unsqueeze(0))
    torch.testing.assert_close(padded.logits[0], direct.logits[0], rtol=0, atol=1e-5)
    assert torch.equal(padded.attention[0, 3:], torch.zeros(5))
    assert set(wrapped.state_dict()) >= {"mean", "std"}
