"""Teacher EMA, optimizer parameter groups and the frozen last layer."""

from __future__ import annotations

import pytest
import torch
from timm.models.vision_transformer import VisionTransformer
from torch import nn

from cytofm.pretrain import teacher as teacher_module
from cytofm.pretrain.heads import IBOTHead
from cytofm.pretrain.teacher import cancel_last_layer_gradients, param_groups, update_teacher


def fixed_tensors(seed: int) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    shapes = [(17, 33), (33,), (1, 1, 8), (5, 3, 4, 4), (1000,)]
    return [torch.randn(shape, generator=generator) for shape in shapes]


@pytest.mark.parametrize("momentum", [0.996, 0.9, 0.5, 0.0, 1.0])
def test_update_teacher_bitwise_equal_to_formula(momentum):
    student = fixed_tensors(0)
    teacher = fixed_tensors(1)
    expected = [t * momentum + s * (1.0 - momentum) for s, t in zip(student, teacher)]
    update_teacher(student, teacher, momentum)
    for got, want in zip(teacher, expected):
        assert torch.equal(got, want)


def test_update_teacher_momentum_one_keeps_teacher():
    student = fixed_tensors(0)
    teacher = fixed_tensors(1)
    before = [t.clone() for t in teacher]
    update_teacher(student, teacher, 1.0)
    for got, want in zip(teacher, before):
        assert torch.equal(got, want)


def test_update_teacher_in_chunks(monkeypatch):
    monkeypatch.setattr(teacher_module, "_EMA_CHUNK_ELEMENTS", 100)
    student = fixed_tensors(2)
    teacher = fixed_tensors(3)
    expected = [t * 0.99 + s * (1.0 - 0.99) for s, t in zip(student, teacher)]
    update_teacher(student, teacher, 0.99)
    for got, want in zip(teacher, expected):
        assert torch.equal(got, want)


def test_update_teacher_on_parameters():
    student = nn.Linear(4, 3)
    teacher = nn.Linear(4, 3)
    expected = [
        t.detach() * 0.9 + s.detach() * 0.1
        for s, t in zip(student.parameters(), teacher.parameters())
    ]
    update_teacher(student.parameters(), teacher.parameters(), 0.9)
    for got, want in zip(teacher.parameters(), expected):
        assert torch.equal(got.detach(), want)
        assert got.grad is None


def test_update_teacher_rejects_mismatch():
    with pytest.raises(ValueError, match="parameters"):
        update_teacher(fixed_tensors(0), fixed_tensors(1)[:-1], 0.9)
    with pytest.raises(ValueError, match="shape"):
        update_teacher([torch.zeros(3)], [torch.zeros(4)], 0.9)
    with pytest.raises(ValueError, match="momentum"):
        update_teacher([torch.zeros(3)], [torch.zeros(3)], 1.5)


def tiny_model() -> nn.ModuleDict:
    backbone = VisionTransformer(
        img_size=16,
        patch_size=8,
        embed_dim=16,
        depth=1,
        num_heads=2,
        num_classes=0,
        reg_tokens=2,
    )
    backbone.mask_token = nn.Parameter(torch.zeros(1, 1, 16))
    head = IBOTHead(16, 10, 10, hidden_dim=12, bottleneck_dim=8, norm_last_layer=False)
    return nn.ModuleDict({"backbone": backbone, "head": head})


def test_param_groups_names():
    model = tiny_model()
    groups = param_groups(model, weight_decay=0.04)
    by_decay = {group["apply_weight_decay"]: group for group in groups}
    decay_names = set(by_decay[True]["param_names"])
    no_decay_names = set(by_decay[False]["param_names"])

    assert by_decay[True]["weight_decay"] == 0.04
    assert by_decay[False]["weight_decay"] == 0.0
    for name in [
        "backbone.cls_token",
        "backbone.reg_token",
        "backbone.mask_token",
        "backbone.pos_embed",
        "backbone.patch_embed.proj.bias",
        "backbone.blocks.0.norm1.weight",
        "backbone.blocks.0.attn.qkv.bias",
        "backbone.norm.weight",
        "head.mlp.0.bias",
        "head.last_layer.weight_g",
    ]:
        assert name in no_decay_names, name
    for name in [
        "backbone.patch_embed.proj.weight",
        "backbone.blocks.0.attn.qkv.weight",
        "backbone.blocks.0.mlp.fc1.weight",
        "head.mlp.0.weight",
        "head.last_layer.weight_v",
    ]:
        assert name in decay_names, name
    all_names = {name for name, _ in model.named_parameters()}
    assert decay_names | no_decay_names == all_names
    assert not decay_names & no_decay_names
    # The groups hold the very parameter objects, in name order.
    parameters = dict(model.named_parameters())
    for group in groups:
        assert all(p is parameters[n] for p, n in zip(group["params"], group["param_names"]))


def test_param_groups_skip_frozen_and_work_with_adamw():
    head = IBOTHead(16, 10, 10, hidden_dim=12, bottleneck_dim=8, norm_last_layer=True)
    groups = param_groups(head, weight_decay=0.1)
    names = [name for group in groups for name in group["param_names"]]
    assert "last_layer.weight_g" not in names
    optimizer = torch.optim.AdamW(groups, lr=1e-3)
    assert len(optimizer.param_groups) == 2


def test_cancel_last_layer_gradients():
    head = IBOTHead(16, 10, 6, shared=False, hidden_dim=12, bottleneck_dim=8)
    cls_logits, patch_logits = head(torch.randn(3, 16), torch.randn(4, 16))
    (cls_logits.sum() + patch_logits.sum()).backward()

    cancel_last_layer_gradients(head, epoch=1, freeze_last_layer_epochs=1)
    assert head.last_layer.weight_v.grad is not None

    cancel_last_layer_gradients(head, epoch=0, freeze_last_layer_epochs=1)
    assert head.last_layer.weight_v.grad is None
    assert head.patch_last_layer.weight_v.grad is None
    assert head.mlp[0].weight.grad is not None
