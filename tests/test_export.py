"""ONNX export (pfcr_mm.export): the integer model equals the fake-quant model bit for bit, and
onnxruntime (CPU) computes the same logits, with the integer kernels where the graph allows.

Tolerances: the PyTorch integer model is compared with ``torch.equal`` (same operations in the
same order). onnxruntime is not bit-exact: its integer matmuls accumulate int32 exactly where
PyTorch sums float products (relative differences ~1e-6), and its float kernels (MatMul, Gelu,
LayerNorm, Softmax, Log) round differently in the last bits. An activation that lands within
that difference of a rounding boundary takes the neighbouring code, one step away; a few such
flips move a logit by a few steps of the last layers' quantizers. The bound below, 2% of the
logits' range (observed here: 1e-7 of it, and 0.3% at W8A8 with the 8-bit uniform post-softmax
quantizers), is far below the gap between a correct and a wrong export (a wrong scale, zero
point or rounding moves the logits by tens of percent), and every image keeps its top-1 class.
"""

import onnx
import pytest
import torch
from onnx import numpy_helper

from pfcr_mm.adapters import prepare_calibrated
from pfcr_mm.export import export_onnx, integer_model, uniform_post_softmax
from pfcr_mm.export.modules import QuantDequant
from pfcr_mm.export.runtime import (
    cpu_session,
    integer_kernel_counts,
    op_time_shares,
    optimized_op_counts,
    run_session,
)
from pfcr_mm.quant.calibrate import named_quantizers
from pfcr_mm.quant.modules import QuantConv2d, QuantLinear
from pfcr_mm.quant.quantizers import AdaRoundWeightQuantizer, LogQuantizer
from pfcr_mm.settings import QuantConfig

DEPTH = 4  # tiny_timm_vit: 4 blocks, 17 tokens of 48 channels, 5 classes


def _quantized(
    tiny_timm_vit,
    bits: int,
    post_softmax: str = "log2",
    renorm: bool = False,
    linear_a_bits: dict | None = None,
):
    """The tiny ViT calibrated at W{bits}A{bits} (the blocks' linears' inputs by
    ``linear_a_bits``) on two random batches, with learned (random, hardened) AdaRound rounding
    on every layer; and its calibration batches."""
    model = tiny_timm_vit()
    batches = [torch.randn(16, 3, 32, 32) for _ in range(2)]
    cfg = QuantConfig(
        w_bits=bits,
        a_bits=bits,
        post_softmax=post_softmax,
        post_softmax_renorm=renorm,
        linear_a_bits=linear_a_bits,
    )
    prepare_calibrated(model, cfg, lambda m: [m(b) for b in batches])
    for layer in model.modules():
        if isinstance(layer, (QuantLinear, QuantConv2d)):
            q = layer.weight_quantizer
            q.init_adaround(layer.weight)
            q.alpha.data = torch.randn_like(q.alpha)  # far from nearest rounding
            q.harden()
    return model, batches


def _assert_close_logits(out: torch.Tensor, ref: torch.Tensor) -> None:
    diff = float((out - ref).abs().max())
    assert diff <= 0.02 * float(ref.max() - ref.min()), diff
    assert torch.equal(out.argmax(1), ref.argmax(1))


@pytest.mark.parametrize(
    "bits, post_softmax, renorm, linear_a_bits",
    [
        (8, "log2", False, None),
        (4, "auto", False, None),
        (3, "log_sqrt2", False, None),
        (3, "auto", True, None),
        (3, "auto", True, dict(qkv=4, proj=4)),  # a mixed-precision setting
    ],
)
def test_integer_model_is_the_fake_quant_model(
    tiny_timm_vit, bits, post_softmax, renorm, linear_a_bits
):
    model, _ = _quantized(tiny_timm_vit, bits, post_softmax, renorm, linear_a_bits)
    x = torch.randn(8, 3, 32, 32)
    with torch.no_grad():
        ref = model(x)
        net = integer_model(model)
        assert torch.equal(net(x), ref)
    # each input point keeps its own bits (the attention's linears' inputs at 4 in the mixed
    # setting), and the integer model equals the fake-quant one above with them
    attn = net.blocks[0].attn
    expected = (linear_a_bits or {}).get("qkv", bits), (linear_a_bits or {}).get("proj", bits)
    assert (attn.qkv.input_quantizer.bits, attn.proj.input_quantizer.bits) == expected
    # every activation point became a Q/DQ point; the codes are the hardened rounding
    points = [q for _, q in named_quantizers(model) if not isinstance(q, AdaRoundWeightQuantizer)]
    logs = sum(isinstance(q, LogQuantizer) for q in points)
    assert sum(isinstance(m, QuantDequant) for m in net.modules()) == len(points) - logs
    qkv, fake = net.blocks[0].attn.qkv, model.blocks[0].attn.qkv
    wq = fake.weight_quantizer
    expected = (
        torch.floor(fake.weight / wq.scale[:, None]) + (wq.alpha >= 0) + wq.zero_point[:, None]
    )
    assert torch.equal(qkv.codes.t().float(), expected.clamp(0, 2**bits - 1))


