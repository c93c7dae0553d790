"""Tiny models shared by the tests (CPU, seconds)."""

import pytest
import timm
import torch


def tiny_timm_vit(**kw):
    return timm.create_model(
        "vit_tiny_patch16_224",
        pretrained=False,
        img_size=32,
        patch_size=8,
        embed_dim=48,
        depth=4,
        num_heads=3,
        num_classes=5,
        **kw,
    ).eval()


def tiny_timm_swin():
    return timm.create_model(
        "swin_tiny_patch4_window7_224",
        pretrained=False,
        img_size=56,
        embed_dim=24,
        depths=(2, 2),
        num_heads=(2, 4),
        window_size=7,
        num_classes=5,
    ).eval()


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
