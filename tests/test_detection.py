"""Detection: the project's Mask R-CNN and Cascade Mask R-CNN Swin configs, shrunk, convert with
every backbone Linear and both attention matmuls of every block quantized, per scope."""

from pathlib import Path

import pytest
import torch
from mmdet.models.backbones.swin import SwinBlock
from mmdet.registry import MODELS
from mmdet.utils import register_all_modules
from mmengine.config import Config
from torch import nn

from pfcr_mm.adapters import UnsupportedModelError, prepare, prepare_calibrated
from pfcr_mm.quant.modules import QuantConv2d, QuantLinear
from pfcr_mm.settings import QuantConfig

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ["pfcr_mask_rcnn_swin_t_w4a4.py", "pfcr_cascade_mask_rcnn_swin_t_w4a4.py"]


def _build_small(config: str) -> nn.Module:
    register_all_modules()
    cfg = Config.fromfile(ROOT / "configs" / config)
    cfg.model.backbone.update(embed_dims=16, depths=[2, 2, 2, 2], num_heads=[1, 2, 2, 4])
    cfg.model.neck.in_channels = [16, 32, 64, 128]
    model = MODELS.build(cfg.model)
    model.eval()
    return model


@pytest.mark.slow
@pytest.mark.parametrize("config", CONFIGS)
def test_backbone_fully_quantized(config, assert_every_point_hit_once):
    model = _build_small(config)
    backbone_linears = sum(isinstance(m, nn.Linear) for m in model.backbone.modules())
    head_linears = sum(isinstance(m, nn.Linear) for m in model.modules()) - backbone_linears
    x = torch.randn(1, 3, 64, 96)
    plan = prepare_calibrated(model, QuantConfig(), lambda m: m.backbone(x), scope=["backbone"])
    assert sum(isinstance(m, QuantLinear) for m in model.backbone.modules()) == backbone_linears
    # outside the scope nothing changes
    assert (
        sum(
            isinstance(m, (QuantLinear, QuantConv2d))
            for n, m in model.named_modules()
            if not n.startswith("backbone")
        )
        == 0
    )
    assert head_linears > 0
    n_blocks = sum(isinstance(m, SwinBlock) for m in model.modules())
    assert n_blocks == 8 and len(plan.units) == 2 * n_blocks
    assert assert_every_point_hit_once(model, lambda: model.backbone(x)) == 4 * n_blocks
    assert "everything outside the scope ['backbone']" in plan.fp_parts
    assert {"LayerNorm", "RoIAlign"} <= set(plan.fp_parts)  # the backbone's and the RoI head's


@pytest.mark.slow
def test_scopes_widen_what_is_quantized():
    counts = {}
    for scope in (["backbone"], ["backbone", "neck"], None):
        model = _build_small(CONFIGS[0])
        plan = prepare(model, QuantConfig(), scope=scope)
        counts[str(scope)] = len(plan.quantized_modules)
    assert counts["['backbone']"] < counts["['backbone', 'neck']"] < counts["None"]


def test_unknown_scope_and_blockless_scope_fail_clearly():
    model = _build_small(CONFIGS[0])
    with pytest.raises(ValueError, match=r"\['neckk'\] names no sub-module .*'backbone'"):
        prepare(model, QuantConfig(), scope=["neckk"])
    with pytest.raises(UnsupportedModelError, match="mmdet.models.backbones.swin.SwinBlock"):
        prepare(model, QuantConfig(), scope=["neck"])
