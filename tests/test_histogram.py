"""Calibration statistics see every value: exact bounds, percentiles to within a bin, exact
merging across batches and processes."""

import math

import pytest
import torch

from pfcr_mm.quant.histogram import (
    EXP_MAX,
    EXP_MIN,
    MANTISSA_BITS_PER_TENSOR,
    ValueHistogram,
    WeightedValues,
)
from pfcr_mm.quant.quantizers import UniformQuantizer, search_uniform_range


def _million_with_an_outlier() -> torch.Tensor:
    x = torch.randn(1_000_000, generator=torch.Generator().manual_seed(0))
    x[123_456] = 1000.0  # one outlier: a linear histogram over [min, max] would lose the rest
    return x


def test_max_exact_and_percentiles_within_a_bin_of_torch_quantile():
    x = _million_with_an_outlier()
    h = ValueHistogram(1, MANTISSA_BITS_PER_TENSOR)
    for part in x.split(300_000):  # in several batches, as calibration sees them
        h.add(part.reshape(-1, 1))
    stats = h.weighted()
    assert h.count == 1_000_000
    assert stats.quantile(1.0).item() == 1000.0 and stats.quantile(0.0).item() == x.min().item()
    resolution = 2.0 ** -(MANTISSA_BITS_PER_TENSOR + 1)  # half a bin, relative
    for q in (0.5, 0.9, 0.999, 0.99999, 0.001):
        exact = torch.quantile(x.double(), q, interpolation="higher").item()
        assert stats.quantile(q).item() == pytest.approx(exact, rel=2 * resolution, abs=1e-6)


def test_merge_is_exact_whatever_the_split():
    x = _million_with_an_outlier().reshape(-1, 4)  # 4 channels
    one, a, b = (ValueHistogram(4, 4) for _ in range(3))
    one.add(x)
    a.add(x[::3])
    b.add(x[1::3])
    b.add(x[2::3])
    pooled = ValueHistogram(4, 4)
    pooled.merge(b)
    pooled.merge(a)
    assert torch.equal(one.counts, pooled.counts)
    assert torch.equal(one.lo, x.amin(0)) and torch.equal(pooled.hi, x.amax(0))


def test_zero_and_tiny_values_count_as_zero_and_signs_sort():
    h = ValueHistogram(1, 2)
    h.add(torch.tensor([[0.0], [1e-20], [-3.0], [2.5], [-0.75]]))
    stats = h.weighted()
    assert stats.values[:, 0].tolist() == sorted(stats.values[:, 0].tolist())
    assert stats.counts.sum().item() == 5
    zero = stats.values[:, 0] == 0
    assert stats.counts[zero].item() == 2  # 0 and 1e-20
    assert stats.values[0, 0].item() == -3.0 and stats.values[-1, 0].item() == 2.5  # clamped


def _reference_bin(x: float, m: int, half: int) -> int:
    """The bin of the module docstring, from Python's own ``math.frexp``."""
    if x == 0:
        return half
    mant, exp = math.frexp(abs(x))  # |x| = mant 2^exp, mant in [0.5, 1)
    e, f = exp - 1, 2 * mant - 1
    if e < EXP_MIN:
        return half
    mag = min(((e - EXP_MIN) << m) + math.floor(f * 2**m), half - 1)
    return half + 1 + mag if x > 0 else half - 1 - mag


def test_bins_are_those_of_the_exponent_and_top_mantissa_bits():
    """Edges included: powers of two, the smallest counted magnitude and just below it, float32
    subnormals, the top bin, float16 and float64 inputs (counted as float32)."""
    edges = [
        1.0,
        -1.0,
        0.5,
        1.5,
        0.75,
        2.0**EXP_MIN,
        -(2.0**EXP_MIN),
        2.0**EXP_MIN * 0.99999,
        2.0**EXP_MAX,
        2.0**EXP_MAX * 0.99999,
        -3e38,
        1e-45,
        -1e-40,
        0.0,
        -0.0,
        7.0,
        -1000.25,
    ]
    g = torch.Generator().manual_seed(0)
    spread = torch.randn(2000, generator=g) * 10.0 ** torch.randint(-14, 14, (2000,), generator=g)
    values = torch.cat([torch.tensor(edges), spread])
    for m in (2, 4, MANTISSA_BITS_PER_TENSOR):
        for dtype in (torch.float32, torch.float64, torch.float16):
            rows = values.to(dtype).clamp(-6e4, 6e4) if dtype == torch.float16 else values
            rows = rows.to(dtype).reshape(-1, 1)
            h = ValueHistogram(1, m)
            h.add(rows)
            expected = torch.zeros_like(h.counts)
            for x in rows.float().flatten().tolist():
                expected[0, _reference_bin(x, m, h.half)] += 1
            assert torch.equal(h.counts, expected), (m, dtype)


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf"), -float("nan")])
def test_non_finite_values_refused(bad):
    with pytest.raises(ValueError, match="non-finite"):
        ValueHistogram(1, 4).add(torch.tensor([[1.0], [bad]]))


@pytest.mark.parametrize("method", ["mse", "percentile"])
def test_range_from_the_histogram_as_good_as_from_every_value(method):
    """The range an activation quantizer chooses from its histogram has, on the full data,
    within 1 % of the squared error of the range chosen from the full data itself."""
    torch.manual_seed(0)
    x = torch.distributions.StudentT(3.0).sample((200_000,)).reshape(-1, 1)
    q = UniformQuantizer(4, range_method=method)
    q.set_state("observe")
    q(x)
    q.finish_calibration()
    exact_scale, exact_zp = search_uniform_range(WeightedValues.of_rows(x), 4, method)

    def err(s, z):
        return float(((torch.clamp(torch.round(x / s) + z, 0, 15) - z) * s - x).pow(2).sum())

    assert err(q.scale, q.zero_point) <= 1.01 * err(exact_scale, exact_zp)
