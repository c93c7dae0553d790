"""ONNX export of a quantized model: ``export_onnx(model, example, path)``.

The model (quantized by :func:`pfcr_mm.quantize`, or loaded from a ``quantized_model.pth``) is
copied into its integer form (:func:`integer_model`: every quantizer point becomes a
``QuantizeLinear``/``DequantizeLinear`` pair, every quantized layer's weights integer codes,
:mod:`pfcr_mm.export.modules`) and exported with PyTorch's ``torch.export``-based exporter
(``dynamo=True``, opset 21), with a dynamic batch dimension. Codes of 4 bits and fewer are then
stored as ``uint4`` initializers (two per byte).

Log post-softmax quantizers have no linear Q/DQ form: by default they are exported exactly, in
elementary operators. :func:`uniform_post_softmax` replaces them, in place and before the
export, by 8-bit uniform quantizers calibrated as calibration calibrates a uniform post-softmax
candidate, so that every ``probs @ v`` can run as an integer matmul (``int8=True`` exports every
point in 8-bit containers for the same reason).
"""

from __future__ import annotations

import copy
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import ml_dtypes
import numpy as np
import onnx
import torch
from onnx import numpy_helper
from torch import nn

from ..atomic import atomic_path
from ..quant.attention import AttentionQuantizers
from ..quant.calibrate import quantizer_states
from ..quant.choice import QuantizerChoice
from ..quant.modules import QuantConv2d, QuantConvTranspose2d, QuantLinear
from ..quant.post_gelu import PostGeluLinear
from ..quant.quantizers import LogQuantizer, UniformQuantizer
from .modules import (
    BITS_KEY,
    CONTAINER_KEY,
    OPSET,
    IntegerConv2d,
    IntegerConvTranspose2d,
    IntegerLinear,
    IntegerWeights,
    QuantDequant,
    activation_point,
)


def _integer_module(child: nn.Module, int8: bool, signed_weights: bool) -> nn.Module | None:
    """The integer counterpart of a quantized module (``None``: not a quantized module)."""
    if isinstance(child, QuantLinear):
        return IntegerLinear(child, int8, signed_weights)
    if isinstance(child, QuantConv2d):
        return IntegerConv2d(child, int8, signed_weights)
    if isinstance(child, QuantConvTranspose2d):
        return IntegerConvTranspose2d(child, int8, signed_weights)
    if isinstance(child, (LogQuantizer, UniformQuantizer)):  # weights are in the layers
        return activation_point(child, int8) if child.enabled else nn.Identity()
    return None


@torch.no_grad()
def integer_model(model: nn.Module, int8: bool = False, signed_weights: bool = False) -> nn.Module:
    """A copy of the quantized ``model`` in integer form (the model is not changed); ``int8``
    and ``signed_weights`` as for :func:`export_onnx`.

    Raises ValueError when a quantizer is not calibrated or an ``"auto"`` point (post-softmax,
    post-GELU) was never chosen (export a model after :func:`pfcr_mm.quantize` or a load).
    """
    pending = [n for n, m in model.named_modules() if isinstance(m, QuantizerChoice) and m.choosing]
    pending += [
        n
        for n, m in model.named_modules()
        if isinstance(m, (UniformQuantizer, LogQuantizer)) and m.enabled and not m.calibrated
    ]
    if pending:
        raise ValueError(f"not a calibrated quantized model: {pending[:8]} are not calibrated")
    out = copy.deepcopy(model).eval()
    for parent in list(out.modules()):
        for name, child in list(parent.named_children()):
            new = _integer_module(child, int8, signed_weights)
            if new is not None:
                setattr(parent, name, new)
    return out


def attention_points(model: nn.Module) -> list[tuple[str, AttentionQuantizers]]:
    """Every attention's quantizer points, by module name, in model order."""
    return [(n, m) for n, m in model.named_modules() if isinstance(m, AttentionQuantizers)]


def _point(q: nn.Module) -> dict:
    exported = "elementary ops (Log, Round, Gather)" if isinstance(q, LogQuantizer) else "Q/DQ"
    return {"bits": q.bits, "exported_as": exported}


def describe_post_softmax(model: nn.Module) -> list[dict]:
    """Per attention: its post-softmax quantizer and how the export writes it."""
    return [
        {"attention": name, **m.chosen(), **_point(m.probs)} for name, m in attention_points(model)
    ]


def describe_post_gelu(model: nn.Module) -> list[dict]:
    """Per linear after GELU whose input quantizer was chosen or fixed (``quant.post_gelu``
    other than ``uniform``): that quantizer and how the export writes it."""
    return [
        {"layer": name, **m.chosen(), **_point(m.input_quantizer)}
        for name, m in model.named_modules()
        if isinstance(m, PostGeluLinear)
    ]


