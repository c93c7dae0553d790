"""Closed-form compensation (``docs/method.md`` section 4, ``ptq.recon.compensate``): GPTQ's
weight rounding after calibration (:func:`gptq_weights`), bias correction after the
reconstruction (:func:`correct_biases`).

Quantization moves the mean of a layer's output: rounding, clipping and the errors of the layers
before it do not average out over the calibration images. :func:`correct_biases` measures, for
every quantized layer, the mean of its output per output channel in floating point (one pass
for all layers) and with the model quantized, and adds the difference to the layer's
``bias_correction``, which applies only while its weights are quantized (the FP state stays the
FP model, the reference of every error we report) and which the export folds into the bias.

A correction moves the inputs of every layer after it, so the layers are corrected one after
the other in the order the forward reaches them, each measured with the corrections before it
in place; the quantized pass of a layer stops at that layer (about half a forward pass per layer
on average; a layer that runs several times per forward, as a head shared by the FPN levels,
stops at its last run). A detector's RoI heads are left out: the FP and the quantized runs give
them different proposals. Correcting all layers at once from one pass, repeated, converged too
slowly: on the demo ViT the second round still moved the means by three quarters of the first
and the held-out error rose.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..quant.calibrate import quantizer_states
from ..quant.modules import QUANT_LAYERS, QuantConv2d, QuantConvTranspose2d, QuantLinear
from ..quant.quantizers import quant_dequant


def _channel_axis(layer: nn.Module) -> int:
    """The output-channel axis of a quantized layer's output: last for a linear, 1 for a
    convolution."""
    return -1 if isinstance(layer, nn.Linear) else 1


class _Reached(BaseException):
    """Raised by the hook of the layer being measured once the layer has run as often as in
    the FP run of the batch: the rest of the forward is not needed (a ``BaseException``, so
    that code catching ``Exception`` on the way does not swallow it)."""


@torch.no_grad()
def _output_means(
    model: nn.Module,
    layers: dict[str, nn.Module],
    batches: list,
    run_batch: Callable[[nn.Module, Any], Any],
    stop_after: int = 0,
) -> tuple[dict[str, torch.Tensor], dict[str, int]]:
    """Per layer of ``layers`` that the forward reaches, in the order it first does: the mean
    of its output per output channel (float64) over the batches, and how many times it ran in
    the last batch. ``stop_after``: each batch's forward ends when the (one) layer has run this
    many times (a head shared by the FPN levels runs once per level)."""
    stats: dict[str, tuple] = {}
    calls: dict[str, int] = {}

    def hook(name: str, layer: nn.Module):
        axis = _channel_axis(layer)

        def record(module, args, out):
            rows = out.detach().movedim(axis, -1).reshape(-1, out.shape[axis]).double()
            total, count = stats.get(name, (0.0, 0))
            stats[name] = (total + rows.sum(0), count + rows.shape[0])
            calls[name] = calls.get(name, 0) + 1
            if calls[name] == stop_after:
                raise _Reached

        return record

    handles = [layer.register_forward_hook(hook(n, layer)) for n, layer in layers.items()]
    try:
        for batch in batches:
            calls.clear()
            try:
                run_batch(model, batch)
            except _Reached:
                pass
    finally:
        for h in handles:
            h.remove()
    return {n: total / count for n, (total, count) in stats.items()}, dict(calls)


def _quantized_layers(model: nn.Module) -> dict[str, nn.Module]:
    """The quantized layers of ``model`` whose weights are in the quantized state, by name."""
    return {
        n: m
        for n, m in model.named_modules()
        if isinstance(m, QUANT_LAYERS) and m.weight_quantizer.state == "quant"
    }


def _relative_shift(fp: dict, quantized: dict) -> float:
    """``sum ||fp - q||^2 / sum ||fp||^2`` over the layers' output means."""
    num = sum(float((fp[n] - q).pow(2).sum()) for n, q in quantized.items())
    return num / max(sum(float(fp[n].pow(2).sum()) for n in quantized), 1e-30)


@torch.no_grad()
def correct_biases(
    model: nn.Module,
    batches: list,
    run_batch: Callable[[nn.Module, Any], Any],
    exclude: Sequence[nn.Module] = (),
) -> dict:
    """Correct the output mean of every quantized layer of ``model`` (weights in the quantized
    state) that ``run_batch(model, batch)`` reaches over the calibration ``batches``, one
    layer after the other; not those inside ``exclude`` (a detector's RoI heads, whose inputs,
    the proposals, the FP and the quantized runs do not share). Returns the report: how many
    layers were corrected and the relative shift of their output means from the FP ones
    (:func:`_relative_shift`) before and after.
    """
    skipped = {id(m) for root in exclude for m in root.modules()}
    layers = {n: m for n, m in _quantized_layers(model).items() if id(m) not in skipped}
    with quantizer_states(model, weights=False, activations=False):
        fp, calls = _output_means(model, layers, batches, run_batch)
    before, _ = _output_means(model, layers, batches, run_batch)
    for name in fp:
        layer = layers[name]
        q, _ = _output_means(model, {name: layer}, batches, run_batch, calls.get(name, 1))
        if name not in q:  # the quantized run does not reach it: nothing to correct
            continue
        delta = (fp[name] - q[name]).to(layer.weight.dtype)
        old = layer.bias_correction
        layer.bias_correction = delta if old is None else old + delta
    after, _ = _output_means(model, layers, batches, run_batch)
    return {
        "method": "bias",
        "layers": sum(layers[n].bias_correction is not None for n in fp),
        "relative_mean_shift_before": _relative_shift(fp, before),
        "relative_mean_shift_after": _relative_shift(fp, after),
    }


