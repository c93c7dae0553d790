"""The integer form of a quantized model: what an ONNX graph with ``QuantizeLinear`` /
``DequantizeLinear`` computes, as PyTorch modules.

Each module runs in PyTorch (the reference the exported graph is checked against) and, inside
``torch.onnx.export(..., dynamo=True)``, emits the ONNX quantization operators themselves through
``torch.onnx.ops.symbolic``:

* :class:`QuantDequant`: an activation quantizer point, ``DequantizeLinear(QuantizeLinear(x))``
  with the calibrated scale and zero point (per tensor, or per channel along ``axis``);
* :class:`IntegerLinear` / :class:`IntegerConv2d` / :class:`IntegerConvTranspose2d`: the
  weights as integer codes (the hardened AdaRound rounding,
  :meth:`~pfcr_mm.quant.AdaRoundWeightQuantizer.integer_weight`) with per-output-channel
  scales and zero points, dequantized by ``DequantizeLinear``, after a :class:`QuantDequant`
  of the input;
* :class:`LogQuantDequant`: a log quantizer (post-softmax, or above the minimum at a post-GELU
  linear's input), which has no linear Q/DQ form, in elementary operators (``Div``, ``Log``,
  ``Round``, ``Clip``, ``Gather``).

Codes are stored in a container of ``container`` bits: ``uint8``, or ``uint4`` (ONNX opset 21,
two codes per byte in the file) for 4 bits and fewer. A quantizer of fewer bits than its
container clips its input to its own range first, so the container never holds a code the fake
quantizer could not produce.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..quant.modules import QuantConv2d, QuantConvTranspose2d, QuantLinear
from ..quant.quantizers import LogQuantizer, UniformQuantizer, quant_dequant

# ONNX TensorProto data types of the code containers
ONNX_TYPES = {4: 21, 8: 2}  # UINT4, UINT8
OPSET = 21  # QuantizeLinear/DequantizeLinear with 4-bit types
BITS_KEY = "pfcr_bits"  # node metadata: the quantizer's own bit width
CONTAINER_KEY = "pfcr_container"  # node metadata: the bits of its code container


def container_bits(bits: int, int8: bool) -> int:
    """The code container of a ``bits``-bit quantizer: 4 for 4 bits and fewer, unless every
    point is to be 8 bits wide (``int8``: what onnxruntime's integer kernels take), else 8."""
    return 4 if bits <= 4 and not int8 else 8


def _q_dq_attrs(axis: int | None) -> dict:
    return {} if axis is None else {"axis": axis}


def dequantize(
    codes: torch.Tensor,
    scale: torch.Tensor,
    zero_point: torch.Tensor,
    axis: int | None,
    bits: int,
    container: int,
) -> torch.Tensor:
    """``(codes - zero_point) * scale``, per channel along ``axis`` (``None``: per tensor);
    ``DequantizeLinear`` in an ONNX export. ``codes``/``zero_point``: uint8 tensors of
    ``bits``-bit values (or int8 ones, the same values less 128: signed weight codes),
    ``scale``: float of the shape of ``zero_point``."""
    if torch.onnx.is_in_onnx_export():
        return torch.onnx.ops.symbolic(
            "DequantizeLinear",
            (codes, scale, zero_point),
            _q_dq_attrs(axis),
            dtype=scale.dtype,
            shape=codes.shape,
            version=OPSET,
            metadata_props={BITS_KEY: str(bits), CONTAINER_KEY: str(container)},
        )
    shape = [1] * codes.dim()
    if axis is not None:
        shape[axis] = -1
    return (codes.float() - zero_point.reshape(shape).float()) * scale.reshape(shape)


class QuantDequant(nn.Module):
    """An activation quantizer point: ``x_hat = (clamp(round(x / s) + z, 0, 2^b - 1) - z) * s``
    with the calibrated ``s`` and ``z`` of a :class:`~pfcr_mm.quant.UniformQuantizer`, per
    tensor or per channel along ``axis``; any input shape."""

    def __init__(self, quantizer: UniformQuantizer, int8: bool):
        super().__init__()
        self.bits = quantizer.bits
        self.container = container_bits(self.bits, int8)
        self.axis = quantizer.ch_axis
        self.register_buffer("scale", quantizer.scale.detach().float().clone())
        self.register_buffer("zero_point", quantizer.zero_point.detach().to(torch.uint8))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not torch.onnx.is_in_onnx_export():
            shape = [1] * x.dim()
            if self.axis is not None:
                shape[self.axis] = -1
            zp = self.zero_point.reshape(shape).float()
            return quant_dequant(x, self.scale.reshape(shape), zp, 2**self.bits - 1)
        return self.dequantize(self.quantize(x))

    def quantize(self, x: torch.Tensor) -> torch.Tensor:
        """The codes of ``x``: ``QuantizeLinear`` (in an ONNX export only)."""
        if self.bits < self.container:  # clip to this quantizer's own codes [0, 2^b - 1]
            zp = self.zero_point.float()
            x = torch.clamp(x, -zp * self.scale, (2**self.bits - 1 - zp) * self.scale)
        meta = {BITS_KEY: str(self.bits), CONTAINER_KEY: str(self.container)}
        return torch.onnx.ops.symbolic(
            "QuantizeLinear",
            (x, self.scale, self.zero_point),
            _q_dq_attrs(self.axis),
            dtype=ONNX_TYPES[self.container],
            shape=x.shape,
            version=OPSET,
            metadata_props=meta,
        )

    def dequantize(self, codes: torch.Tensor) -> torch.Tensor:
        """The values of the codes of :meth:`quantize`: ``DequantizeLinear``."""
        return dequantize(codes, self.scale, self.zero_point, self.axis, self.bits, self.container)

    def extra_repr(self) -> str:
        where = "per tensor" if self.axis is None else f"per channel (axis {self.axis})"
        return f"bits={self.bits}, container={self.container}, {where}"


class IntegerWeights(nn.Module):
    """Integer weight codes with per-output-channel scales and zero points (along
    ``channel_axis`` of the stored codes), and the input quantizer point of a quantized layer;
    ``transpose``: the codes are stored transposed (a linear's); ``signed``: 8-bit containers
    hold ``int8`` codes and zero points, both less 128 (the same weights: onnxruntime then
    multiplies uint8 activations by int8 weights, the form VNNI/AMX CPUs run fastest)."""

    def __init__(
        self,
        layer: QuantLinear | QuantConv2d | QuantConvTranspose2d,
        int8: bool,
        channel_axis: int,
        transpose: bool = False,
        signed: bool = False,
    ):
        super().__init__()
        wq = layer.weight_quantizer
        self.bits = wq.bits
        self.container = container_bits(self.bits, int8)
        self.channel_axis = channel_axis
        codes = wq.integer_weight(layer.corrected_weight().detach()).to(torch.uint8)
        zero_point = wq.zero_point.detach().to(torch.uint8)
        if signed and self.container == 8:
            codes, zero_point = (
                t.to(torch.int16).sub(128).to(torch.int8) for t in (codes, zero_point)
            )
        self.register_buffer("codes", codes.t().contiguous() if transpose else codes)
        self.register_buffer("weight_scale", wq.scale.detach().float().reshape(-1).clone())
        self.register_buffer("weight_zero_point", zero_point)
        bias = layer.folded_bias()
        bias = None if bias is None else bias.detach().clone()
        self.register_buffer("bias", bias)
        self.input_quantizer = activation_point(layer.input_quantizer, int8)

    def weight(self) -> torch.Tensor:
        return dequantize(
            self.codes,
            self.weight_scale,
            self.weight_zero_point.reshape(-1),
            self.channel_axis,
            self.bits,
            self.container,
        )


class IntegerLinear(IntegerWeights):
    """``y = Q(x + shift) @ W_hat^T + b``: the codes are stored transposed, ``(in, out)``,
    per output channel along axis 1, so the exported ``MatMul`` reads the dequantized codes
    directly (onnxruntime fuses ``DequantizeLinear -> MatMul`` into an integer matmul).
    ``x``: ``(..., in)``, ``y``: ``(..., out)``."""

    def __init__(self, layer: QuantLinear, int8: bool, signed: bool = False):
        super().__init__(layer, int8, channel_axis=1, transpose=True, signed=signed)
        shift = layer.input_shift
        self.register_buffer("input_shift", None if shift is None else shift.detach().clone())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.input_shift is not None:
            x = x + self.input_shift
        x = self.input_quantizer(x)
        if not torch.onnx.is_in_onnx_export():
            # the fake-quant layer's own call (F.linear on the (out, in) weight): the PyTorch
            # integer model then equals the fake-quant model bit for bit
            return F.linear(x, self.weight().t().contiguous(), self.bias)
        y = torch.matmul(x, self.weight())
        return y if self.bias is None else y + self.bias


class IntegerConv2d(IntegerWeights):
    """``y = conv2d(Q(x), W_hat) + b`` with the convolution's geometry; codes
    ``(out, in / groups, kh, kw)`` per output channel along axis 0. ``x``: ``(B, C, H, W)``.

    In an ``int8`` export (8-bit containers, a per-tensor input point, ``groups=1``) the
    convolution is written as integers, :meth:`integer_conv`; else as ``DequantizeLinear`` of
    the codes into a float ``Conv`` (onnxruntime does not fuse that one into an integer
    kernel). Its codes stay unsigned either way: onnxruntime 1.32's ``ConvInteger`` is 4x
    slower with int8 weights than with uint8 ones (``docs/deploy.md``)."""

    def __init__(self, layer: QuantConv2d, int8: bool, signed: bool = False):
        integer = (
            int8
            and layer.groups == 1
            and layer.input_quantizer.ch_axis is None
            and not isinstance(layer.padding, str)  # 'same' / 'valid': the float form
        )
        super().__init__(layer, int8, channel_axis=0, signed=signed and not integer)
        if layer.padding_mode != "zeros":
            raise ValueError(f"padding_mode={layer.padding_mode!r} is not exported")
        self.integer = integer  # int8: the codes and the input point in 8-bit containers
        self.stride, self.padding = layer.stride, layer.padding
        self.dilation, self.groups = layer.dilation, layer.groups

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.integer and torch.onnx.is_in_onnx_export():
            return self.integer_conv(x)
        return F.conv2d(
            self.input_quantizer(x),
            self.weight(),
            self.bias,
            self.stride,
            self.padding,
            self.dilation,
            self.groups,
        )

    def integer_conv(self, x: torch.Tensor) -> torch.Tensor:
        """The convolution as integers, for onnxruntime's ``ConvInteger``, which takes one
        weight zero point per tensor (1.32 refuses per-channel ones):
        ``sum (x - zx)(w - zw[c]) = ConvInteger(x, w, zx, 0) - zw[c] * sum (x - zx)``, the
        second sum over the window and every input channel: a one-channel float ``Conv`` of
        the dequantized input summed over channels, by a kernel of ones. Then
        ``y = sx * sw[c] * (first - second) + b``, in one ``DequantizeLinear`` of the int32
        accumulator and one ``Conv`` (1x1, ``zw * sw`` and ``-b``) that onnxruntime fuses
        with the subtraction."""
        q = self.input_quantizer
        codes = q.quantize(x)
        geometry = {
            "strides": list(self.stride),
            "pads": [*self.padding, *self.padding],
            "dilations": list(self.dilation),
        }
        kh, kw = self.codes.shape[2:]
        size = [
            (n + 2 * p - d * (k - 1) - 1) // s + 1
            for n, p, d, k, s in zip(
                x.shape[2:], self.padding, self.dilation, (kh, kw), self.stride
            )
        ]
        acc = torch.onnx.ops.symbolic(
            "ConvInteger",
            (codes, self.codes, q.zero_point),
            geometry,
            dtype=6,  # INT32
            shape=(x.shape[0], self.codes.shape[0], *size),
            version=OPSET,
        )
        scale = q.scale * self.weight_scale
        zero = torch.zeros(scale.shape, dtype=torch.int32, device=scale.device)
        main = dequantize(acc, scale, zero, 1, 32, 32)
        window = F.conv2d(
            q.dequantize(codes).sum(1, keepdim=True),
            torch.ones(1, 1, kh, kw, dtype=x.dtype, device=x.device),
            None,
            self.stride,
            self.padding,
            self.dilation,
        )
        zw = (self.weight_zero_point.float() * self.weight_scale).view(-1, 1, 1, 1)
        bias = None if self.bias is None else -self.bias
        return main - F.conv2d(window, zw, bias)


class IntegerConvTranspose2d(IntegerWeights):
    """``y = conv_transpose2d(Q(x), W_hat) + b`` with the layer's geometry; codes
    ``(in, out, kh, kw)`` per output channel along axis 1. ``x``: ``(B, C, H, W)``.

    The bias is added after the operator, not given to it: onnxruntime's
    WeightBiasQuantization rewrites the float bias of a ``ConvTranspose`` fed by
    ``DequantizeLinear`` into integers with the weight scales of the wrong axis (onnxruntime
    1.32: off by 0.6 of a range of 9 at W4A4); the transposed convolution runs in floating
    point there either way."""

    def __init__(self, layer: QuantConvTranspose2d, int8: bool, signed: bool = False):
        super().__init__(layer, int8, channel_axis=1, signed=signed)
        self.stride, self.padding = layer.stride, layer.padding
        self.output_padding, self.dilation = layer.output_padding, layer.dilation

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.conv_transpose2d(
            self.input_quantizer(x),
            self.weight(),
            None,
            self.stride,
            self.padding,
            self.output_padding,
            1,
            self.dilation,
        )
        return y if self.bias is None else y + self.bias.view(1, -1, 1, 1)


class LogQuantDequant(nn.Module):
    """A log quantizer's value (:meth:`~pfcr_mm.quant.LogQuantizer.quant_dequant`), which the
    exporter writes as elementary ONNX operators: the log-domain code, rounded and clipped,
    indexes a table of the ``2^b`` levels and 0 (above the offset of a shifted one)."""

    def __init__(self, quantizer: LogQuantizer):
        super().__init__()
        self.log = quantizer

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.log.quant_dequant(x)


def activation_point(quantizer: LogQuantizer | UniformQuantizer, int8: bool) -> nn.Module:
    """The integer form of an activation quantizer point: :class:`LogQuantDequant` of a log
    quantizer, :class:`QuantDequant` of a uniform one."""
    if isinstance(quantizer, LogQuantizer):
        return LogQuantDequant(quantizer)
    return QuantDequant(quantizer, int8)
