"""Quantized Linear, Conv2d and ConvTranspose2d: an input quantizer, a weight quantizer, then the
float op.

Each subclasses the module it replaces, so code that checks ``isinstance(m, nn.Linear)`` (mmcv's
wrappers, timm's init) keeps working, and they share the original parameters.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .quantizers import AdaRoundWeightQuantizer, UniformQuantizer


class Compensated(nn.Module):
    """The optional closed-form corrections of a quantized layer (:mod:`pfcr_mm.recon.compensate`):
    ``weight_correction``, added to the weight before its quantizer (GPTQ's updates), and
    ``bias_correction``, added to the bias. Both apply only while the weights are quantized, so
    that the model's floating-point state stays the FP model; the saved integer codes, the export
    and :meth:`folded_bias` / :meth:`corrected_weight` include them for good."""

    weight_correction: torch.Tensor | None
    bias_correction: torch.Tensor | None
    # buffers that stay None until something sets them: loading a state dict that holds them
    # creates them first, on the layer's device (a saved state may come from another)
    optional_buffers: tuple[str, ...] = ("weight_correction", "bias_correction")

    def folded_bias(self) -> torch.Tensor | None:
        """The bias with the correction added (``None``: neither)."""
        c = self.bias_correction
        if c is None:
            return self.bias
        return c if self.bias is None else self.bias + c

    def corrected_weight(self) -> torch.Tensor:
        """The weight the quantizer rounds: the FP weight plus the correction, if any."""
        c = self.weight_correction
        return self.weight if c is None else self.weight + c

    def active_bias(self) -> torch.Tensor | None:
        """What the forward adds: :meth:`folded_bias` while the weights are quantized."""
        return self.folded_bias() if self.weight_quantizer.state == "quant" else self.bias

    def active_weight(self) -> torch.Tensor:
        """What the forward multiplies by: the quantized :meth:`corrected_weight` while the
        weights are quantized, the FP weight otherwise."""
        quantizing = self.weight_quantizer.state == "quant"
        return self.weight_quantizer(self.corrected_weight() if quantizing else self.weight)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        for name in self.optional_buffers:
            stored = state_dict.get(prefix + name)
            if stored is not None and getattr(self, name) is None:
                setattr(self, name, torch.empty_like(stored, device=self.weight.device))
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)


class QuantLinear(Compensated, nn.Linear):
    """``y = W_hat x_hat + b``; weights per output channel, input per tensor or per channel.
    ``range_method`` / ``weight_range``: range search of the input / the weights
    (``QuantConfig.act_range`` / ``weight_range``)."""

    def __init__(
        self,
        linear: nn.Linear,
        w_bits: int,
        a_bits: int,
        act_per_channel: bool = False,
        range_method: str = "mse",
        weight_range: str = "mse",
    ):
        super().__init__(
            linear.in_features, linear.out_features, linear.bias is not None, device="meta"
        )
        self.weight = linear.weight
        self.bias = linear.bias
        self.weight_quantizer = AdaRoundWeightQuantizer(w_bits, 0, weight_range)
        self.weight_quantizer.calibrate_from(self.weight)
        self.input_quantizer = UniformQuantizer(
            a_bits, ch_axis=-1 if act_per_channel else None, range_method=range_method
        )
        # Per-channel shift of the input set by the post-LayerNorm re-parameterization (reparam.py)
        self.register_buffer("input_shift", None)
        self.register_buffer("weight_correction", None)
        self.register_buffer("bias_correction", None)

    # re-parameterization adds an input shift (reparam.py)
    optional_buffers = ("input_shift", *Compensated.optional_buffers)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        # re-parameterization adds a bias to a bias-free linear
        if prefix + "bias" in state_dict and self.bias is None:
            self.bias = nn.Parameter(torch.empty_like(state_dict[prefix + "bias"]))
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.input_shift is not None:
            x = x + self.input_shift
        w = self.active_weight()
        return F.linear(self.input_quantizer(x), w, self.active_bias())


class QuantConv2d(Compensated, nn.Conv2d):
    """Conv2d with per-output-channel weights and a per-tensor input quantizer."""

    def __init__(
        self,
        conv: nn.Conv2d,
        w_bits: int,
        a_bits: int,
        range_method: str = "mse",
        weight_range: str = "mse",
    ):
        super().__init__(
            conv.in_channels,
            conv.out_channels,
            conv.kernel_size,
            conv.stride,
            conv.padding,
            conv.dilation,
            conv.groups,
            conv.bias is not None,
            conv.padding_mode,
            device="meta",
        )
        _share_and_quantize(self, conv, w_bits, a_bits, range_method, weight_range, ch_axis=0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.active_weight()
        return self._conv_forward(self.input_quantizer(x), w, self.active_bias())


class QuantConvTranspose2d(Compensated, nn.ConvTranspose2d):
    """ConvTranspose2d with per-output-channel weights (axis 1 of its ``(in, out, kh, kw)``
    weight) and a per-tensor input quantizer; ungrouped, the output size from the layer's own
    ``output_padding``."""

    def __init__(
        self,
        conv: nn.ConvTranspose2d,
        w_bits: int,
        a_bits: int,
        range_method: str = "mse",
        weight_range: str = "mse",
    ):
        if conv.groups != 1:
            raise ValueError("a grouped transposed convolution is not quantized")
        super().__init__(
            conv.in_channels,
            conv.out_channels,
            conv.kernel_size,
            conv.stride,
            conv.padding,
            conv.output_padding,
            conv.groups,
            conv.bias is not None,
            conv.dilation,
            conv.padding_mode,
            device="meta",
        )
        _share_and_quantize(self, conv, w_bits, a_bits, range_method, weight_range, ch_axis=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.active_weight()
        return F.conv_transpose2d(
            self.input_quantizer(x),
            w,
            self.active_bias(),
            self.stride,
            self.padding,
            self.output_padding,
            self.groups,
            self.dilation,
        )


def _share_and_quantize(
    layer: nn.Module,
    source: nn.Module,
    w_bits: int,
    a_bits: int,
    range_method: str,
    weight_range: str,
    ch_axis: int,
) -> None:
    """Give ``layer`` the parameters of ``source``, a weight quantizer per output channel
    (along ``ch_axis`` of the weight) calibrated on them, and a per-tensor input quantizer."""
    layer.weight = source.weight
    layer.bias = source.bias
    layer.weight_quantizer = AdaRoundWeightQuantizer(w_bits, ch_axis, weight_range)
    layer.weight_quantizer.calibrate_from(layer.weight)
    layer.input_quantizer = UniformQuantizer(a_bits, range_method=range_method)
    layer.register_buffer("weight_correction", None)
    layer.register_buffer("bias_correction", None)


# every quantized layer class: an input quantizer, a weight quantizer, integer weight codes
QUANT_LAYERS = (QuantLinear, QuantConv2d, QuantConvTranspose2d)