@pytest.mark.slow
@pytest.mark.parametrize(
    "bits, renorm, linear_a_bits",
    [(8, False, None), (4, False, None), (3, False, None), (3, True, None)]
    + [(3, True, dict(qkv=4, proj=4))],  # 3- and 4-bit codes in the same uint4 containers
)
def test_onnxruntime_matches_the_fake_quant_model(
    tiny_timm_vit, tmp_path, bits, renorm, linear_a_bits
):
    model, _ = _quantized(tiny_timm_vit, bits, renorm=renorm, linear_a_bits=linear_a_bits)
    path = tmp_path / f"w{bits}a{bits}.onnx"
    report = export_onnx(model, torch.randn(2, 3, 32, 32), path)
    x = torch.randn(32, 3, 32, 32)
    with torch.no_grad():
        ref = model(x)
    session = cpu_session(path)
    _assert_close_logits(run_session(session, x), ref)
    assert run_session(session, x[:1]).shape == (1, 5)  # the batch size is dynamic
    # one QuantizeLinear per uniform activation point (3 per attention and 4 linear inputs per
    # block, the patch embedding's and the head's), the log post-softmax quantizer in
    # elementary ops; weights as integer codes (uint4 at 3 and 4 bits: two per byte)
    graph = onnx.load(path).graph
    ops = [n.op_type for n in graph.node]
    assert report["quantizer_points"] == ops.count("QuantizeLinear") == 7 * DEPTH + 2
    assert ops.count("Log") == DEPTH and ops.count("MatMul") == 6 * DEPTH + 1
    # the renormalization: one row sum of the quantized probabilities per attention, dividing
    # the output of the (integer) probs @ v
    assert ops.count("ReduceSum") == DEPTH * renorm
    assert [r["kind"] for r in report["post_softmax"]] == ["log"] * DEPTH
    inits = {t.name: t for t in graph.initializer}
    code_type = onnx.TensorProto.UINT4 if bits <= 4 else onnx.TensorProto.UINT8
    dq_weights = [
        inits[n.input[0]]
        for n in graph.node
        if n.op_type == "DequantizeLinear" and n.input[0] in inits
    ]
    assert len(dq_weights) == report["integer_weight_layers"] == 4 * DEPTH + 2
    assert all(t.data_type == code_type for t in dq_weights)
    qkv = next(t for t in dq_weights if list(t.dims) == [48, 144])
    assert numpy_helper.to_array(qkv).max() <= 2**bits - 1
    # no float copy of a weight matrix is left in the file
    floats = [t for t in graph.initializer if t.data_type == onnx.TensorProto.FLOAT]
    assert max(numpy_helper.to_array(t).size for t in floats) < 48 * 144
    codes = sum(numpy_helper.to_array(t).size for t in dq_weights)
    if bits <= 4:  # two codes per byte (and the zero points)
        assert codes / 2 < report["initializer_bytes"]["uint4"] < 0.51 * codes
    else:
        assert report["initializer_bytes"]["uint8"] > codes


@pytest.mark.slow
@pytest.mark.parametrize("bits", [8, 4])
def test_int8_mode_runs_every_matmul_as_integers(tiny_timm_vit, tmp_path, bits):
    model, batches = _quantized(tiny_timm_vit, bits)
    rows = uniform_post_softmax(model, lambda m: [m(b) for b in batches])
    assert [r["attention"] for r in rows] == [f"blocks.{i}.attn.matmul_quant" for i in range(DEPTH)]
    for r in rows:
        assert r["was"] == {"kind": "log", "k": 1.0, "bits": bits}
        assert 0 < r["probs_rel_sq_error_after"] < 1 and 0 < r["probs_rel_sq_error_before"] < 1
    path = tmp_path / "int8.onnx"
    report = export_onnx(model, torch.randn(2, 3, 32, 32), path, int8=True)
    # the 8-bit post-softmax points, the 8-bit image; all in uint8 containers
    expected = {"8": 8 * DEPTH + 2} if bits == 8 else {"8": DEPTH + 1, "4": 7 * DEPTH + 1}
    assert report["bits_by_q_node"] == expected and report["uint4_initializers"] == 0
    x = torch.randn(32, 3, 32, 32)
    with torch.no_grad():
        ref = model(x)  # the fake-quant model with the uniform post-softmax quantizers
    _assert_close_logits(run_session(cpu_session(path), x), ref)
    ran = optimized_op_counts(path)
    # per block: qkv, proj, fc1, fc2 as integer x integer -> float matmuls, q @ k^T and
    # probs @ v with both operands quantized, and the head (not fused into a float Gemm:
    # runtime.DISABLED_OPTIMIZERS); the patch embedding an integer convolution; no float
    # MatMul or Gemm and no Log left
    assert sum(integer_kernel_counts(ran).values()) == 6 * DEPTH + 2
    assert integer_kernel_counts(ran)["ConvInteger"] == 1
    assert not {"MatMul", "Gemm", "Log"} & set(ran)


