"""IBOTLoss against a loop-based reference written from the iBOT formula."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from cytofm.pretrain.loss import IBOTLoss
from cytofm.pretrain.masking import MaskingConfig, generate_masks, masked_token_index

NUM_GLOBAL = 2
NUM_LOCAL = 3
BATCH = 3
K_CLS = 7
K_PATCH = 5


def reference_loss(
    student_cls,
    student_patch,
    teacher_cls,
    teacher_patch,
    mask_image_index,
    center,
    patch_center,
    student_temp,
    teacher_temp,
    teacher_patch_temp,
):
    """Plain double loop over (teacher view, student view) pairs and over images and tokens."""
    num_crops = NUM_GLOBAL + NUM_LOCAL
    student_views = student_cls.chunk(num_crops)
    teacher_views = teacher_cls.chunk(NUM_GLOBAL)

    cls_terms = []
    for q in range(NUM_GLOBAL):
        teacher_probs = F.softmax((teacher_views[q] - center) / teacher_temp, dim=-1)
        for v in range(num_crops):
            if v == q:
                continue
            log_probs = F.log_softmax(student_views[v] / student_temp, dim=-1)
            per_image = [-(teacher_probs[b] * log_probs[b]).sum() for b in range(BATCH)]
            cls_terms.append(torch.stack(per_image).mean())
    cls_loss = torch.stack(cls_terms).mean()

    view_terms = []
    for q in range(NUM_GLOBAL):
        image_terms = []
        for b in range(BATCH):
            image = q * BATCH + b
            token_losses = []
            for token in range(student_patch.shape[0]):
                if int(mask_image_index[token]) != image:
                    continue
                teacher_probs = F.softmax(
                    (teacher_patch[token] - patch_center[0]) / teacher_patch_temp, dim=-1
                )
                log_probs = F.log_softmax(student_patch[token] / student_temp, dim=-1)
                token_losses.append(-(teacher_probs * log_probs).sum())
            if token_losses:
                image_terms.append(torch.stack(token_losses).sum() / len(token_losses))
            else:
                image_terms.append(torch.zeros(()))
        view_terms.append(torch.stack(image_terms).mean())
    patch_loss = torch.stack(view_terms).mean()
    return cls_loss, patch_loss


def make_inputs(seed: int = 0):
    generator = torch.Generator().manual_seed(seed)
    num_crops = NUM_GLOBAL + NUM_LOCAL
    student_cls = torch.randn(num_crops * BATCH, K_CLS, generator=generator) * 3
    teacher_cls = torch.randn(NUM_GLOBAL * BATCH, K_CLS, generator=generator) * 3
    # Images 0..5 (view-major); image 4 has no masked token, image 1 has three.
    mask_image_index = torch.tensor([0, 1, 1, 1, 2, 3, 3, 5])
    num_masked = torch.bincount(mask_image_index, minlength=NUM_GLOBAL * BATCH)
    student_patch = torch.randn(len(mask_image_index), K_PATCH, generator=generator) * 3
    teacher_patch = torch.randn(len(mask_image_index), K_PATCH, generator=generator) * 3
    center = torch.randn(1, K_CLS, generator=generator)
    patch_center = torch.randn(1, K_PATCH, generator=generator)
    return (
        student_cls,
        student_patch,
        teacher_cls,
        teacher_patch,
        mask_image_index,
        num_masked,
        center,
        patch_center,
    )


def build_loss(**kwargs) -> IBOTLoss:
    return IBOTLoss(K_CLS, K_PATCH, NUM_GLOBAL, NUM_LOCAL, **kwargs)


def test_loss_matches_loop_reference():
    (s_cls, s_patch, t_cls, t_patch, index, num_masked, center, patch_center) = make_inputs()
    loss = build_loss(cls_weight=0.5, patch_weight=2.0)
    loss.center.copy_(center)
    loss.patch_center.copy_(patch_center)

    out = loss(s_cls, s_patch, t_cls, t_patch, index, num_masked, 0.1, 0.04, 0.07)
    expected_cls, expected_patch = reference_loss(
        s_cls, s_patch, t_cls, t_patch, index, center, patch_center, 0.1, 0.04, 0.07
    )

    torch.testing.assert_close(out["cls"], expected_cls, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out["patch"], expected_patch, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out["total"], 0.5 * expected_cls + 2.0 * expected_patch)


def test_loss_patch_temp_defaults_to_teacher_temp():
    (s_cls, s_patch, t_cls, t_patch, index, num_masked, _, _) = make_inputs(1)
    loss = build_loss()
    out = loss(s_cls, s_patch, t_cls, t_patch, index, num_masked, 0.1, 0.05)
    zeros_cls, zeros_patch = torch.zeros(1, K_CLS), torch.zeros(1, K_PATCH)
    _, expected_patch = reference_loss(
        s_cls, s_patch, t_cls, t_patch, index, zeros_cls, zeros_patch, 0.1, 0.05, 0.05
    )
    torch.testing.assert_close(out["patch"], expected_patch, rtol=1e-5, atol=1e-5)


def test_loss_gradients_match_reference():
    (s_cls, s_patch, t_cls, t_patch, index, num_masked, center, patch_center) = make_inputs(2)
    s_cls_a = s_cls.clone().requires_grad_(True)
    s_patch_a = s_patch.clone().requires_grad_(True)
    s_cls_b = s_cls.clone().requires_grad_(True)
    s_patch_b = s_patch.clone().requires_grad_(True)
    loss = build_loss()
    loss.center.copy_(center)
    loss.patch_center.copy_(patch_center)

    loss(s_cls_a, s_patch_a, t_cls, t_patch, index, num_masked, 0.1, 0.04)["total"].backward()
    cls_ref, patch_ref = reference_loss(
        s_cls_b, s_patch_b, t_cls, t_patch, index, center, patch_center, 0.1, 0.04, 0.04
    )
    (cls_ref + patch_ref).backward()

    torch.testing.assert_close(s_cls_a.grad, s_cls_b.grad, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(s_patch_a.grad, s_patch_b.grad, rtol=1e-5, atol=1e-6)


def test_loss_same_view_pairs_excluded():
    # Student view 0 equals teacher view 0 exactly, and every other view is uniform. If the
    # (0, 0) pair were counted, the CLS term would change.
    loss = IBOTLoss(4, 4, num_global_crops=1, num_local_crops=1)
    teacher = torch.tensor([[5.0, 0.0, 0.0, 0.0]])
    student = torch.cat([teacher.clone(), torch.zeros(1, 4)])
    empty = torch.zeros(0, 4)
    out = loss(
        student,
        empty,
        teacher,
        empty,
        torch.zeros(0, dtype=torch.long),
        torch.zeros(1),
        1.0,
        1.0,
    )
    # Only the pair (teacher 0, student 1) remains: cross-entropy against uniform is log 4.
    torch.testing.assert_close(out["cls"], torch.log(torch.tensor(4.0)))
    assert out["patch"].item() == 0.0


def test_loss_no_masked_tokens_gives_zero_patch_term():
    (s_cls, _, t_cls, _, _, _, _, _) = make_inputs(3)
    empty = torch.zeros(0, K_PATCH)
    out = build_loss()(
        s_cls,
        empty,
        t_cls,
        empty,
        torch.zeros(0, dtype=torch.long),
        torch.zeros(NUM_GLOBAL * BATCH, dtype=torch.long),
        0.1,
        0.04,
    )
    assert out["patch"].item() == 0.0
    assert torch.isfinite(out["total"])


def test_loss_float32_under_autocast():
    (s_cls, s_patch, t_cls, t_patch, index, num_masked, _, _) = make_inputs(4)
    args = [x.bfloat16() for x in (s_cls, s_patch, t_cls, t_patch)]
    loss = build_loss()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = loss(args[0], args[1], args[2], args[3], index, num_masked, 0.1, 0.04)
    expected = loss(*(x.float() for x in args), index, num_masked, 0.1, 0.04)
    assert out["total"].dtype == torch.float32
    torch.testing.assert_close(out["total"], expected["total"], rtol=1e-6, atol=1e-6)


def test_loss_rejects_wrong_shapes():
    (s_cls, s_patch, t_cls, t_patch, index, num_masked, _, _) = make_inputs()
    loss = build_loss()
    with pytest.raises(ValueError, match="student_cls"):
        loss(s_cls[:-1], s_patch, t_cls, t_patch, index, num_masked, 0.1, 0.04)
    with pytest.raises(ValueError, match="mask_image_index"):
        loss(s_cls, s_patch, t_cls, t_patch, index[:-1], num_masked, 0.1, 0.04)
    with pytest.raises(ValueError, match="num_masked_per_image"):
        loss(s_cls, s_patch, t_cls, t_patch, index, num_masked[:-1], 0.1, 0.04)
    with pytest.raises(ValueError, match="teacher_cls"):
        loss(s_cls, s_patch, t_cls[:-1], t_patch, index, num_masked, 0.1, 0.04)


def test_center_update_exact_on_dyadic_values():
    loss = IBOTLoss(
        3, 2, num_global_crops=2, num_local_crops=0, center_momentum=0.75, patch_center_momentum=0.5
    )
    loss.center.copy_(torch.tensor([[1.0, -2.0, 0.5]]))
    loss.patch_center.copy_(torch.tensor([[4.0, 8.0]]))
    teacher_cls = torch.tensor([[1.0, 2.0, 3.0], [3.0, 2.0, 1.0], [0.0, 0.0, 0.0], [4.0, 4.0, 0.0]])
    teacher_patch = torch.tensor([[2.0, 0.0], [6.0, 4.0]])

    loss.update_center(teacher_cls, teacher_patch)

    # cls mean = [2, 2, 1]; 0.75 * [1, -2, 0.5] + 0.25 * [2, 2, 1] = [1.25, -1, 0.625]
    assert torch.equal(loss.center, torch.tensor([[1.25, -1.0, 0.625]]))
    # patch mean = [4, 2]; 0.5 * [4, 8] + 0.5 * [4, 2] = [4, 5]
    assert torch.equal(loss.patch_center, torch.tensor([[4.0, 5.0]]))


def test_center_update_matches_formula():
    (_, _, t_cls, t_patch, _, _, center, patch_center) = make_inputs(5)
    loss = build_loss(center_momentum=0.9, patch_center_momentum=0.8)
    loss.center.copy_(center)
    loss.patch_center.copy_(patch_center)
    loss.update_center(t_cls, t_patch)
    torch.testing.assert_close(loss.center, center * 0.9 + t_cls.mean(0, keepdim=True) * 0.1)
    expected_patch = patch_center * 0.8 + t_patch.mean(0, keepdim=True) * 0.2
    torch.testing.assert_close(loss.patch_center, expected_patch)


def test_center_update_skips_patch_without_tokens():
    loss = build_loss()
    loss.patch_center.fill_(3.0)
    loss.update_center(torch.ones(NUM_GLOBAL * BATCH, K_CLS), torch.zeros(0, K_PATCH))
    assert torch.equal(loss.patch_center, torch.full((1, K_PATCH), 3.0))
    torch.testing.assert_close(loss.center, torch.full((1, K_CLS), 0.1))


def test_center_in_state_dict():
    loss = build_loss()
    assert set(loss.state_dict()) == {"center", "patch_center"}


def test_teacher_probabilities_centred_and_sharpened():
    loss = build_loss()
    loss.center.copy_(torch.arange(K_CLS, dtype=torch.float32).unsqueeze(0))
    logits = torch.randn(4, K_CLS)
    probs = loss.teacher_probabilities(logits, 0.04)
    expected = F.softmax((logits - loss.center) / 0.04, dim=-1)
    torch.testing.assert_close(probs, expected)


def test_loss_matches_dense_ibot_formulation():
    # iBOT computes the patch term on every token of [B, N, K'] tensors and multiplies by the
    # mask. Selecting masked tokens with masked_token_index must give the same value.
    generator = torch.Generator().manual_seed(11)
    num_tokens = 16
    masks = generate_masks(
        NUM_GLOBAL * BATCH, 4, 4, MaskingConfig(), torch.Generator().manual_seed(3)
    ).masks
    masks[0] = False  # make sure one image has no masked token
    dense_student = torch.randn(NUM_GLOBAL * BATCH, num_tokens, K_PATCH, generator=generator)
    dense_teacher = torch.randn(NUM_GLOBAL * BATCH, num_tokens, K_PATCH, generator=generator)
    s_cls = torch.randn((NUM_GLOBAL + NUM_LOCAL) * BATCH, K_CLS, generator=generator)
    t_cls = torch.randn(NUM_GLOBAL * BATCH, K_CLS, generator=generator)

    index, num_masked = masked_token_index(masks)
    out = build_loss()(
        s_cls, dense_student[masks], t_cls, dense_teacher[masks], index, num_masked, 0.1, 0.04
    )

    teacher_probs = F.softmax(dense_teacher / 0.04, dim=-1)
    token_loss = -(teacher_probs * F.log_softmax(dense_student / 0.1, dim=-1)).sum(-1)
    per_image = (token_loss * masks).sum(-1) / masks.sum(-1).clamp(min=1)
    expected = torch.stack([view.mean() for view in per_image.chunk(NUM_GLOBAL)]).mean()
    torch.testing.assert_close(out["patch"], expected, rtol=1e-5, atol=1e-6)