@torch.no_grad()
def uniform_post_softmax(
    model: nn.Module, forward_loop: Callable[[nn.Module], None], bits: int = 8
) -> list[dict]:
    """Replace, in place, every log post-softmax quantizer of ``model`` by a ``bits``-bit
    uniform one, calibrated as :func:`~pfcr_mm.quant.calibrate.calibrate_activations`
    calibrates the uniform candidate: every probability observed over ``forward_loop(model)``
    in floating point, range by the attention config's ``act_range``.

    Returns one row per replaced attention: the relative squared error of the probabilities
    (``sum (p_hat - p)^2 / sum p^2`` over every observed value) under the log quantizer it
    had and under the uniform one it gets.
    """
    targets = [(n, m) for n, m in attention_points(model) if isinstance(m.probs, LogQuantizer)]
    if not targets:
        return []
    new = {n: UniformQuantizer(bits, range_method=m.cfg.act_range) for n, m in targets}
    device = next(model.parameters()).device
    with quantizer_states(model, weights=False, activations=False):
        olds = {}
        for name, m in targets:
            olds[name], m.probs = m.probs, new[name].to(device)
            m.probs.set_state("observe")
        was_training = model.training
        model.eval()
        try:
            forward_loop(model)
        finally:
            model.train(was_training)
    rows = []
    for name, m in targets:
        stats = m.probs.take_observed()
        m.probs.calibrate_from_stats(stats)
        m.probs.set_state("quant")
        ref = float(stats.squared_error(torch.zeros_like(stats.values)).sum())
        old = olds[name]
        rows.append(
            {
                "attention": name,
                "was": {"kind": "log", "k": old.k, "bits": old.bits},
                "now": {"kind": "uniform", "bits": bits},
                "probs_rel_sq_error_before": float(
                    stats.squared_error(old.quant_dequant(stats.values)).sum()
                )
                / ref,
                "probs_rel_sq_error_after": float(
                    stats.squared_error(m.probs.fake_quant(stats.values)).sum()
                )
                / ref,
            }
        )
    return rows


def _store_low_bit_codes(graph: onnx.GraphProto) -> int:
    """Re-type the codes of the 4-bit-container Q/DQ nodes as ``uint4``: their code and
    zero-point initializers (the exporter writes torch's uint8; opset 21 packs two per byte)
    and the declared type of their ``QuantizeLinear`` outputs. Returns how many initializers
    were re-typed."""
    inits = {t.name: t for t in graph.initializer}
    value_info = {v.name: v for v in graph.value_info}
    converted: dict[str, str] = {}
    for node in graph.node:
        if node.op_type not in ("QuantizeLinear", "DequantizeLinear"):
            continue
        meta = {p.key: p.value for p in node.metadata_props}
        if meta.get(CONTAINER_KEY) != "4":
            continue
        if node.op_type == "QuantizeLinear" and node.output[0] in value_info:
            value_info[node.output[0]].type.tensor_type.elem_type = onnx.TensorProto.UINT4
        # inputs: (x or codes, scale, zero point); the codes only for a DequantizeLinear of
        # an initializer (weights)
        slots = [2] + ([0] if node.op_type == "DequantizeLinear" and node.input[0] in inits else [])
        for slot in slots:
            name = node.input[slot]
            if name not in converted:
                values = numpy_helper.to_array(inits[name])
                if values.dtype != np.uint8 or values.size and values.max() > 15:
                    raise ValueError(f"initializer {name} does not hold 4-bit codes")
                packed = numpy_helper.from_array(values.astype(ml_dtypes.uint4), f"{name}.uint4")
                graph.initializer.append(packed)
                converted[name] = packed.name
            node.input[slot] = converted[name]
    used = {i for n in graph.node for i in n.input} | {o.name for o in graph.output}
    unused = [t for t in graph.initializer if t.name not in used]
    for t in unused:
        graph.initializer.remove(t)
    return len(converted)


def _traced(
    net: nn.Module, example: torch.Tensor, output_names: list[str], dynamic_batch: bool
) -> onnx.ModelProto:
    """The ONNX graph of ``net`` traced on ``example`` with the dynamo exporter."""
    program = torch.onnx.export(
        net,
        (example,),
        dynamo=True,
        opset_version=OPSET,
        input_names=["input"],
        output_names=output_names,
        dynamic_shapes=({0: torch.export.Dim("batch", min=1)},) if dynamic_batch else None,
        external_data=False,
        verbose=False,
    )
    return program.model_proto


