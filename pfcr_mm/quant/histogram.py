"""Statistics of every value a quantizer observes: exact min/max and a mergeable histogram.

Calibration must see every value (a sample misses the rare large ones that set a range) in
bounded memory (a stage-1 Swin map at 800x1216 holds 5.8M values per image). A
:class:`ValueHistogram` keeps, per channel, the exact running minimum and maximum and integer
counts over bins of constant *relative* width, like a floating-point number with ``m`` mantissa
bits: ``|x| = (1 + f) 2^e`` falls in bin ``(e, floor(f 2^m))``, for ``e`` in
``[EXP_MIN, EXP_MAX)``. A value is then known to within ``2^-(m+1)`` of itself whatever the
outliers elsewhere, which a linear histogram over ``[min, max]`` cannot give. ``|x| < 2^EXP_MIN``
counts as 0 (no quantizer here resolves it); ``|x| >= 2^EXP_MAX`` falls in the top bin (the exact
max still bounds it).

Counts are integers, so histograms of several batches or processes merge exactly and in any
order (:meth:`ValueHistogram.merge`): a distributed calibration gets the statistics of one
process.

:class:`WeightedValues` is what a range search consumes: values with counts, per channel, plus
the exact bounds; built from a histogram (bin centres) or from a full tensor (weights, count 1).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

EXP_MIN, EXP_MAX = -32, 32
# per tensor: relative resolution 2^-9 (0.2 %); per channel 2^-5 (3 %), as there are C histograms
MANTISSA_BITS_PER_TENSOR = 8
MANTISSA_BITS_PER_CHANNEL = 4


@dataclass
class WeightedValues:
    """``values`` and ``counts`` of shape ``(n, C)`` (column c: channel c, or the one column of a
    per-tensor quantizer), and the exact per-channel ``lo`` / ``hi`` of shape ``(C,)``.
    ``values`` are sorted along dim 0 when built by :meth:`ValueHistogram.weighted`."""

    values: torch.Tensor
    counts: torch.Tensor
    lo: torch.Tensor
    hi: torch.Tensor

    @classmethod
    def of_rows(cls, rows: torch.Tensor) -> WeightedValues:
        """Every row of ``rows`` (n, C) once: exact statistics of a full tensor."""
        values = rows.sort(0).values
        return cls(values, torch.ones_like(values), values[0], values[-1])

    @property
    def total(self) -> torch.Tensor:
        return self.counts.sum(0)

    def quantile(self, q: float) -> torch.Tensor:
        """Per channel, the smallest value whose cumulative count reaches ``ceil(q N)`` (at
        least 1): ``kthvalue`` of the full data, to within a bin; ``q=1`` gives the exact max
        and ``q=0`` the exact min. Shape ``(C,)``. Needs sorted ``values``."""
        if q >= 1.0:
            return self.hi.clone()
        if q <= 0.0:
            return self.lo.clone()
        cum = self.counts.cumsum(0)
        k = torch.clamp(torch.ceil(q * self.total), min=1)
        pos = (cum < k).sum(0).clamp(max=self.values.shape[0] - 1)
        v = self.values.gather(0, pos.unsqueeze(0)).squeeze(0)
        return torch.minimum(torch.maximum(v, self.lo), self.hi)

    def squared_error(self, approx: torch.Tensor) -> torch.Tensor:
        """``sum counts * (approx - values)^2`` per channel, for ``approx`` of ``values``'s
        shape (the values through a candidate quantizer)."""
        return (self.counts * (approx - self.values).pow(2)).sum(0)


class ValueHistogram:
    """Exact min/max and relative-width bin counts of the rows ``(n, C)`` given to :meth:`add`.

    Memory: ``C * (1 + 2 (EXP_MAX - EXP_MIN) 2^m)`` int64 counts: 32,769 for a per-tensor
    quantizer, 2,049 per channel for a per-channel one. Bins are in value order: negative
    magnitudes descending, the zero bin, positive magnitudes ascending.
    """

    def __init__(self, channels: int, mantissa_bits: int):
        if not 0 <= mantissa_bits <= 23:
            raise ValueError(f"mantissa_bits must be in [0, 23] (float32's), got {mantissa_bits}")
        self.channels, self.mantissa_bits = channels, mantissa_bits
        self.half = (EXP_MAX - EXP_MIN) << mantissa_bits  # magnitude bins per sign
        self.counts = torch.zeros(channels, 2 * self.half + 1, dtype=torch.int64)
        self.lo = torch.full((channels,), float("inf"))
        self.hi = torch.full((channels,), float("-inf"))

    @property
    def count(self) -> int:
        return int(self.counts[0].sum())

    def _bin(self, bits: torch.Tensor, negative: torch.Tensor) -> torch.Tensor:
        """The bin index of each element, from the magnitude's float32 bit pattern ``bits``
        (sign cleared, as int32): its exponent and top ``m`` mantissa bits are ``(e, floor(f
        2^m))`` of ``|x| = (1 + f) 2^e``, read off by one shift (exact; what ``frexp`` gives)."""
        mag = (bits >> (23 - self.mantissa_bits)) - ((127 + EXP_MIN) << self.mantissa_bits)
        small = mag < 0  # |x| < 2^EXP_MIN, zero and float32 subnormals included
        mag = mag.clamp(max=self.half - 1)
        signed = torch.where(negative, self.half - 1 - mag, self.half + 1 + mag)
        return torch.where(small, self.half, signed)

    @torch.no_grad()
    def add(self, rows: torch.Tensor) -> None:
        """Count the rows ``(n, C)`` (any device and float dtype, counted as float32; the counts
        stay on the CPU)."""
        if rows.shape[1] != self.channels:
            raise ValueError(f"expected {self.channels} channels, got rows of shape {rows.shape}")
        if rows.numel() == 0:
            return
        rows32 = rows.float().contiguous()
        bits = rows32.view(torch.int32) & 0x7FFFFFFF
        if bool((bits >= 0x7F800000).any()):  # exponent all ones: Inf or NaN (in float32)
            raise ValueError(
                "non-finite values (NaN or Inf, or beyond float32's range) reached a quantizer "
                "during calibration: check the checkpoint's weights and the input images"
            )
        nbins = self.counts.shape[1]
        offsets = torch.arange(self.channels, device=rows.device, dtype=torch.int32) * nbins
        flat = (self._bin(bits, rows32 < 0) + offsets).reshape(-1)
        self.counts += (
            torch.bincount(flat, minlength=self.counts.numel()).view_as(self.counts).cpu()
        )
        self.lo = torch.minimum(self.lo, rows.amin(0).cpu())
        self.hi = torch.maximum(self.hi, rows.amax(0).cpu())

    def merge(self, other: ValueHistogram) -> None:
        """Add the counts of ``other`` (same shape): exact, order-independent."""
        if other.counts.shape != self.counts.shape:
            raise ValueError("cannot merge histograms of different shapes")
        self.counts += other.counts
        self.lo = torch.minimum(self.lo, other.lo)
        self.hi = torch.maximum(self.hi, other.hi)

    def centres(self) -> torch.Tensor:
        """The value each bin stands for, ``(nbins,)`` ascending: the middle of its range."""
        j = torch.arange(self.half, dtype=torch.float64)
        step = 1 << self.mantissa_bits
        exponent = EXP_MIN + torch.div(j, step, rounding_mode="floor")
        mag = (1 + (j % step + 0.5) / step) * torch.pow(2.0, exponent)
        return torch.cat([-mag.flip(0), torch.zeros(1, dtype=mag.dtype), mag]).float()

    def weighted(self) -> WeightedValues:
        """The histogram as :class:`WeightedValues`: bin centres clamped into each channel's
        exact ``[lo, hi]``, so no statistic leaves the observed range. Bins empty in every
        channel are dropped."""
        used = self.counts.sum(0) > 0
        centres = self.centres()[used].unsqueeze(1)
        values = torch.minimum(torch.maximum(centres, self.lo), self.hi)
        return WeightedValues(values, self.counts[:, used].T.double(), self.lo, self.hi)
