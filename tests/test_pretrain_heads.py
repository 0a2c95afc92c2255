"""Projection heads: shapes, state-dict keys, weight-normalised last layer."""

from __future__ import annotations

import pytest
import torch

from cytofm.pretrain.heads import IBOTHead, ProjectionHead, WeightNormLinear
from cytofm.pretrain.teacher import param_groups

IN_DIM, OUT_DIM, HIDDEN, BOTTLENECK = 16, 20, 24, 8


def test_projection_head_shapes_and_keys():
    head = ProjectionHead(IN_DIM, OUT_DIM, hidden_dim=HIDDEN, bottleneck_dim=BOTTLENECK)
    assert head(torch.randn(5, IN_DIM)).shape == (5, OUT_DIM)
    assert list(head.state_dict()) == [
        "mlp.0.weight",
        "mlp.0.bias",
        "mlp.2.weight",
        "mlp.2.bias",
        "mlp.4.weight",
        "mlp.4.bias",
        "last_layer.weight_v",
        "last_layer.weight_g",
    ]
    assert head.state_dict()["last_layer.weight_g"].shape == (OUT_DIM, 1)


def test_projection_head_with_batchnorm_layout():
    head = ProjectionHead(IN_DIM, OUT_DIM, HIDDEN, BOTTLENECK, nlayers=3, use_bn=True)
    linear_indices = [i for i, m in enumerate(head.mlp) if isinstance(m, torch.nn.Linear)]
    assert linear_indices == [0, 3, 6]
    single = ProjectionHead(IN_DIM, OUT_DIM, HIDDEN, BOTTLENECK, nlayers=1)
    assert len(single.mlp) == 1
    assert single(torch.randn(2, IN_DIM)).shape == (2, OUT_DIM)


def test_bottleneck_is_unit_norm():
    head = ProjectionHead(IN_DIM, OUT_DIM, HIDDEN, BOTTLENECK)
    features = head.bottleneck(torch.randn(6, IN_DIM) * 10)
    torch.testing.assert_close(features.norm(dim=-1), torch.ones(6))


def test_weight_norm_linear_matches_formula():
    layer = WeightNormLinear(BOTTLENECK, OUT_DIM, fix_norm=False)
    with torch.no_grad():
        layer.weight_g.uniform_(0.5, 2.0)
    x = torch.randn(3, BOTTLENECK)
    v, g = layer.weight_v, layer.weight_g
    expected = x @ (g * v / v.norm(dim=1, keepdim=True)).T
    torch.testing.assert_close(layer(x), expected)
    torch.testing.assert_close(layer.weight.norm(dim=1), g.squeeze(1))


def train_one_step(head: ProjectionHead) -> None:
    optimizer = torch.optim.AdamW(param_groups(head, weight_decay=0.5), lr=0.1)
    head(torch.randn(8, IN_DIM)).square().sum().backward()
    optimizer.step()


def test_norm_last_layer_keeps_unit_norms():
    head = ProjectionHead(IN_DIM, OUT_DIM, HIDDEN, BOTTLENECK, norm_last_layer=True)
    weight_v_before = head.last_layer.weight_v.detach().clone()
    assert not head.last_layer.weight_g.requires_grad
    train_one_step(head)
    assert not torch.equal(head.last_layer.weight_v, weight_v_before)
    torch.testing.assert_close(head.last_layer.weight.norm(dim=1), torch.ones(OUT_DIM))
    assert torch.equal(head.last_layer.weight_g, torch.ones(OUT_DIM, 1))


def test_free_last_layer_norms_move():
    head = ProjectionHead(IN_DIM, OUT_DIM, HIDDEN, BOTTLENECK, norm_last_layer=False)
    assert head.last_layer.weight_g.requires_grad
    train_one_step(head)
    norms = head.last_layer.weight.norm(dim=1)
    assert (norms - 1).abs().max() > 1e-3


def test_ibot_head_shared_single_pass_equals_separate():
    head = IBOTHead(
        IN_DIM, OUT_DIM, OUT_DIM, shared=True, hidden_dim=HIDDEN, bottleneck_dim=BOTTLENECK
    )
    cls_tokens, patch_tokens = torch.randn(4, IN_DIM), torch.randn(7, IN_DIM)
    cls_logits, patch_logits = head(cls_tokens, patch_tokens)
    assert cls_logits.shape == (4, OUT_DIM)
    assert patch_logits.shape == (7, OUT_DIM)
    torch.testing.assert_close(cls_logits, head.forward_cls(cls_tokens))
    torch.testing.assert_close(patch_logits, head.forward_patch(patch_tokens))
    # Shared: the patch prototypes are the CLS prototypes.
    torch.testing.assert_close(head.forward_patch(cls_tokens), head.forward_cls(cls_tokens))
    assert "patch_last_layer.weight_v" not in head.state_dict()


def test_ibot_head_separate_patch_prototypes():
    head = IBOTHead(IN_DIM, OUT_DIM, 12, shared=False, hidden_dim=HIDDEN, bottleneck_dim=BOTTLENECK)
    cls_tokens, patch_tokens = torch.randn(4, IN_DIM), torch.randn(7, IN_DIM)
    cls_logits, patch_logits = head(cls_tokens, patch_tokens)
    assert cls_logits.shape == (4, OUT_DIM)
    assert patch_logits.shape == (7, 12)
    torch.testing.assert_close(patch_logits, head.forward_patch(patch_tokens))
    keys = set(head.state_dict())
    assert {"patch_last_layer.weight_v", "patch_last_layer.weight_g"} <= keys
    assert not any(key.startswith("patch_mlp") for key in keys)
    only_cls, no_patch = head(cls_tokens)
    assert no_patch is None
    torch.testing.assert_close(only_cls, cls_logits)


def test_ibot_head_shared_needs_equal_dims():
    with pytest.raises(ValueError, match="patch_out_dim"):
        IBOTHead(IN_DIM, OUT_DIM, OUT_DIM + 1, shared=True)


def test_ibot_head_under_bf16_autocast_close_to_fp32():
    torch.manual_seed(0)
    head = IBOTHead(IN_DIM, OUT_DIM, OUT_DIM, hidden_dim=HIDDEN, bottleneck_dim=BOTTLENECK)
    tokens = torch.randn(6, IN_DIM)
    reference = head.forward_cls(tokens)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        low_precision = head.forward_cls(tokens)
    torch.testing.assert_close(low_precision.float(), reference, rtol=0.05, atol=0.02)
