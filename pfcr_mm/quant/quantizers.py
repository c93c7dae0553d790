"""Fake quantizers: uniform affine (per tensor or per channel) and log2 for attention probabilities.

Every quantizer has three states, switched by :meth:`BaseQuantizer.set_state`:

* ``"fp"``: identity;
* ``"observe"``: identity that counts every input value (exact min/max and a histogram,
  :mod:`pfcr_mm.quant.histogram`), from which :meth:`BaseQuantizer.finish_calibration` chooses
  the range;
* ``"quant"``: quantize-dequantize with straight-through rounding, so that step sizes (LSQ) and
  AdaRound variables can be learned.

A quantizer built with ``enabled=False`` stays an identity in every state; it is how a point is
kept in floating point while the model keeps one forward for all settings.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from ..settings import check_bits
from .histogram import (
    MANTISSA_BITS_PER_CHANNEL,
    MANTISSA_BITS_PER_TENSOR,
    ValueHistogram,
    WeightedValues,
)

# AdaRound's rectified sigmoid (Nagel et al. 2020): h(V) = clamp(sigmoid(V)(ZETA-GAMMA)+GAMMA, 0, 1)
ADAROUND_ZETA = 1.1
ADAROUND_GAMMA = -0.1


def _rectified_sigmoid(alpha: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(sigmoid(V), sigmoid(V) (ZETA - GAMMA) + GAMMA)``: AdaRound's ``h(V)`` before its clamp
    to ``[0, 1]``, and the sigmoid its gradient needs."""
    sig = torch.sigmoid(alpha)
    return sig, sig * (ADAROUND_ZETA - ADAROUND_GAMMA) + ADAROUND_GAMMA


def _rectified_sigmoid_slope(sig: torch.Tensor, factor: float = 1.0) -> torch.Tensor:
    """``factor`` times the derivative of the rectified sigmoid before its clamp,
    ``sig (1 - sig) (ZETA - GAMMA)``, from ``sig = sigmoid(V)`` (:func:`_rectified_sigmoid`)."""
    return sig * (1 - sig) * (factor * (ADAROUND_ZETA - ADAROUND_GAMMA))


class _LsqFakeQuant(torch.autograd.Function):
    """``(clamp(round(x / s) + z, 0, qmax) - z) * s`` with LSQ's gradients, in one node: to
    ``x``, straight through where the code ``round(x / s) + z`` lies strictly inside ``(0,
    qmax)`` (0 at and beyond the two end codes, as ``torch.clamp``'s gradient); to ``s``, ``(q -
    z) - x / s`` there and ``q - z`` elsewhere, summed to ``s``'s shape and times
    ``grad_scale``. The values and gradients of the chain of autograd ops it replaced (round with
    a straight-through gradient, then clamp), to within float rounding, in fewer passes over the
    tensor and with less kept for the backward."""

    @staticmethod
    def forward(ctx, x, scale, zero_point, qmax: int, grad_scale: float):
        v = x / scale
        code = torch.round(v).add_(zero_point)
        inside = (code > 0) & (code < qmax)
        q = code.clamp_(0, qmax).sub_(zero_point)  # q - z, in place of the code
        if ctx.needs_input_grad[1]:
            ctx.save_for_backward(inside, torch.where(inside, q - v, q))
        else:
            ctx.save_for_backward(inside)
        ctx.scale_shape, ctx.grad_scale = scale.shape, grad_scale
        return q.mul_(scale)

    @staticmethod
    def backward(ctx, grad):
        inside = ctx.saved_tensors[0]
        grad_x = grad * inside if ctx.needs_input_grad[0] else None
        grad_s = None
        if ctx.needs_input_grad[1]:
            grad_s = (grad * ctx.saved_tensors[1]).sum_to_size(ctx.scale_shape) * ctx.grad_scale
        return grad_x, grad_s, None, None, None