@pytest.mark.slow
def test_log_quantizer_in_elementary_ops_is_exact(tmp_path):
    """Softmax probabilities through the log2 quantizer: onnxruntime gives the PyTorch values
    except where ``-log2(p / delta)`` is within float rounding of a half-integer."""
    q = LogQuantizer(4, k=2**0.5)
    probs = torch.randn(64, 3, 17, 17).mul(3).softmax(-1)
    q.set_state("observe")
    q(probs)
    q.finish_calibration()
    path = tmp_path / "log.onnx"
    export_onnx(torch.nn.Sequential(q), probs[:2], path)
    out = run_session(cpu_session(path), probs)
    ref = q.quant_dequant(probs)
    mismatch = float((out != ref).float().mean())
    assert mismatch < 1e-4
    assert ref.unique().numel() > 8  # many levels in use


@pytest.mark.slow
def test_the_profile_says_where_the_int8_and_fp32_time_goes(tiny_timm_vit, tmp_path):
    model, batches = _quantized(tiny_timm_vit, 8)
    uniform_post_softmax(model, lambda m: [m(b) for b in batches])
    x = torch.randn(4, 3, 32, 32)
    int8 = export_onnx(model, x, tmp_path / "int8.onnx", int8=True)["path"]
    fp32 = export_onnx(tiny_timm_vit(), x, tmp_path / "fp32.onnx")["path"]
    for path, matmuls in ((int8, integer_kernel_counts(optimized_op_counts(int8))), (fp32, None)):
        shares = op_time_shares(path, x, runs=2)
        assert sum(shares.values()) == pytest.approx(100)
        assert list(shares.values()) == sorted(shares.values(), reverse=True)
        ran = optimized_op_counts(path)
        assert set(shares) <= set(ran)  # operator types of the graph that ran
        if matmuls:  # the integer matmuls and the quantizes that feed them take time
            assert set(matmuls) <= set(shares) and "QuantizeLinear" in shares
        else:
            assert not {"QuantizeLinear", "DequantizeLinear"} & set(shares)
            assert {"MatMul", "FusedMatMul", "Gemm"} & set(shares)


@pytest.mark.slow
def test_signed_weight_codes_are_the_same_weights_in_int8(
    tiny_timm_vit, tmp_path, signed_int8_exact
):
    model, batches = _quantized(tiny_timm_vit, 8)
    uniform_post_softmax(model, lambda m: [m(b) for b in batches])
    x = torch.randn(8, 3, 32, 32)
    paths = {signed: tmp_path / f"signed{signed}.onnx" for signed in (False, True)}
    reports = {
        signed: export_onnx(model, x[:2], path, int8=True, signed_weights=signed)
        for signed, path in paths.items()
    }
    assert reports[False]["signed_weight_layers"] == 0
    graph = onnx.load(paths[True]).graph
    inits = {t.name: t for t in graph.initializer}
    weights = [
        (inits[n.input[0]], inits[n.input[2]])
        for n in graph.node
        if n.op_type == "DequantizeLinear" and n.input[0] in inits
    ]
    # the linears; the patch embedding is a ConvInteger, whose codes stay uint8
    assert len(weights) == reports[True]["signed_weight_layers"] == 4 * DEPTH + 1
    (conv,) = [n for n in graph.node if n.op_type == "ConvInteger"]
    assert inits[conv.input[1]].data_type == onnx.TensorProto.UINT8
    for codes, zero_point in weights:  # int8 codes and zero points, using the signed range
        assert codes.data_type == zero_point.data_type == onnx.TensorProto.INT8
    lowest = min(int(numpy_helper.to_array(c).min()) for c, _ in weights)
    assert lowest < 0
    assert (
        reports[True]["initializer_bytes"].get("uint8", 0)
        < reports[False]["initializer_bytes"]["uint8"]
    )
    if not signed_int8_exact:
        pytest.skip("no VNNI/AMX: onnxruntime's u8s8 kernel may saturate (the codes were checked)")
    # the same weights: onnxruntime gives the same outputs
    out = {s: run_session(cpu_session(p), x) for s, p in paths.items()}
    torch.testing.assert_close(out[True], out[False], rtol=0, atol=1e-5)
    assert set(integer_kernel_counts(optimized_op_counts(paths[True]))) >= {"MatMulIntegerToFloat"}
