"""ViTDet detectors: the project's configs build with MMDetection's parameter names and load such
a checkpoint strictly; the whole detector quantizes with the simple FPN's transposed
convolutions and the neck as one part; backbone and simple FPN export through onnxruntime."""

from pathlib import Path

import pytest
import torch
from mmdet.registry import MODELS
from mmdet.utils import register_all_modules
from mmengine.config import Config
from torch import nn

from pfcr_mm.adapters import prepare, prepare_calibrated
from pfcr_mm.engine.checkpoint import load_weights_strict
from pfcr_mm.engine.deploy import DetectorFeatures
from pfcr_mm.export import export_onnx
from pfcr_mm.export.runtime import FixedSizeRunner, cpu_session
from pfcr_mm.models.vitdet import SimpleFPN, ViTDet
from pfcr_mm.quant.modules import QUANT_LAYERS, QuantConvTranspose2d
from pfcr_mm.settings import QuantConfig

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ["pfcr_mask_rcnn_vitdet_b_w4a4.py", "pfcr_cascade_mask_rcnn_vitdet_b_w4a4.py"]
SMALL = dict(
    img_size=64,
    embed_dim=32,
    depth=3,
    num_heads=2,
    patch_size=8,
    window_size=3,
    window_block_indexes=(0, 2),
    pretrain_img_size=48,
)
SMALL_NECK = dict(backbone_channel=32, in_channels=[8, 16, 32, 32], out_channels=256)


def _build(config: str, small: bool = True) -> nn.Module:
    import pfcr_mm.engine  # noqa: F401  (the pfcr scope of the configs)

    register_all_modules()
    cfg = Config.fromfile(ROOT / "configs" / config)
    if small:
        cfg.model.backbone.update(SMALL)
        cfg.model.neck.update(SMALL_NECK)
    return MODELS.build(cfg.model).eval()


@pytest.mark.parametrize("config", CONFIGS)
def test_checkpoint_with_mmdet_names_loads_strictly(config, tmp_path):
    torch.manual_seed(0)
    model = _build(config)
    state = model.state_dict()
    # backbone and neck: the names of the modules (tests/test_vitdet.py checks them against
    # MMDetection's); heads: mmdet's own, with LN2d named norm_layer as mmcv names it
    backbone = {f"backbone.{k}" for k in ViTDet(**SMALL).state_dict()}
    neck = {f"neck.{k}" for k in SimpleFPN(**SMALL_NECK, num_outs=5).state_dict()}
    assert backbone | neck <= set(state)
    assert not any(k.startswith(("backbone.", "neck.")) for k in set(state) - backbone - neck)
    stage = ".0" if "cascade" in config else ""
    assert f"roi_head.bbox_head{stage}.shared_convs.3.norm_layer.weight" in state
    assert f"roi_head.mask_head{stage}.convs.3.norm_layer.bias" in state
    torch.save({"state_dict": state, "meta": {}}, tmp_path / "ckpt.pth")
    torch.manual_seed(1)
    fresh = _build(config)
    load_weights_strict(fresh, tmp_path / "ckpt.pth")
    assert all(torch.equal(v, state[k]) for k, v in fresh.state_dict().items())


@pytest.mark.slow  # the full-size ViT-B Mask R-CNN (about 10 s to build)
def test_vit_b_config_has_the_released_shapes():
    state = _build(CONFIGS[0], small=False).state_dict()
    shapes = {
        "backbone.pos_embed": (1, 14 * 14 + 1, 768),  # MAE's 224 pretraining grid, class token
        "backbone.patch_embed.proj.weight": (768, 3, 16, 16),
        "backbone.blocks.0.attn.rel_pos_h": (27, 64),  # window 14
        "backbone.blocks.2.attn.rel_pos_w": (127, 64),  # global at 1024 / 16 = 64
        "backbone.blocks.11.mlp.fc2.weight": (768, 3072),
        "neck.fpn1.0.weight": (768, 384, 2, 2),
        "neck.fpn1.1.weight": (384,),
        "neck.fpn1.3.weight": (384, 192, 2, 2),
        "neck.fpn2.0.weight": (768, 384, 2, 2),
        "neck.lateral_convs.0.conv.weight": (256, 192, 1, 1),
        "neck.fpn_convs.3.norm_layer.bias": (256,),
        "rpn_head.rpn_conv.1.conv.weight": (256, 256, 3, 3),
    }
    assert {k: tuple(state[k].shape) for k in shapes} == shapes
    assert sum(k.startswith("backbone.blocks.") for k in state) == 12 * 14
    assert "neck.lateral_convs.0.conv.bias" not in state  # a conv before a norm has none


@pytest.mark.slow  # full-size heads: their weight range searches take seconds
def test_whole_detector_quantized_with_the_neck_as_one_part():
    model = _build(CONFIGS[0])
    plan = prepare(model, QuantConfig())
    deconvs = [m for m in model.neck.modules() if isinstance(m, nn.ConvTranspose2d)]
    assert len(deconvs) == 3 and all(isinstance(m, QuantConvTranspose2d) for m in deconvs)
    upsample = model.roi_head.mask_head.upsample  # the mask head's stays in floating point
    assert not isinstance(upsample, QuantConvTranspose2d) and "ConvTranspose2d" in plan.fp_parts
    assert [(n, roi) for n, _, roi in plan.parts] == [
        ("neck", False),
        ("rpn_head", False),
        ("roi_head.bbox_head", True),
        ("roi_head.mask_head", True),
    ]
    assert {"LN2d", "LayerNorm"} <= set(plan.fp_parts)
    features = [n for n in plan.quantized_modules if n.startswith(("backbone.", "neck."))]
    assert len(features) == 1 + 4 * 3 + 3 + 8


@pytest.mark.slow
def test_backbone_and_simple_fpn_through_onnxruntime(tmp_path):
    model = _build(CONFIGS[0])
    size = (64, 80)  # an 8x10 token map: windows of 3 pad it to 9x12
    batches = [torch.randn(2, 3, *size) for _ in range(2)]
    prepare_calibrated(
        model,
        QuantConfig(w_bits=4, a_bits=4),
        lambda m: [m.extract_feat(b) for b in batches],
        ["backbone", "neck"],
    )
    dense = DetectorFeatures(model).eval()
    path = tmp_path / "vitdet.onnx"
    report = export_onnx(dense, torch.randn(1, 3, *size), path, dynamic_batch=False)
    layers = [m for m in dense.modules() if isinstance(m, QUANT_LAYERS)]
    assert report["integer_weight_layers"] == len(layers) == 1 + 4 * 3 + 3 + 8
    images = torch.randn(2, 3, *size)
    with torch.no_grad():
        ref = dense(images)
    got = FixedSizeRunner(cpu_session(path))(images)
    for g, r in zip(got, ref, strict=True):  # the tolerance of tests/test_export_det.py
        scale = float(r.max() - r.min())
        diff = (g - r).abs()
        assert float(diff.max()) <= 0.02 * scale
        assert float((diff > 1e-4 * scale).float().mean()) <= 0.01
