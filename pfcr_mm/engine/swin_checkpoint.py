"""Converting Swin-Transformer-Object-Detection (mmdet 2.x) detector checkpoints to mmdet 3.x.

The papers' Cascade Mask R-CNN Swin numbers come from Microsoft's Swin-Transformer-Object-Detection
release, whose backbone keys follow the original Swin code (``layers.i.blocks.j.attn.qkv``,
``mlp.fc1``, ``patch_embed.proj``, a PatchMerging that concatenates the four 2x2 neighbours in
another order than mmdet's ``nn.Unfold``). mmdet ships the backbone key map and PatchMerging
re-ordering as ``swin_converter``; the neck and heads keep their names between mmdet 2.x and 3.x.
"""

from __future__ import annotations

import torch
from mmdet.models.backbones.swin import swin_converter


def convert_swin_detector_state(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Map a Swin-Transformer-Object-Detection detector state dict to mmdet 3.x keys."""
    prefix = "backbone."
    backbone = {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}
    if not any(k.startswith("layers.") for k in backbone):
        raise KeyError(
            "no 'backbone.layers.*' keys: this is not a Swin-Transformer-Object-Detection "
            "checkpoint (mmdet 3.x Swin checkpoints need no conversion)"
        )
    out = dict(swin_converter(backbone))
    out.update({k: v for k, v in state.items() if not k.startswith(prefix)})
    return out


def state_mismatch(state: dict[str, torch.Tensor], model: torch.nn.Module) -> list[str]:
    """Human-readable differences between ``state`` and the model's own state dict (empty when
    keys and shapes all match)."""
    expected = model.state_dict()
    problems = [f"missing: {k}" for k in sorted(set(expected) - set(state))]
    problems += [f"unexpected: {k}" for k in sorted(set(state) - set(expected))]
    problems += [
        f"shape of {k}: checkpoint {tuple(state[k].shape)} vs model {tuple(v.shape)}"
        for k, v in expected.items()
        if k in state and state[k].shape != v.shape
    ]
    return problems
