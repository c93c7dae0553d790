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

from pfcr_mm.adapters import prepare, prepare_calibrated
from pfcr_mm.adapters.mmdet_parts import fold_batchnorm
from pfcr_mm.recon import ChainDataSource, LayerUnit, ReconSettings, run_reconstruction
from pfcr_mm.settings import QuantConfig

ROOT = Path(__file__).resolve().parents[1]
DEMO = ROOT / "configs/demo/demo_mask_rcnn_swin_shapes.py"
CASCADE = ROOT / "configs/pfcr_cascade_mask_rcnn_swin_t_w4a4.py"


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


def test_head_bits_apply_to_the_detectors_prediction_layers():
    """quant.head_bits: the RPN's and the RoI heads' prediction layers at 8 bits, weights and
    inputs; every other layer at the model's bits; refused where the scope holds none of them."""
    register_all_modules()
    model = MODELS.build(Config.fromfile(DEMO).model).eval()
    prepare(model, QuantConfig(w_bits=4, a_bits=4, head_bits=8))
    bits = {
        name: (m.weight_quantizer.bits, m.input_quantizer.bits)
        for name, m in model.named_modules()
        if hasattr(m, "weight_quantizer")
    }
    heads = ["rpn_head.rpn_cls", "rpn_head.rpn_reg", "roi_head.bbox_head.fc_cls"]
    heads += ["roi_head.bbox_head.fc_reg", "roi_head.mask_head.conv_logits"]
    assert {bits.pop(name) for name in heads} == {(8, 8)}
    assert bits.pop("backbone.patch_embed.projection") == (4, 8)  # the image: first_layer_a_bits
    assert set(bits.values()) == {(4, 4)} and len(bits) == 37
    backbone_only = MODELS.build(Config.fromfile(DEMO).model).eval()
    with pytest.raises(ValueError, match="head_bits is set but the model has neither"):
        prepare(backbone_only, QuantConfig(head_bits=8), scope=["backbone"])


def _calibrated_w4a4(model, size: int):
    """``model`` quantized whole at W4A4, calibrated on 2 batches of 2 random ``size`` x
    ``size`` images; its plan, the batches and a ``run_batch`` in tensor mode."""
    meta = dict(img_shape=(size, size), ori_shape=(size, size), scale_factor=(1.0, 1.0))
    meta["batch_input_shape"] = (size, size)
    batches = [
        {
            "inputs": torch.randn(2, 3, size, size),
            "data_samples": [DetDataSample(metainfo=meta) for _ in range(2)],
        }
        for _ in range(2)
    ]

    def run_batch(m, batch):
        return m(batch["inputs"], batch["data_samples"], mode="tensor")

    plan = prepare_calibrated(
        model, QuantConfig(w_bits=4, a_bits=4), lambda m: [run_batch(m, b) for b in batches]
    )
    return plan, batches, run_batch


@pytest.fixture(scope="module")
def quantized_detector():
    """The demo detector (random weights) at W4A4 over the whole model, calibrated on 2 batches
    of 2 random 160x160 images, and a ``run_batch`` in tensor mode."""
    register_all_modules()
    torch.manual_seed(0)
    model = MODELS.build(Config.fromfile(DEMO).model).eval()
    plan, batches, run_batch = _calibrated_w4a4(model, 160)
    return model, plan, batches, run_batch


def _assert_parts_reconstruct(plan, source, names: list[str]):
    """Every part of ``plan`` reconstructed from ``source``'s caches (no labels), in the order
    ``names``, each with its integer-weight error down."""
    units = [LayerUnit(name, m, True, 64 if per_roi else None) for name, m, per_roi in plan.parts]
    settings = ReconSettings(iters=30, log_every=0)
    records = run_reconstruction(
        [], source, settings, None, print_fn=lambda s: None, layers_after=units
    )
    assert [r.name for r in records] == names
    for r in records:
        assert r.hard_after < r.hard_before, r.name


def _rois_seen(extractor, source, unit, fp: bool):
    """The RoIs ``extractor`` works on while ``source`` captures ``unit``'s inputs."""
    seen = []
    hook = extractor.register_forward_hook(lambda m, args, out: seen.append(args[1].clone()))
    try:
        data = source.fp_io(unit)[0] if fp else source.quant_input(unit)
    finally:
        hook.remove()
    return seen, data