class _AdaRoundFakeQuant(torch.autograd.Function):
    """AdaRound's weight ``(clamp(floor(W / s) + h(V) + z, 0, qmax) - z) * s`` with its gradient
    to ``V`` in one node: ``s h'(V)`` where ``h``'s clamp and the codes' clamp are both strictly
    inside their bounds (0 elsewhere, as ``torch.clamp``'s gradient); none to ``W`` (the floor's
    gradient is 0) nor to ``s`` and ``z``, so it serves only while the step ``s`` is not learned
    (the caller's condition). ``hard_forward``: the value with ``h = 1[V >= 0]``, the gradient
    still the soft rounding's (straight-through: the hard tail). The values and gradients of the
    chain of autograd ops it replaced, to within float rounding, in fewer passes over the
    weights."""

    @staticmethod
    def forward(ctx, alpha, weight, scale, zero_point, qmax: int, hard_forward: bool):
        down = torch.floor(weight / scale)
        sig, h_raw = _rectified_sigmoid(alpha)
        h = h_raw.clamp(0, 1)
        code = down + h + zero_point
        passes = (code > 0) & (code < qmax) & (h_raw > 0) & (h_raw < 1)
        slope = _rectified_sigmoid_slope(sig) * scale
        ctx.save_for_backward(torch.where(passes, slope, 0))
        if hard_forward:
            code = down + (alpha >= 0).to(weight.dtype) + zero_point
        return (code.clamp_(0, qmax) - zero_point) * scale

    @staticmethod
    def backward(ctx, grad):
        return grad * ctx.saved_tensors[0], None, None, None, None, None


class _RoundingRegularizer(torch.autograd.Function):
    """AdaRound's regularizer ``sum(1 - |2 h(V) - 1|^beta)`` and its gradient to ``V`` in one
    node: ``-2 beta |d|^(beta - 1) sign(d) h'(V)`` with ``d = 2 h - 1``, where ``h``'s clamp is
    strictly inside ``[0, 1]`` (0 elsewhere and where ``d = 0``, as the chain of autograd ops
    it replaced gives for ``beta > 1``), with one power instead of two."""

    @staticmethod
    def forward(ctx, alpha, beta: float):
        sig, h_raw = _rectified_sigmoid(alpha)
        d = 2 * h_raw.clamp(0, 1) - 1
        r = d.abs()
        r_beta = r.pow(beta)
        if ctx.needs_input_grad[0]:
            inside = (h_raw > 0) & (h_raw < 1) & (r > 0)
            slope = _rectified_sigmoid_slope(sig, -2 * beta)
            ctx.save_for_backward(torch.where(inside, slope * (r_beta / r) * d.sign(), 0))
        return (1 - r_beta).sum()

    @staticmethod
    def backward(ctx, grad):
        return grad * ctx.saved_tensors[0], None


class BaseQuantizer(nn.Module):
    """State handling and the observed statistics shared by all quantizers.

    ``ch_axis`` is the channel axis for per-channel quantizers (``None``: per tensor). Observed
    inputs are flattened to rows of ``(rows, C)`` along ``ch_axis`` (or to one column per tensor)
    and counted in a :class:`~pfcr_mm.quant.histogram.ValueHistogram`: every value is seen, in
    bounded memory.
    """

    def __init__(self, bits: int, ch_axis: int | None = None, enabled: bool = True):
        super().__init__()
        self.bits = check_bits(bits)
        self.ch_axis = ch_axis
        self.enabled = enabled
        self.state = "fp"
        self.calibrated = False
        self.observed: ValueHistogram | None = None

    @property
    def per_channel(self) -> bool:
        return self.ch_axis is not None

    def set_state(self, state: str) -> None:
        if state not in ("fp", "observe", "quant"):
            raise ValueError(f"unknown quantizer state {state!r}")
        if state == "quant" and self.enabled and not self.calibrated:
            raise RuntimeError("quantizer used before calibration")
        self.state = state

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.enabled or self.state == "fp":
            return x
        if self.state == "observe":
            self.observe(x)
            return x
        return self.fake_quant(x)

    @property
    def observed_count(self) -> int:
        """How many values (per channel) were observed since the last calibration."""
        return 0 if self.observed is None else self.observed.count

    @torch.no_grad()
    def observe(self, x: torch.Tensor) -> None:
        """Count every value of ``x`` (exact min/max and histogram, per channel or per tensor)."""
        rows = self._rows(x.detach().float())
        if self.observed is None:
            bits = MANTISSA_BITS_PER_CHANNEL if self.per_channel else MANTISSA_BITS_PER_TENSOR
            self.observed = ValueHistogram(rows.shape[1], bits)
        self.observed.add(rows)

    def pool_observed(self, parts: list[ValueHistogram | None]) -> None:
        """Replace the observed statistics by the sum of ``parts`` (the :attr:`observed` of
        this and other processes): what one process would have counted over all their data."""
        pooled = None
        for part in parts:
            if part is None:
                continue
            if pooled is None:
                pooled = ValueHistogram(part.channels, part.mantissa_bits)
            pooled.merge(part)
        self.observed = pooled

    def take_observed(self) -> WeightedValues:
        """The observed statistics as :class:`WeightedValues`; clears them."""
        if self.observed is None:
            raise RuntimeError("quantizer observed no data")
        stats, self.observed = self.observed.weighted(), None
        return stats

    def _rows(self, x: torch.Tensor) -> torch.Tensor:
        if self.ch_axis is None:
            return x.reshape(-1, 1)
        return x.movedim(self.ch_axis, -1).reshape(-1, x.shape[self.ch_axis])

    def _param_shape(self, x: torch.Tensor) -> list[int]:
        """Shape that broadcasts per-channel parameters against ``x``."""
        shape = [1] * x.dim()
        if self.ch_axis is not None:
            shape[self.ch_axis] = -1
        return shape

    def finish_calibration(self) -> None:
        raise NotImplementedError

    def fake_quant(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def describe(self) -> dict:
        raise NotImplementedError

    # Saving and restoring: the calibrated ranges are parameters/buffers whose shapes depend on
    # the calibration (per channel or, after re-parameterization, per tensor), so loading resizes
    # them to the stored shapes, and the flags travel as extra state.
    def get_extra_state(self) -> dict:
        return {"calibrated": self.calibrated, "ch_axis": self.ch_axis, "state": self.state}

    def set_extra_state(self, extra: dict) -> None:
        self.calibrated = extra["calibrated"]
        self.ch_axis = extra["ch_axis"]
        self.state = extra["state"]

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        for name, tensor in list(self.named_parameters(recurse=False)) + list(
            self.named_buffers(recurse=False)
        ):
            stored = state_dict.get(prefix + name)
            if stored is not None and tensor is not None and stored.shape != tensor.shape:
                tensor.data = torch.empty_like(stored, device=tensor.device)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)