# GPTQ's dampening of the inputs' second moments: this share of their mean diagonal
GPTQ_DAMPING = 0.01
GPTQ_BLOCK = 128  # columns rounded before their errors reach the later columns


def _gptq_layers(model: nn.Module) -> dict[str, nn.Module]:
    """The layers :func:`gptq_weights` rounds: of :func:`_quantized_layers`, the linears, the
    convolutions whose patches ``F.unfold`` reproduces (ungrouped, zero or numeric padding) and
    the transposed convolutions whose kernels do not overlap (ungrouped, stride equal to the
    kernel, no padding or dilation: ViTDet's simple FPN)."""

    def unfoldable(m: nn.Module) -> bool:
        return m.groups == 1 and m.padding_mode == "zeros" and not isinstance(m.padding, str)

    def disjoint(m: nn.Module) -> bool:
        plain = m.padding == (0, 0) and m.output_padding == (0, 0) and m.dilation == (1, 1)
        return m.groups == 1 and m.stride == m.kernel_size and plain

    return {
        n: m
        for n, m in _quantized_layers(model).items()
        if isinstance(m, QuantLinear)
        or (isinstance(m, QuantConv2d) and unfoldable(m))
        or (isinstance(m, QuantConvTranspose2d) and disjoint(m))
    }


