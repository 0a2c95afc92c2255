from __future__ import annotations

import pytest
import timm
import torch

from cytofm.models.vit import (
    ARCHITECTURES,
    attention_probabilities,
    build_vit,
    check_img_size,
)


def tiny_vit(**kwargs):
    torch.manual_seed(0)
    options = dict(embed_dim=64, depth=2, num_heads=2, patch_size=8, img_size=32)
    options.update(kwargs)
    return build_vit("vit_small", **options).eval()


def test_presets_match_standard_sizes():
    assert ARCHITECTURES["vit_small"] == (384, 12, 6)
    assert ARCHITECTURES["vit_base"] == (768, 12, 12)
    assert ARCHITECTURES["vit_large"] == (1024, 24, 16)


def test_unmasked_forward_matches_timm_bitwise():
    model = tiny_vit(init_values=1e-5, reg_tokens=2)
    reference = timm.models.vision_transformer.VisionTransformer(
        img_size=32,
        patch_size=8,
        embed_dim=64,
        depth=2,
        num_heads=2,
        num_classes=0,
        init_values=1e-5,
        reg_tokens=2,
        dynamic_img_size=True,
    ).eval()
    state = {k: v for k, v in model.state_dict().items() if k != "mask_token"}
    reference.load_state_dict(state, strict=True)
    images = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        ours = model.forward_tokens(images)
        theirs = reference.forward_features(images)
    assert ours.shape == (3, 3 + 16, 64)
    assert torch.equal(ours, theirs)
    assert torch.equal(model(images), ours[:, 0])


def test_masked_patches_take_mask_token():
    model = tiny_vit()
    with torch.no_grad():
        model.mask_token.normal_()
    images = torch.randn(2, 3, 32, 32)
    masks = torch.zeros(2, 16, dtype=torch.bool)
    masks[0, :5] = True
    with torch.no_grad():
        masked = model.forward_tokens(images, masks)
        plain = model.forward_tokens(images)
        # Image 1 has no masked patch, so it is untouched.
        assert torch.allclose(masked[1], plain[1], atol=1e-6)
        assert not torch.allclose(masked[0], plain[0], atol=1e-3)
        # Masked patches of two different images become identical inputs before pos embed.
        other = torch.randn(2, 3, 32, 32)
        all_masked = torch.ones(2, 16, dtype=torch.bool)
        out_a = model.forward_tokens(images, all_masked)
        out_b = model.forward_tokens(other, all_masked)
    assert torch.allclose(out_a, out_b, atol=1e-6)


@pytest.mark.parametrize(
    ("height", "width", "tokens"), [(32, 32, 16), (96, 96, 144), (64, 40, 40), (16, 48, 12)]
)
def test_any_size_token_count(height, width, tokens):
    model = tiny_vit()
    with torch.no_grad():
        out = model.forward_tokens(torch.randn(1, 3, height, width))
    assert out.shape == (1, 1 + tokens, 64)


def test_non_multiple_size_rejected():
    model = tiny_vit()
    with pytest.raises(ValueError, match="multiple of the patch size 8"):
        model(torch.randn(1, 3, 30, 32))


def test_last_block_attention_rows_sum_to_one():
    model = tiny_vit()
    images = torch.randn(2, 3, 32, 48)
    with torch.no_grad():
        tokens, attention = model.forward_with_attention(images)
        expected_tokens = model.forward_tokens(images)
    assert attention.shape == (2, 2, 25, 25)
    assert torch.allclose(attention.sum(-1), torch.ones(2, 2, 25), atol=1e-5)
    assert torch.allclose(tokens, expected_tokens, atol=1e-6)


def test_attention_probabilities_match_manual():
    model = tiny_vit()
    attn = model.blocks[0].attn
    x = torch.randn(1, 5, 64)
    with torch.no_grad():
        probs = attention_probabilities(attn, x)
        q, k, _ = attn.qkv(x).reshape(1, 5, 3, 2, 32).permute(2, 0, 3, 1, 4)
        manual = torch.softmax(q @ k.transpose(-1, -2) / 32**0.5, dim=-1)
    assert torch.allclose(probs, manual, atol=1e-6)


def test_build_vit_rejects_bad_num_heads():
    with pytest.raises(ValueError) as raised:
        build_vit("vit_small", embed_dim=32, depth=1, num_heads=3, patch_size=8, img_size=32)
    message = str(raised.value)
    assert "num_heads=3 does not divide the width embed_dim=32" in message
    assert "[1, 2, 4, 8, 16, 32]" in message


@pytest.mark.parametrize(
    ("img_size", "nearest"),
    [(60, "56 or 64"), (4, "8"), ((64, 30), "24 or 32")],
)
def test_check_img_size_names_nearest(img_size, nearest):
    with pytest.raises(ValueError) as raised:
        check_img_size(img_size, 8, key="backbone.img_size")
    message = str(raised.value)
    assert f"backbone.img_size={img_size} is not a multiple of the patch size 8" in message
    assert f"use e.g. backbone.img_size={nearest}" in message


def test_check_img_size_accepts_multiples():
    check_img_size(64, 8)
    check_img_size((32, 48), 16)