@pytest.mark.slow
def test_heads_see_the_fp_rois_and_reconstruct_without_labels(quantized_detector):
    model, plan, batches, run_batch = quantized_detector
    parts = {name: part for name, part, _ in plan.parts}
    assert list(parts) == ["neck", "rpn_head", "roi_head.bbox_head", "roi_head.mask_head"]
    assert [per_roi for _, _, per_roi in plan.parts] == [False, False, True, True]
    pinned = [type(m).__name__ for m, _ in plan.pinned]
    assert pinned == ["StandardRoIHead", "SingleRoIExtractor", "SingleRoIExtractor"]
    bbox = LayerUnit("roi_head.bbox_head", parts["roi_head.bbox_head"], True, 64)

    extractor = model.roi_head.bbox_roi_extractor
    pinned = ChainDataSource(model, plan.units, batches, run_batch, pinned=plan.pinned)
    fp_rois, fp_in = _rois_seen(extractor, pinned, bbox, fp=True)
    q_rois, q_in = _rois_seen(extractor, pinned, bbox, fp=False)
    assert len(fp_rois) == len(q_rois) == len(batches)
    for a, b, x, xq in zip(fp_rois, q_rois, fp_in, q_in):
        assert torch.equal(a, b) and x.shape == xq.shape  # one RoI feature per FP RoI
    # without pinning, the quantized model's own proposals (from its quantized RPN) differ
    free = ChainDataSource(model, plan.units, batches, run_batch)
    free_rois, _ = _rois_seen(extractor, free, bbox, fp=False)
    assert any(a.shape != b.shape or not torch.equal(a, b) for a, b in zip(fp_rois, free_rois))

    # the heads reconstructed from these caches: no labels anywhere, the error goes down
    _assert_parts_reconstruct(plan, pinned, list(parts))


def test_pinned_arguments_reach_a_forward_called_directly():
    """mmdet's detectors call their RoI head's ``forward`` directly (``TwoStageDetector._forward``),
    past the module's hooks: the pin holds there too, a call through ``module(...)`` is pinned
    once, and the modules are as they were after the capture."""

    class Add(nn.Module):
        def forward(self, x, rois):
            return x + rois

    class Parent(nn.Module):
        def __init__(self):
            super().__init__()
            self.direct, self.called, self.head = Add(), Add(), nn.Linear(4, 4)

        def forward(self, x):
            # new at every run, as the quantized model's proposals differ from the FP model's
            x = self.direct.forward(x, torch.randn_like(x))
            return self.head(self.called(x, torch.randn_like(x)))

    model = Parent()
    unit = LayerUnit("head", model.head)
    batches = [torch.randn(2, 4)]
    pins = [(model.direct, 1), (model.called, 1)]
    pinned = ChainDataSource(model, [], batches, pinned=pins)
    assert torch.equal(pinned.fp_io(unit)[0][0], pinned.quant_input(unit)[0])
    for m, _ in pins:  # the class's forward again, no hook left
        assert "forward" not in vars(m) and not m._forward_pre_hooks
    free = ChainDataSource(model, [], batches)
    assert not torch.equal(free.fp_io(unit)[0][0], free.quant_input(unit)[0])


@pytest.fixture(scope="module")
def quantized_cascade():
    """The project's Cascade Mask R-CNN Swin-T, shrunk (random weights), at W4A4 over the whole
    model, calibrated on 2 batches of 2 random 128x128 images; the number of BatchNorms its RoI
    head held before; a ``run_batch`` in tensor mode."""
    register_all_modules()
    torch.manual_seed(0)
    cfg = Config.fromfile(CASCADE).model
    cfg.backbone.update(embed_dims=16, depths=[2, 2, 2, 2], num_heads=[1, 2, 2, 4])
    width = 32  # FPN, RPN and RoI heads (256 in the config)
    cfg.neck.update(in_channels=[16, 32, 64, 128], out_channels=width)
    cfg.rpn_head.update(in_channels=width, feat_channels=width)
    cfg.roi_head.bbox_roi_extractor.out_channels = width
    cfg.roi_head.mask_roi_extractor.out_channels = width
    for head in cfg.roi_head.bbox_head:  # 4conv1fc with BN, as the Swin release's
        head.update(in_channels=width, conv_out_channels=width, fc_out_channels=64)
    cfg.roi_head.mask_head.update(num_convs=2, in_channels=width, conv_out_channels=width)
    # at most 40 proposals per FPN level and no cap after NMS (200 >= 5 x 40): the per-image
    # proposal counts depend on the scores, as at 1000/1000 in the config, so the FP and the
    # quantized RPN keep different numbers
    cfg.test_cfg.rpn.update(nms_pre=40, max_per_img=200)
    cfg.test_cfg.rcnn.max_per_img = 10
    model = MODELS.build(cfg).eval()
    norms = sum(isinstance(m, nn.BatchNorm2d) for m in model.roi_head.modules())
    plan, batches, run_batch = _calibrated_w4a4(model, 128)
    return model, plan, norms, batches, run_batch