def _input_rows(layer: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The quantized input ``x`` of ``layer`` as the rows its weight matrix
    (:func:`_weight_matrix`) multiplies: a convolution's as unfolded patches, a transposed
    convolution's as its pixels (each writes its own output patch)."""
    if isinstance(layer, nn.Linear):
        return x.reshape(-1, x.shape[-1])
    if isinstance(layer, nn.ConvTranspose2d):
        return x.permute(0, 2, 3, 1).reshape(-1, x.shape[1])
    cols = F.unfold(x, layer.kernel_size, layer.dilation, layer.padding, layer.stride)
    return cols.transpose(1, 2).reshape(-1, cols.shape[1])


def _weight_matrix(layer: nn.Module, weight: torch.Tensor) -> torch.Tensor:
    """``weight`` as a matrix with a row per output value of an input row: a linear's or a
    convolution's output channels; a transposed convolution's (output channel, kernel row,
    kernel column), its columns the input channels."""
    if isinstance(layer, nn.ConvTranspose2d):
        return weight.permute(1, 2, 3, 0).reshape(-1, weight.shape[0])
    return weight.reshape(weight.shape[0], -1)


def _weight_from_matrix(layer: nn.Module, matrix: torch.Tensor) -> torch.Tensor:
    """The inverse of :func:`_weight_matrix`."""
    shape = layer.weight.shape
    if isinstance(layer, nn.ConvTranspose2d):
        return matrix.reshape(shape[1], shape[2], shape[3], shape[0]).permute(3, 0, 1, 2)
    return matrix.reshape(shape)


@torch.no_grad()
def _input_moments(
    model: nn.Module, layers: dict[str, nn.Module], batches: list, run_batch, print_fn=print
) -> dict[str, torch.Tensor]:
    """Per layer of ``layers`` that the forward reaches, in the order it first does: ``sum x
    x^T`` over every quantized input row ``x`` of the layer on ``batches`` (float32); a progress
    line per batch."""
    moments: dict[str, torch.Tensor] = {}

    def hook(name: str, layer: nn.Module):
        def record(module, args, out):
            x = out.detach().float()
            # a convolution's patches image by image: they are k*k times the size of its input
            for part in x.split(1) if isinstance(layer, nn.Conv2d) else [x]:
                rows = _input_rows(layer, part)
                if name in moments:
                    moments[name].addmm_(rows.T, rows)
                else:
                    moments[name] = rows.T @ rows

        return record

    quantizers = {n: m.input_quantizer for n, m in layers.items()}
    handles = [q.register_forward_hook(hook(n, layers[n])) for n, q in quantizers.items()]
    try:
        for i, batch in enumerate(batches):
            run_batch(model, batch)
            print_fn(f"gptq: inputs of batch {i + 1}/{len(batches)}")
    finally:
        for h in handles:
            h.remove()
    return moments


def _gptq_correction(layer: nn.Module, moments: torch.Tensor) -> torch.Tensor:
    """GPTQ (Frantar et al. 2022) on ``layer``'s weight with its quantizer's grid: the columns
    are rounded to nearest one after the other, and each one's rounding error, weighted by the
    inverse second moments of the inputs, is taken out of the columns not yet rounded. Returns
    what to add to the weight so that rounding it to nearest gives GPTQ's weights."""
    wq = layer.weight_quantizer
    weight = _weight_matrix(layer, layer.weight.detach().double())
    w = weight.clone()
    h = moments.to(torch.float64, copy=True)
    h.diagonal().add_(GPTQ_DAMPING * h.diagonal().mean() + (h.diagonal() == 0).double())
    # the upper Cholesky factor of H^-1: row i holds how column i's error spreads to the rest.
    # With rows and columns reversed, H's lower Cholesky factor reversed back is an upper R with
    # H = R R^T, so H^-1 = R^-T R^-1 and R^-1 is that factor: one factorization and a triangular
    # solve (1.39x faster on one CPU thread at 6272 columns than factorizing, inverting and
    # factorizing again)
    r = torch.linalg.cholesky(h.flip(0, 1)).flip(0, 1)
    u = torch.linalg.solve_triangular(r, torch.eye(len(h), dtype=h.dtype), upper=True)
    # each output channel's grid on each of its rows (a transposed convolution: k*k rows)
    per_channel = len(weight) // wq.scale.numel()
    scale = wq.scale.detach().double().repeat_interleave(per_channel).reshape(-1, 1)
    zero = wq.zero_point.detach().double().repeat_interleave(per_channel).reshape(-1, 1)
    # a block of columns at a time: within it column by column, then its errors taken out of
    # the later columns in one product (the same arithmetic as column by column, in matrix
    # products: the columns of a 12544-wide box-head layer in about 10 s on one CPU thread
    # instead of minutes; the factorization above takes longer there)
    for start in range(0, w.shape[1], GPTQ_BLOCK):
        end = min(start + GPTQ_BLOCK, w.shape[1])
        block, ub = w[:, start:end], u[start:end, start:end]  # block: a view, updated in place
        errors = torch.empty_like(block)
        for i in range(end - start):
            col = block[:, i : i + 1]
            errors[:, i : i + 1] = (col - quant_dequant(col, scale, zero, wq.qmax)) / ub[i, i]
            block[:, i + 1 :] -= errors[:, i : i + 1] * ub[i : i + 1, i + 1 :]
        w[:, end:] -= errors @ u[start:end, end:]
    return _weight_from_matrix(layer, w - weight).to(layer.weight.dtype)


def _moment_norm(layer: nn.Module, w: torch.Tensor, moments: torch.Tensor) -> float:
    """``sum ||w x||^2`` over the input rows ``x`` of ``layer`` whose second moments are
    ``moments``, ``w`` shaped as its weight."""
    w = _weight_matrix(layer, w.double())
    return float(torch.einsum("oi,ij,oj->", w, moments.double(), w))


@torch.no_grad()
def gptq_weights(
    model: nn.Module, batches: list, run_batch: Callable[[nn.Module, Any], Any], print_fn=print
) -> dict:
    """Round the weights of every layer of ``model`` that :func:`_gptq_layers` names with GPTQ,
    each on the second moments of its quantized inputs over the calibration ``batches`` (one
    forward pass of the quantized model for all layers: collecting them layer after layer,
    each with the layers before it already rounded, as GPTQ does, cost half a pass per layer and
    gave the same held-out error on the demo ViT). The result goes into each layer's
    ``weight_correction``. Returns the report: how many layers, and the squared error the
    weights add to the layers' outputs (their inputs quantized), relative to the outputs',
    summed over the layers, with round-to-nearest and with GPTQ's rounding."""
    layers = _gptq_layers(model)
    moments = _input_moments(model, layers, batches, run_batch, print_fn)
    reached = list(moments)
    before = after = ref = 0.0
    for i, name in enumerate(reached):
        moment, layer = moments.pop(name), layers[name]  # each layer's H freed after its solve
        correction = _gptq_correction(layer, moment)
        weight = layer.weight.detach()
        nearest = layer.weight_quantizer.fake_quant(weight)
        rounded = layer.weight_quantizer.fake_quant(weight + correction)
        ref += _moment_norm(layer, weight, moment)
        before += _moment_norm(layer, nearest - weight, moment)
        after += _moment_norm(layer, rounded - weight, moment)
        layer.weight_correction = correction
        print_fn(f"gptq: {i + 1}/{len(reached)} {name}")
    return {
        "method": "gptq",
        "layers": len(reached),
        "relative_output_error_nearest": before / max(ref, 1e-30),
        "relative_output_error_gptq": after / max(ref, 1e-30),
    }


__all__ = ["correct_biases", "gptq_weights"]
