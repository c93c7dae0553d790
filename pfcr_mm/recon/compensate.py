"""Closed-form compensation after reconstruction (``docs/method.md`` section 4,
``ptq.recon.compensate``): bias correction.

Quantization moves the mean of a layer's output: rounding, clipping and the errors of the layers
before it do not average out over the calibration images. :func:`correct_biases` measures, for
every quantized layer, the mean of its output per output channel in floating point and with the
model quantized, and adds the difference to the layer's ``bias_correction`` (``bias`` of a layer
without one), which applies only while its weights are quantized (the FP state stays the FP
model, the reference of every error we report) and which the export and the saved model fold
into the bias. A correction moves the inputs of the layers after it, so all layers are corrected
at once and the whole is repeated ``rounds`` times (each round: one FP and one quantized pass
over the calibration batches).

Evidence on the demo ViT ([benchmarks](benchmarks.md)): the full closed-form update of the
weights too (ERQ-style ridge regression of each linear's quantized-path input onto its FP output,
then the weights requantized) made the W3A3 held-out logit error of calibration alone 1.1-3x
worse at every ridge strength tried (0.1-10), while the bias alone lowered it; so only the bias
is corrected.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from ..quant.calibrate import quantizer_states
from ..quant.modules import QUANT_LAYERS


def _channel_axis(layer: nn.Module) -> int:
    """The output-channel axis of a quantized layer's output: last for a linear, 1 for a
    convolution."""
    return -1 if isinstance(layer, nn.Linear) else 1


@torch.no_grad()
def _output_means(
    layers: dict[str, nn.Module], forward_loop: Callable[[], None]
) -> dict[str, torch.Tensor]:
    """Per layer that ``forward_loop()`` reaches, the mean of its output per output channel
    (float64), over every position of every batch."""
    sums: dict[str, torch.Tensor] = {}
    counts: dict[str, int] = {}

    def hook(name: str, layer: nn.Module):
        def record(module, args, out):
            rows = (
                out.detach()
                .movedim(_channel_axis(layer), -1)
                .reshape(-1, out.shape[_channel_axis(layer)])
            )
            sums[name] = sums.get(name, 0) + rows.double().sum(0)
            counts[name] = counts.get(name, 0) + rows.shape[0]

        return record

    handles = [layer.register_forward_hook(hook(n, layer)) for n, layer in layers.items()]
    try:
        forward_loop()
    finally:
        for h in handles:
            h.remove()
    return {n: sums[n] / counts[n] for n in sums}


@torch.no_grad()
def correct_biases(model: nn.Module, forward_loop: Callable[[], None], rounds: int = 2) -> dict:
    """Correct the output mean of every quantized layer of ``model`` (weights in the quantized
    state) that ``forward_loop()`` reaches; ``forward_loop`` runs the model over the calibration
    batches. Returns the report: per round, the mean squared shift of the layers' output means
    relative to their FP means' mean square (summed over layers), before that round's
    correction; and how many layers were corrected.
    """
    layers = {
        n: m
        for n, m in model.named_modules()
        if isinstance(m, QUANT_LAYERS) and m.weight_quantizer.state == "quant"
    }
    shifts = []
    for _ in range(rounds):
        with quantizer_states(model, weights=False, activations=False):
            fp = _output_means(layers, forward_loop)
        quantized = _output_means(layers, forward_loop)
        num = den = 0.0
        for name, mean in quantized.items():
            delta = fp[name] - mean
            num += float(delta.pow(2).mean())
            den += float(fp[name].pow(2).mean())
            layer = layers[name]
            old = layer.bias_correction
            new = delta.to(layer.weight.dtype)
            layer.bias_correction = new if old is None else old + new
        shifts.append(num / max(den, 1e-30))
    corrected = sum(layers[n].bias_correction is not None for n in layers)
    return {"method": "bias", "rounds": rounds, "layers": corrected, "mean_shift_per_round": shifts}


__all__ = ["correct_biases"]
