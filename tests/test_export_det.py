"""Detector export (pfcr_mm.engine.deploy): the backbone and neck of an mmdet Swin detector,
quantized, exported at one input size; onnxruntime's FPN levels against PyTorch's.

The detector is the demo Mask R-CNN shrunk to one Swin stage of two blocks (window 7 on a
16x16 token map: padded to 21x21, the second block shifted and masked) with its FPN (two
levels), at W4A4 (uint4 weight codes, convolutions and linears).

Tolerance: as in ``tests/test_export.py``, onnxruntime is not bit-exact (int32 accumulation
against float sums, its own LayerNorm, GELU and softmax kernels), so an activation within
float rounding of a code boundary can take the neighbouring code, one quantizer step away,
and move the features downstream of it. The bound, 2% of each level's range, is far below
what a wrong scale, zero point, rounding or window mask does (tens of percent); and such flips
are rare, so 99% of the feature values must also agree to 1e-4 of the range (observed: every
value, to 3e-7 of the range).
"""

import onnx
import pytest
import torch
from mmdet.registry import MODELS
from mmdet.utils import register_all_modules
from mmengine.config import Config

from pfcr_mm.adapters import prepare_calibrated
from pfcr_mm.engine.deploy import DetectorFeatures, features_from
from pfcr_mm.export import export_onnx
from pfcr_mm.export.runtime import FixedSizeRunner, cpu_session, optimized_op_counts, pad_images
from pfcr_mm.quant.modules import QuantConv2d, QuantLinear
from pfcr_mm.settings import QuantConfig

DEMO = "configs/demo/demo_mask_rcnn_swin_shapes.py"
SIZE = (64, 64)


def _tiny_detector():
    register_all_modules()
    cfg = Config.fromfile(DEMO)
    cfg.model.backbone.update(
        embed_dims=16, depths=[2], num_heads=[1], out_indices=(0,), strides=(4,)
    )
    cfg.model.neck.update(in_channels=[16], out_channels=16, num_outs=2)
    return MODELS.build(cfg.model).eval()


def _assert_close(got, ref) -> None:
    for g, r in zip(got, ref, strict=True):
        assert g.shape == r.shape
        scale = float(r.max() - r.min())
        diff = (g - r).abs()
        assert float(diff.max()) <= 0.02 * scale
        assert float((diff > 1e-4 * scale).float().mean()) <= 0.01


@pytest.mark.slow
def test_detector_features_through_onnxruntime(tmp_path):
    model = _tiny_detector()
    batches = [torch.randn(2, 3, *SIZE) for _ in range(2)]
    cfg = QuantConfig(w_bits=4, a_bits=4)
    prepare_calibrated(
        model, cfg, lambda m: [m.extract_feat(b) for b in batches], ["backbone", "neck"]
    )
    dense = DetectorFeatures(model).eval()
    path = tmp_path / "det.onnx"
    report = export_onnx(dense, torch.randn(1, 3, *SIZE), path, dynamic_batch=False)
    assert report["input_shape"] == [1, 3, *SIZE]
    assert report["outputs"] == ["output_0", "output_1"]
    # every quantized conv and linear of the backbone and neck as integer codes (uint4)
    layers = [m for m in dense.modules() if isinstance(m, (QuantConv2d, QuantLinear))]
    graph = onnx.load(path).graph
    inits = {t.name: t for t in graph.initializer}
    codes = [
        inits[n.input[0]]
        for n in graph.node
        if n.op_type == "DequantizeLinear" and n.input[0] in inits
    ]
    assert len(codes) == report["integer_weight_layers"] == len(layers)
    assert all(t.data_type == onnx.TensorProto.UINT4 for t in codes)

    run = FixedSizeRunner(cpu_session(path))
    images = torch.randn(3, 3, *SIZE)
    with torch.no_grad():
        ref = dense(images)
    _assert_close(run(images), ref)
    # a smaller image is padded at the bottom and right, as mmdet pads a batch
    small = images[:2, :, :48, :56]
    with torch.no_grad():
        ref_small = dense(pad_images(small, SIZE))
    _assert_close(run(small), ref_small)
    with pytest.raises(ValueError, match="does not fit the exported input size 64x64"):
        run(torch.randn(1, 3, 96, 64))
    # the heads read the features the runner gives them, only inside the block
    with features_from(model, run):
        assert model.extract_feat is run
    assert model.extract_feat.__func__ is type(model).extract_feat


@pytest.mark.slow
@pytest.mark.parametrize("bits", [8, 4])
def test_int8_detector_runs_its_convolutions_as_integers(tmp_path, bits, signed_int8_exact):
    """``int8=True``: every convolution of the backbone and neck (the patch embedding, the FPN's
    1x1 lateral and 3x3 output convolutions, padded) is an onnxruntime ``ConvInteger``, and the
    features are those of PyTorch within the bound above; the weight codes of the convolutions
    stay unsigned under ``signed_weights`` (the linears' become int8), which is exported where
    the CPU multiplies int8 weights exactly (VNNI/AMX; elsewhere unsigned codes throughout)."""
    model = _tiny_detector()
    batches = [torch.randn(2, 3, *SIZE) for _ in range(2)]
    prepare_calibrated(
        model,
        QuantConfig(w_bits=bits, a_bits=bits),
        lambda m: [m.extract_feat(b) for b in batches],
        ["backbone", "neck"],
    )
    dense = DetectorFeatures(model).eval()
    convs = sum(isinstance(m, QuantConv2d) for m in dense.modules())
    linears = sum(isinstance(m, QuantLinear) for m in dense.modules())
    assert convs == 3  # patch embedding, the lateral and the output convolution (level 2: a pool)
    path = tmp_path / "det.onnx"
    signed = signed_int8_exact
    report = export_onnx(
        dense, torch.randn(1, 3, *SIZE), path, int8=True, dynamic_batch=False, signed_weights=signed
    )
    assert report["signed_weight_layers"] == (linears if signed else 0)
    assert report["ops"]["ConvInteger"] == convs and "Conv" in report["ops"]
    ran = optimized_op_counts(path)
    assert ran["ConvInteger"] == convs
    images = torch.randn(3, 3, *SIZE)
    with torch.no_grad():
        ref = dense(images)
    _assert_close(FixedSizeRunner(cpu_session(path))(images), ref)
