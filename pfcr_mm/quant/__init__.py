"""Quantizers and quantized modules (pure torch)."""

from .calibrate import (
    calibrate_activations,
    hard_rounding,
    learned_rounding,
    quant_summary,
    quantizer_states,
    set_quant_state,
)
from .modules import QUANT_LAYERS, QuantConv2d, QuantConvTranspose2d, QuantLinear
from .quantizers import AdaRoundWeightQuantizer, LogQuantizer, UniformQuantizer

__all__ = [
    "QUANT_LAYERS",
    "AdaRoundWeightQuantizer",
    "LogQuantizer",
    "QuantConv2d",
    "QuantConvTranspose2d",
    "QuantLinear",
    "UniformQuantizer",
    "calibrate_activations",
    "hard_rounding",
    "learned_rounding",
    "quant_summary",
    "quantizer_states",
    "set_quant_state",
]
