"""Quantized Linear and Conv2d: an input quantizer, a weight quantizer, then the float op.

Both subclass the module they replace, so code that checks ``isinstance(m, nn.Linear)`` (mmcv's
wrappers, timm's init) keeps working, and they share the original parameters.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .quantizers import AdaRoundWeightQuantizer, UniformQuantizer


class QuantLinear(nn.Linear):
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

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        # re-parameterization adds an input shift, and a bias to a bias-free linear
        if prefix + "input_shift" in state_dict and self.input_shift is None:
            self.input_shift = torch.empty_like(state_dict[prefix + "input_shift"])
        if prefix + "bias" in state_dict and self.bias is None:
            self.bias = nn.Parameter(torch.empty_like(state_dict[prefix + "bias"]))
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.input_shift is not None:
            x = x + self.input_shift
        return F.linear(self.input_quantizer(x), self.weight_quantizer(self.weight), self.bias)


class QuantConv2d(nn.Conv2d):
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
        self.weight = conv.weight
        self.bias = conv.bias
        self.weight_quantizer = AdaRoundWeightQuantizer(w_bits, 0, weight_range)
        self.weight_quantizer.calibrate_from(self.weight)
        self.input_quantizer = UniformQuantizer(a_bits, range_method=range_method)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._conv_forward(
            self.input_quantizer(x), self.weight_quantizer(self.weight), self.bias
        )