def _uniform_params(
    lo: torch.Tensor, hi: torch.Tensor, qmax: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Asymmetric scale and (integer) zero point covering ``[lo, hi]`` (which must contain 0)."""
    lo = torch.clamp(lo, max=0.0)
    hi = torch.clamp(hi, min=0.0)
    scale = torch.clamp((hi - lo) / qmax, min=1e-8)
    zero_point = torch.clamp(torch.round(-lo / scale), 0, qmax)
    return scale, zero_point


def quant_dequant(
    x: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor, qmax: int
) -> torch.Tensor:
    """``(clamp(round(x / scale) + zero_point, 0, qmax) - zero_point) * scale`` (no gradient
    path): the uniform quantizer's value, shared by the range search and the exported model."""
    q = torch.clamp(torch.round(x / scale) + zero_point, 0, qmax)
    return (q - zero_point) * scale


RANGE_PERCENTILES = (0.999, 0.9999, 0.99999, 1.0)


def search_uniform_range(
    stats: WeightedValues, bits: int, method: str = "mse"
) -> tuple[torch.Tensor, torch.Tensor]:
    """Choose scale and zero point, per column of ``stats`` (one column per channel, or one for
    a whole tensor), by the squared error over every observed value.

    ``method="mse"`` shrinks the exact min/max range by ratios ``1.0, 0.99, ..., 0.2`` and keeps
    the ratio with the smallest squared error; ``method="percentile"`` tries the two-sided
    percentiles 99.9, 99.99, 99.999 and 100 and keeps the one with the smallest squared error;
    ``method="minmax"`` uses the exact observed range. Returns ``(scale, zero_point)`` of shape
    ``(C,)``.
    """
    qmax = 2**bits - 1
    lo, hi = stats.lo, stats.hi
    if method == "minmax":
        candidates = [(lo, hi)]
    elif method == "mse":
        candidates = [(lo * r, hi * r) for r in torch.linspace(1.0, 0.2, 81).tolist()]
    elif method == "percentile":
        candidates = [(stats.quantile(1 - p), stats.quantile(p)) for p in RANGE_PERCENTILES]
    else:
        raise ValueError(f"unknown range method {method!r}: use 'mse', 'percentile' or 'minmax'")
    best_err = best_scale = best_zp = None
    for lo, hi in candidates:
        scale, zp = _uniform_params(lo, hi, qmax)
        err = stats.squared_error(quant_dequant(stats.values, scale, zp, qmax))
        if best_err is None:
            best_err, best_scale, best_zp = err, scale, zp
        else:
            better = err < best_err
            best_err = torch.where(better, err, best_err)
            best_scale = torch.where(better, scale, best_scale)
            best_zp = torch.where(better, zp, best_zp)
    return best_scale, best_zp


class UniformQuantizer(BaseQuantizer):
    """Uniform asymmetric fake quantizer with a learnable step size (LSQ).

    ``x_hat = (clamp(round(x / s) + z, 0, 2^b - 1) - z) * s``. The zero point ``z`` is an integer
    kept fixed after calibration; the step ``s`` is an ``nn.Parameter``, trained with the LSQ
    gradient scale ``1 / sqrt(numel * qmax)`` when reconstruction unfreezes it.
    """

    def __init__(
        self,
        bits: int,
        ch_axis: int | None = None,
        range_method: str = "mse",
        enabled: bool = True,
    ):
        super().__init__(bits, ch_axis, enabled)
        self.range_method = range_method
        self.scale = nn.Parameter(torch.ones(()), requires_grad=False)
        self.register_buffer("zero_point", torch.zeros(()))

    @property
    def qmax(self) -> int:
        return 2**self.bits - 1

    def set_params(self, scale: torch.Tensor, zero_point: torch.Tensor) -> None:
        """Set the range directly (used by calibration and re-parameterization)."""
        self.scale.data = scale.detach().clone().to(self.scale.device)
        self.zero_point = zero_point.detach().clone().to(self.scale.device)
        self.calibrated = True

    def calibrate_from(self, data: torch.Tensor) -> None:
        """Choose the range from a full tensor (weights): channels along ``ch_axis``."""
        self.calibrate_from_stats(WeightedValues.of_rows(self._rows(data.detach().float())))

    def calibrate_from_stats(self, stats: WeightedValues) -> None:
        scale, zp = search_uniform_range(stats, self.bits, self.range_method)
        if not self.per_channel:
            scale, zp = scale.reshape(()), zp.reshape(())
        self.set_params(scale, zp)

    def finish_calibration(self) -> None:
        if self.enabled:
            self.calibrate_from_stats(self.take_observed())

    def fake_quant(self, x: torch.Tensor) -> torch.Tensor:
        shape = self._param_shape(x)
        scale, zp = self.scale.reshape(shape), self.zero_point.reshape(shape)
        if not torch.is_grad_enabled() or not (x.requires_grad or scale.requires_grad):
            return quant_dequant(x, scale, zp, self.qmax)
        return _LsqFakeQuant.apply(x, scale, zp, self.qmax, 1 / math.sqrt(x.numel() * self.qmax))

    def describe(self) -> dict:
        return {
            "quantizer": "uniform",
            "bits": self.bits,
            "granularity": "per-channel" if self.per_channel else "per-tensor",
            "scale_min": float(self.scale.min()),
            "scale_max": float(self.scale.max()),
            "range_min": float(((0 - self.zero_point) * self.scale).min()),
            "range_max": float(((self.qmax - self.zero_point) * self.scale).max()),
        }


class AdaRoundWeightQuantizer(UniformQuantizer):
    """Per-output-channel weight quantizer with optional learned rounding (AdaRound).

    After :meth:`init_adaround`, ``fake_quant`` uses ``floor(W / s) + h(V)`` instead of
    ``round(W / s)``, where ``h(V) = clamp(sigmoid(V) * (ZETA - GAMMA) + GAMMA, 0, 1)`` and ``V``
    starts where ``h(V)`` equals the fractional part, so that the soft-quantized weight first
    equals the clipped FP weight. :meth:`harden` fixes ``h`` to ``V >= 0``. The rounding
    ``"hard_ste"`` (the hard tail of a unit's reconstruction) computes the hard weights and
    passes the soft rounding's gradient to ``V`` (straight-through).
    """

    def __init__(self, bits: int, ch_axis: int = 0, range_method: str = "mse"):
        super().__init__(bits, ch_axis, range_method)
        self.rounding = "nearest"  # "nearest" | "soft" | "hard" | "hard_ste"
        self.alpha: nn.Parameter | None = None

    def init_adaround(self, weight: torch.Tensor) -> None:
        scale = self.scale.detach().reshape(self._param_shape(weight))
        rest = weight.detach() / scale - torch.floor(weight.detach() / scale)
        h = torch.clamp(rest, 0.01, 0.99)  # finite inverse
        self.alpha = nn.Parameter(
            -torch.log((ADAROUND_ZETA - ADAROUND_GAMMA) / (h - ADAROUND_GAMMA) - 1)
        )
        self.rounding = "soft"

    def soft_rounding(self) -> torch.Tensor:
        assert self.alpha is not None
        return torch.clamp(_rectified_sigmoid(self.alpha)[1], 0, 1)

    def rounding_loss(self, beta: float) -> torch.Tensor:
        """AdaRound regularizer ``sum(1 - |2 h(V) - 1|^beta)``: pushes ``h`` to 0 or 1."""
        return _RoundingRegularizer.apply(self.alpha, beta)

    def harden(self) -> None:
        """Fix the learned rounding (a no-op when no rounding was learned)."""
        if self.alpha is not None:
            self.rounding = "hard"

    def get_extra_state(self) -> dict:
        return {**super().get_extra_state(), "rounding": self.rounding}

    def set_extra_state(self, extra: dict) -> None:
        super().set_extra_state(extra)
        self.rounding = extra["rounding"]

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        if prefix + "alpha" in state_dict and self.alpha is None:
            stored = state_dict[prefix + "alpha"]  # may come from another device (a checkpoint)
            self.alpha = nn.Parameter(torch.empty_like(stored, device=self.scale.device))
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def fake_quant(self, x: torch.Tensor) -> torch.Tensor:
        if self.rounding == "nearest":
            return super().fake_quant(x)
        shape = self._param_shape(x)
        scale = self.scale.reshape(shape)
        zp = self.zero_point.reshape(shape)
        hard_forward = self.rounding in ("hard", "hard_ste")
        learning = torch.is_grad_enabled() and self.alpha.requires_grad
        if self.rounding != "hard" and learning and not scale.requires_grad:
            return _AdaRoundFakeQuant.apply(self.alpha, x, scale, zp, self.qmax, hard_forward)
        down = torch.floor(x / scale)
        h = (self.alpha >= 0).to(x.dtype) if hard_forward else self.soft_rounding()
        return (torch.clamp(down + h + zp, 0, self.qmax) - zp) * scale

    def integer_weight(self, weight: torch.Tensor) -> torch.Tensor:
        """The integer codes ``q`` in ``[0, 2^b - 1]`` that ``fake_quant`` dequantizes."""
        shape = self._param_shape(weight)
        scale = self.scale.detach().reshape(shape)
        zp = self.zero_point.reshape(shape)
        if self.rounding == "nearest":
            q = torch.round(weight / scale) + zp
        else:
            q = torch.floor(weight / scale) + (self.alpha >= 0).to(weight.dtype) + zp
        return torch.clamp(q, 0, self.qmax)

    def describe(self) -> dict:
        info = super().describe()
        info["rounding"] = self.rounding
        return info


# the log quantizers with names of their own (QuantConfig.post_softmax), by their k
LOG_QUANTIZER_NAMES = {1.0: "log2", 2.0: "log_sqrt2"}


class LogQuantizer(BaseQuantizer):
    """Log quantizer of base ``2^(1/k)`` for post-softmax attention probabilities in ``[0, 1]``.

    ``q = clamp(round(-k * log2(x / delta)), 0, 2^b - 1)``, ``x_hat = delta * 2^(-q / k)``:
    ``k = 1`` is log2, ``k = 2`` log-sqrt2 (RepQ-ViT); a larger ``k`` gives finer steps over a
    narrower range (``2^b - 1`` steps cover ``delta * [2^(-(2^b - 1)/k), 1]``). Inputs too small
    to reach code ``2^b - 1`` after rounding (``-k log2(x/delta) >= 2^b - 0.5``) become 0, as in
    RepQ-ViT. ``delta`` is chosen at calibration among the observed maximum and its
    99.9/99.99/99.999 percentiles by squared error over every observed value.
    """

    def __init__(self, bits: int, k: float = 1.0, enabled: bool = True):
        super().__init__(bits, None, enabled)
        if not k > 0:
            raise ValueError(f"the log base exponent k must be positive, got {k!r}")
        self.register_buffer("delta", torch.ones(()))
        self.register_buffer("powers", torch.empty(0), persistent=False)
        self._set_k(k)

    def _set_k(self, k: float) -> None:
        """The base, and ``powers``: 2^(-q/k) of the 2^b codes, and 0 (codes that round beyond
        the last level), from Python floats: an exporter folds them into the graph as these same
        float32 values (a pow in torch and one in the exporter's constant folding differ in the
        last bit)."""
        self.k = float(k)
        powers = [2.0 ** (-q / self.k) for q in range(2**self.bits)] + [0.0]
        self.powers = torch.tensor(powers, device=self.delta.device)

    @property
    def name(self) -> str:
        return LOG_QUANTIZER_NAMES.get(self.k, f"log_k{self.k:g}")

    def finish_calibration(self) -> None:
        if self.enabled:
            self.calibrate_from_stats(self.take_observed())

    def calibrate_from_stats(self, stats: WeightedValues) -> None:
        best = None
        for p in RANGE_PERCENTILES:
            delta = stats.quantile(p).reshape(()).clamp(min=1e-8)
            err = float(stats.squared_error(self._levels(stats.values, delta)).sum())
            if best is None or err < best[0]:
                best = (err, delta)
        self.delta = best[1].to(self.delta.device)
        self.calibrated = True

    def quant_dequant(self, x: torch.Tensor) -> torch.Tensor:
        """The quantized value of ``x`` (no gradient path); the exported model computes exactly
        this."""
        return self._levels(x, self.delta)

    def _levels(self, x: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
        """``x`` to the nearest of the levels of ``delta`` in the log domain."""
        levels = 2**self.bits - 1
        code = -self.k * torch.log2(torch.clamp(x / delta, min=1e-30))
        # the 2^b levels and 0 as a table: one gather instead of a pow and a where over every
        # probability (the costliest elementwise work of an MHSA unit's reconstruction step)
        table = delta * self.powers.to(x.dtype)
        return table[torch.clamp(torch.round(code), 0, levels + 1).long()]

    def fake_quant(self, x: torch.Tensor) -> torch.Tensor:
        # The gradient passes straight through to x: the probabilities come from the quantized qk.
        return (self.quant_dequant(x) - x).detach() + x

    def get_extra_state(self) -> dict:
        return {**super().get_extra_state(), "k": self.k}

    def set_extra_state(self, extra: dict) -> None:
        super().set_extra_state(extra)
        self._set_k(extra["k"])  # a saved state of another base brings its own levels

    def describe(self) -> dict:
        return {
            "quantizer": self.name,
            "bits": self.bits,
            "granularity": "per-tensor",
            "scale_min": float(self.delta),
            "scale_max": float(self.delta),
            "range_min": float(self.delta * 2 ** (-(2**self.bits - 1) / self.k)),
            "range_max": float(self.delta),
        }


class ShiftedLogQuantizer(LogQuantizer):
    """Log quantizer of base ``2^(1/k)`` above an offset, for the one-sided, heavy-tailed
    inputs of an MLP's second linear after GELU (whose minimum is about -0.17):
    ``x_hat = offset + delta * 2^(-q / k)`` with ``q`` the log code of ``x - offset`` as in
    :class:`LogQuantizer` (fine steps near the offset, coarse ones over the tail; inputs at or
    below the offset become the offset). ``offset`` is the exact observed minimum; ``delta`` is
    chosen above it as :class:`LogQuantizer` chooses its own (shift-log2 of ADFQ-ViT and
    AdaLog's bases, with our choice of base).
    """

    def __init__(self, bits: int, k: float = 1.0, enabled: bool = True):
        super().__init__(bits, k, enabled)
        self.register_buffer("offset", torch.zeros(()))

    @property
    def name(self) -> str:
        return "shift_" + super().name

    def calibrate_from_stats(self, stats: WeightedValues) -> None:
        offset = stats.lo.reshape(())
        lo, hi = stats.lo - offset, stats.hi - offset
        super().calibrate_from_stats(WeightedValues(stats.values - offset, stats.counts, lo, hi))
        self.offset = offset.clone().to(self.delta.device)

    def quant_dequant(self, x: torch.Tensor) -> torch.Tensor:
        return self.offset + self._levels(x - self.offset, self.delta)

    def describe(self) -> dict:
        info = super().describe()
        info["range_min"] = float(self.offset)
        info["range_max"] = float(self.offset + self.delta)
        return info