def export_onnx(
    model: nn.Module,
    example: torch.Tensor,
    path: str | Path,
    int8: bool = False,
    dynamic_batch: bool = True,
    signed_weights: bool = False,
) -> dict:
    """Export the quantized ``model`` (input like ``example``, ``(B, ...)``) to ``path``; returns
    the report: opset, quantizer points, integer-weight layers, how each post-softmax and
    post-GELU point is written, the initializer bytes by data type.

    The graph has one input, ``input``, and one output per output tensor of the model:
    ``output`` for a tensor, ``output_0``, ``output_1``, ... for a tuple or list of tensors
    (a detector's feature levels).

    int8: every point in 8-bit containers (4-bit codes stay 4-bit values, clipped to their
    range), the form onnxruntime runs with integer kernels; the default stores 4-bit codes
    as uint4. Log quantizers stay exact either way; to run the post-softmax ones as integers,
    call :func:`uniform_post_softmax` first.
    signed_weights: 8-bit weight codes and zero points stored as ``int8``, less 128 (the same
    weights; codes in 4-bit containers, and those of the integer convolutions of an ``int8``
    export, stay unsigned): onnxruntime's fast uint8 x int8 path on CPUs with VNNI or AMX; not
    for CPUs without VNNI (``docs/deploy.md``).
    dynamic_batch: the batch size is a dynamic dimension (else every shape is ``example``'s:
    a model whose graph depends on the input size, such as Swin's shifted-window masks, is
    exported at one size).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    net = integer_model(model, int8, signed_weights)
    points = sum(isinstance(m, QuantDequant) for m in net.modules())
    layers = [m for m in net.modules() if isinstance(m, IntegerWeights)]
    with torch.no_grad():
        outputs = net(example)
    single = isinstance(outputs, torch.Tensor)
    output_names = ["output"] if single else [f"output_{i}" for i in range(len(outputs))]
    proto = _traced(net, example, output_names, dynamic_batch)
    retyped = _store_low_bit_codes(proto.graph)
    _drop_trace_metadata(proto.graph)
    onnx.checker.check_model(proto)
    with atomic_path(path) as tmp:
        onnx.save(proto, tmp)
    return {
        "path": str(path),
        "bytes": path.stat().st_size,
        "opset": OPSET,
        "int8": int8,
        "signed_weight_layers": sum(m.codes.dtype == torch.int8 for m in layers),
        "input_shape": ["batch", *example.shape[1:]] if dynamic_batch else list(example.shape),
        "outputs": output_names,
        "quantizer_points": points,
        "integer_weight_layers": len(layers),
        "uint4_initializers": retyped,
        "post_softmax": describe_post_softmax(model),
        "post_gelu": describe_post_gelu(model),
        "initializer_bytes": _initializer_bytes(proto.graph),
        "ops": dict(sorted(Counter(node.op_type for node in proto.graph.node).items())),
        "bits_by_q_node": _bits_by_node(proto.graph),
    }


def _drop_trace_metadata(graph: onnx.GraphProto) -> None:
    """Remove the exporter's per-node trace metadata (stack traces, module paths: about 40% of
    a small model's file); the quantizer bit widths stay."""
    for node in graph.node:
        keep = [(p.key, p.value) for p in node.metadata_props if p.key in (BITS_KEY, CONTAINER_KEY)]
        del node.metadata_props[:]
        for key, value in keep:
            node.metadata_props.add(key=key, value=value)


def _initializer_bytes(graph: onnx.GraphProto) -> dict[str, int]:
    """The bytes the initializers take in the file, by data type (``uint8``, ``uint4``, ...)."""
    by_type = Counter()
    for t in graph.initializer:
        by_type[onnx.TensorProto.DataType.Name(t.data_type).lower()] += _stored_bytes(t)
    return dict(sorted(by_type.items()))


def _stored_bytes(t: onnx.TensorProto) -> int:
    """Bytes of an initializer's values as stored (``raw_data``, packed for 4-bit types)."""
    return len(t.raw_data) if t.raw_data else numpy_helper.to_array(t).nbytes


def _bits_by_node(graph: onnx.GraphProto) -> dict[str, int]:
    """How many ``QuantizeLinear`` nodes quantize to each bit width."""
    out: dict[str, int] = {}
    for node in graph.node:
        if node.op_type == "QuantizeLinear":
            bits = {p.key: p.value for p in node.metadata_props}.get(BITS_KEY, "?")
            out[bits] = out.get(bits, 0) + 1
    return out


__all__ = [
    "attention_points",
    "describe_post_softmax",
    "export_onnx",
    "integer_model",
    "uniform_post_softmax",
]
