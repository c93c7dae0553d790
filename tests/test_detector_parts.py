"""A detector's neck and heads as reconstruction units: BatchNorm folded exactly, RoIs pinned to
the FP model's so the quantized heads' inputs pair up with the FP targets, and the heads
reconstructed from cached inputs without labels."""

from pathlib import Path

import pytest
import torch
from mmcv.cnn import ConvModule
from mmdet.registry import MODELS
from mmdet.structures import DetDataSample
from mmdet.utils import register_all_modules
from mmengine.config import Config
from torch import nn

from pfcr_mm.adapters import prepare_calibrated
from pfcr_mm.adapters.mmdet_parts import fold_batchnorm
from pfcr_mm.quant.config import QuantConfig
from pfcr_mm.recon import ChainDataSource, LayerUnit, ReconSettings, run_reconstruction

ROOT = Path(__file__).resolve().parents[1]
DEMO = ROOT / "configs/demo/demo_mask_rcnn_swin_shapes.py"


def test_batchnorm_folding_is_exact_in_fp():
    torch.manual_seed(0)
    head = nn.Sequential(
        ConvModule(8, 16, 3, padding=1, norm_cfg=dict(type="BN")),
        ConvModule(16, 16, 3, padding=1, bias=True, norm_cfg=dict(type="BN")),
        ConvModule(16, 4, 1),  # no norm: left as it is
    ).eval()
    for m in head.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-1, 1)
            m.running_var.uniform_(0.5, 2)
            m.weight.data.uniform_(0.5, 1.5)
            m.bias.data.uniform_(-0.5, 0.5)
    x = torch.randn(2, 8, 10, 10)
    with torch.no_grad():
        before = head(x)
        assert fold_batchnorm(head) == ["0", "1"]
        after = head(x)
    assert not any(isinstance(m, nn.BatchNorm2d) for m in head.modules())
    torch.testing.assert_close(after, before, atol=1e-5, rtol=1e-5)


@pytest.fixture(scope="module")
def quantized_detector():
    """The demo detector (random weights) at W4A4 over the whole model, calibrated on 2 batches
    of 2 random 160x160 images, and a ``run_batch`` in tensor mode."""
    register_all_modules()
    torch.manual_seed(0)
    model = MODELS.build(Config.fromfile(DEMO).model).eval()
    meta = dict(img_shape=(160, 160), ori_shape=(160, 160), scale_factor=(1.0, 1.0))
    meta["batch_input_shape"] = (160, 160)
    batches = [
        {
            "inputs": torch.randn(2, 3, 160, 160),
            "data_samples": [DetDataSample(metainfo=meta) for _ in range(2)],
        }
        for _ in range(2)
    ]

    def run_batch(m, batch):
        return m(batch["inputs"], batch["data_samples"], mode="tensor")

    plan = prepare_calibrated(
        model, QuantConfig(w_bits=4, a_bits=4), lambda m: [run_batch(m, b) for b in batches]
    )
    return model, plan, batches, run_batch


def _rois_seen(model, source, unit, fp: bool):
    """The RoIs the box RoI extractor works on while ``source`` captures ``unit``'s inputs."""
    seen = []
    hook = model.roi_head.bbox_roi_extractor.register_forward_hook(
        lambda m, args, out: seen.append(args[1].clone())
    )
    try:
        data = source.fp_io(unit)[0] if fp else source.quant_input(unit)
    finally:
        hook.remove()
    return seen, data


def test_heads_see_the_fp_rois_and_reconstruct_without_labels(quantized_detector):
    model, plan, batches, run_batch = quantized_detector
    parts = {name: part for name, part, _ in plan.parts}
    assert list(parts) == ["neck", "rpn_head", "roi_head.bbox_head", "roi_head.mask_head"]
    assert [per_roi for _, _, per_roi in plan.parts] == [False, False, True, True]
    pinned = [type(m).__name__ for m, _ in plan.pinned]
    assert pinned == ["StandardRoIHead", "SingleRoIExtractor", "SingleRoIExtractor"]
    bbox = LayerUnit("roi_head.bbox_head", parts["roi_head.bbox_head"], True, 64)

    pinned = ChainDataSource(model, plan.units, batches, run_batch, pinned=plan.pinned)
    fp_rois, fp_in = _rois_seen(model, pinned, bbox, fp=True)
    q_rois, q_in = _rois_seen(model, pinned, bbox, fp=False)
    for a, b, x, xq in zip(fp_rois, q_rois, fp_in, q_in):
        assert torch.equal(a, b) and x.shape == xq.shape  # one RoI feature per FP RoI
    # without pinning, the quantized model's own proposals (from its quantized RPN) differ
    free = ChainDataSource(model, plan.units, batches, run_batch)
    free_rois, _ = _rois_seen(model, free, bbox, fp=False)
    assert any(a.shape != b.shape or not torch.equal(a, b) for a, b in zip(fp_rois, free_rois))

    # the heads reconstructed from these caches: no labels anywhere, the error goes down
    units = [LayerUnit(name, m, True, 64 if per_roi else None) for name, m, per_roi in plan.parts]
    settings = ReconSettings(iters=30, log_every=0)
    records = run_reconstruction(
        [], pinned, settings, None, print_fn=lambda s: None, layers_after=units
    )
    assert [r.name for r in records] == list(parts)
    for r in records:
        assert r.hard_after < r.hard_before, r.name