def _per_image(rois):
    return torch.bincount(rois[:, 0].long()).tolist()


@pytest.mark.slow
def test_cascade_heads_see_the_fp_refined_rois_and_reconstruct(quantized_cascade):
    model, plan, norms, batches, run_batch = quantized_cascade
    roi_head = model.roi_head
    # the BatchNorms of the 3 stages' 4conv1fc box heads are folded into their convolutions
    assert norms == 12
    assert plan.folded == [
        f"roi_head.bbox_head.{stage}.shared_convs.{conv}" for stage in range(3) for conv in range(4)
    ]
    assert not any(isinstance(m, nn.BatchNorm2d) for m in roi_head.modules())

    parts = {name: part for name, part, _ in plan.parts}
    stages = [
        f"roi_head.{head}.{stage}" for head in ("bbox_head", "mask_head") for stage in range(3)
    ]
    assert list(parts) == ["neck", "rpn_head", *stages]
    assert [per_roi for _, _, per_roi in plan.parts] == [False, False] + [True] * 6
    # the proposals (argument 1 of the RoI head's forward) and the RoIs of each stage's box and
    # mask RoI extractors
    extractors = [*roi_head.bbox_roi_extractor, *roi_head.mask_roi_extractor]
    assert [m for m, _ in plan.pinned] == [roi_head, *extractors]
    assert [type(m).__name__ for m, _ in plan.pinned] == ["CascadeRoIHead"] + 6 * [
        "SingleRoIExtractor"
    ]
    assert all(index == 1 for _, index in plan.pinned)

    # the third stage's box head: its RoIs are the second stage's boxes, regressed by the
    # quantized heads in the quantized run; pinned, it sees the FP model's
    last = LayerUnit("roi_head.bbox_head.2", parts["roi_head.bbox_head.2"], True, 64)
    first, third = roi_head.bbox_roi_extractor[0], roi_head.bbox_roi_extractor[2]
    pinned = ChainDataSource(model, plan.units, batches, run_batch, pinned=plan.pinned)
    fp_rois, fp_in = _rois_seen(third, pinned, last, fp=True)
    q_rois, q_in = _rois_seen(third, pinned, last, fp=False)
    assert len(fp_rois) == len(q_rois) == len(batches)
    for a, b, x, xq in zip(fp_rois, q_rois, fp_in, q_in):
        assert torch.equal(a, b) and x.shape == xq.shape  # one RoI feature per FP RoI
        assert not torch.equal(x, xq)  # the features themselves are the quantized model's
    proposals, _ = _rois_seen(first, pinned, last, fp=True)
    assert len(proposals) == len(batches)
    for p, a in zip(proposals, fp_rois):  # refined: same RoIs per image, other boxes
        assert _per_image(p) == _per_image(a) and not torch.equal(p, a)
    # without pinning, the quantized RPN keeps other proposals, other numbers of them per image
    # (what the RoI head's pin is for: Cascade splits each stage's outputs per image by them)
    free = ChainDataSource(model, plan.units, batches, run_batch)
    free_rois, _ = _rois_seen(third, free, last, fp=False)
    assert any(_per_image(a) != _per_image(b) for a, b in zip(fp_rois, free_rois))

    # every part reconstructed from these caches: the error goes down
    _assert_parts_reconstruct(plan, pinned, list(parts))
