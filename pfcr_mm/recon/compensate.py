"""Closed-form compensation after reconstruction (``docs/method.md`` section 4,
``ptq.recon.compensate``): bias correction.

Quantization moves the mean of a layer's output: rounding, clipping and the errors of the layers
before it do not average out over the calibration images. :func:`correct_biases` measures, for
every quantized layer, the mean of its output per output channel in floating point (one pass
for all layers) and with the model quantized, and adds the difference to the layer's
``bias_correction``, which applies only while its weights are quantized (the FP state stays the
FP model, the reference of every error we report) and which the export folds into the bias.

A correction moves the inputs of every layer after it, so the layers are corrected one after
the other in the order the forward reaches them, each measured with the corrections before it
in place; the quantized pass of a layer stops at that layer (about half a forward pass per layer
on average). Correcting all layers at once from one pass, repeated, converged too slowly: on
the demo ViT the second round still moved the means by three quarters of the first and the
held-out error rose.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from ..quant.calibrate import quantizer_states
from ..quant.modules import QUANT_LAYERS


def _channel_axis(layer: nn.Module) -> int:
    """The output-channel axis of a quantized layer's output: last for a linear, 1 for a
    convolution."""
    return -1 if isinstance(layer, nn.Linear) else 1


class _Reached(Exception):
    """Raised by the hook of the layer being measured: the rest of the forward is not needed."""


@torch.no_grad()
def _output_means(
    model: nn.Module,
    layers: dict[str, nn.Module],
    batches: list,
    run_batch: Callable[[nn.Module, Any], Any],
    stop: bool = False,
) -> dict[str, torch.Tensor]:
    """Per layer of ``layers`` that the forward reaches, in the order it first does: the mean
    of its output per output channel (float64) over the batches. ``stop``: each batch's forward
    ends at the (one) layer."""
    stats: dict[str, tuple] = {}

    def hook(name: str, layer: nn.Module):
        axis = _channel_axis(layer)

        def record(module, args, out):
            rows = out.detach().movedim(axis, -1).reshape(-1, out.shape[axis]).double()
            total, count = stats.get(name, (0.0, 0))
            stats[name] = (total + rows.sum(0), count + rows.shape[0])
            if stop:
                raise _Reached

        return record

    handles = [layer.register_forward_hook(hook(n, layer)) for n, layer in layers.items()]
    try:
        for batch in batches:
            try:
                run_batch(model, batch)
            except _Reached:
                pass
    finally:
        for h in handles:
            h.remove()
    return {n: total / count for n, (total, count) in stats.items()}


def _relative_shift(fp: dict, quantized: dict) -> float:
    """``sum ||fp - q||^2 / sum ||fp||^2`` over the layers' output means."""
    num = sum(float((fp[n] - q).pow(2).sum()) for n, q in quantized.items())
    return num / max(sum(float(fp[n].pow(2).sum()) for n in quantized), 1e-30)


@torch.no_grad()
def correct_biases(
    model: nn.Module, batches: list, run_batch: Callable[[nn.Module, Any], Any]
) -> dict:
    """Correct the output mean of every quantized layer of ``model`` (weights in the quantized
    state) that ``run_batch(model, batch)`` reaches over the calibration ``batches``, one
    layer after the other. Returns the report: how many layers were corrected and the relative
    shift of their output means from the FP ones (:func:`_relative_shift`) before and after.
    """
    layers = {
        n: m
        for n, m in model.named_modules()
        if isinstance(m, QUANT_LAYERS) and m.weight_quantizer.state == "quant"
    }
    with quantizer_states(model, weights=False, activations=False):
        fp = _output_means(model, layers, batches, run_batch)
    before = _output_means(model, layers, batches, run_batch)
    for name in fp:
        layer = layers[name]
        q = _output_means(model, {name: layer}, batches, run_batch, stop=True)[name]
        delta = (fp[name] - q).to(layer.weight.dtype)
        old = layer.bias_correction
        layer.bias_correction = delta if old is None else old + delta
    after = _output_means(model, layers, batches, run_batch)
    return {
        "method": "bias",
        "layers": len(fp),
        "relative_mean_shift_before": _relative_shift(fp, before),
        "relative_mean_shift_after": _relative_shift(fp, after),
    }


__all__ = ["correct_biases"]
