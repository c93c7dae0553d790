"""Quantizer arithmetic against hand-computed values."""

import math

import pytest
import torch

from pfcr_mm.quant.histogram import WeightedValues
from pfcr_mm.quant.quantizers import (
    AdaRoundWeightQuantizer,
    LogQuantizer,
    UniformQuantizer,
)
from pfcr_mm.quant.quantizers import search_uniform_range as _search


def search_uniform_range(x, bits, method):
    """The range search over every row of ``x`` (n, 1), counted once each."""
    return _search(WeightedValues.of_rows(x), bits, method)


def test_uniform_minmax_per_tensor_hand_values():
    q = UniformQuantizer(2, range_method="minmax")  # 4 levels
    q.set_state("observe")
    q(torch.tensor([-1.0, 0.0, 0.5, 2.0]))
    q.finish_calibration()
    # range [-1, 2]: scale 3/3 = 1, zero point round(1/1) = 1
    assert q.scale.item() == pytest.approx(1.0)
    assert q.zero_point.item() == 1.0
    q.set_state("quant")
    out = q(torch.tensor([-1.4, -0.6, 0.4, 0.6, 1.49, 2.7]))
    # codes clamp(round(x)+1, 0, 3) - 1 -> -1, -1, 0, 1, 1, 2
    assert out.tolist() == [-1.0, -1.0, 0.0, 1.0, 1.0, 2.0]


def test_uniform_per_channel_weights_hand_values():
    w = torch.tensor([[0.0, 1.0, 3.0], [-2.0, 0.4, 5.0]])
    q = UniformQuantizer(3, ch_axis=0, range_method="minmax")  # 8 levels
    q.calibrate_from(w)
    # row 0: [0, 3] -> scale 3/7, zp 0; row 1: [-2, 5] -> scale 1, zp 2
    assert torch.allclose(q.scale, torch.tensor([3 / 7, 1.0]))
    assert q.zero_point.tolist() == [0.0, 2.0]
    q.set_state("quant")
    out = q(w)
    s0 = 3 / 7
    expected = torch.tensor([[0.0, 2 * s0, 7 * s0], [-2.0, 0.0, 5.0]])
    assert torch.allclose(out, expected)


def test_mse_range_clips_an_outlier():
    x = torch.cat([torch.linspace(-1, 1, 1001), torch.tensor([50.0])]).reshape(-1, 1)
    s_mse, _ = search_uniform_range(x, 4, "mse")
    s_mm, _ = search_uniform_range(x, 4, "minmax")
    assert s_mse < s_mm
    for s, z in (search_uniform_range(x, 4, "mse"), search_uniform_range(x, 4, "minmax")):
        assert s.shape == (1,) and z.shape == (1,)

    def err(s, z):
        return ((torch.clamp(torch.round(x / s) + z, 0, 15) - z) * s - x).pow(2).sum()

    assert err(*search_uniform_range(x, 4, "mse")) <= err(*search_uniform_range(x, 4, "minmax"))


def test_percentile_range_ignores_rare_outlier():
    # at 2 bits the full range (step 33) zeroes all of [0, 1]; clipping at 99.999 % costs the
    # single outlier (99^2) but is far better overall
    x = torch.cat([torch.linspace(0, 1, 100000), torch.tensor([100.0])]).reshape(-1, 1)
    scale, zp = search_uniform_range(x, 2, "percentile")
    assert zp.item() == 0
    assert 0.99 <= scale.item() * 3 <= 1.0  # one of the 99.9 / 99.99 / 99.999 percentiles


def test_lsq_step_gradient_scaled():
    q = UniformQuantizer(4, range_method="minmax")
    q.set_params(torch.tensor(0.1), torch.tensor(8.0))
    q.scale.requires_grad_(True)
    q.set_state("quant")
    x = torch.tensor([0.33, -0.26])
    q(x).sum().backward()
    # d x_hat / d s = round(x/s) - x/s inside the range; times 1/sqrt(numel * qmax)
    raw = (round(3.3) - 3.3) + (round(-2.6) + 2.6)
    assert q.scale.grad.item() == pytest.approx(raw / math.sqrt(2 * 15), rel=1e-5)


def _lsq_by_autograd(x, scale, zp, qmax):
    """The uniform quantizer as a chain of autograd ops: round with a straight-through
    gradient, clamp, and LSQ's step-gradient scale."""
    gs = 1 / math.sqrt(x.numel() * qmax)
    s = (scale - scale * gs).detach() + scale * gs
    v = x / s
    q = torch.clamp((v.round() - v).detach() + v + zp, 0, qmax)
    return (q - zp) * s


@pytest.mark.parametrize("per_channel", [False, True])
def test_fake_quant_gradients_match_the_chain_of_autograd_ops(per_channel):
    """Values and gradients to the input and to the learned step, per tensor and per channel
    (axis 1), against the chain of autograd ops, on inputs inside, at the ends of and beyond the
    range of codes."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(6, 5, 7, generator=g) * 3
    q = UniformQuantizer(4, ch_axis=1 if per_channel else None)
    scale = torch.rand(5 if per_channel else (), generator=g) * 0.2 + 0.2
    zp = torch.full_like(scale, 6.0)
    q.set_params(scale, zp)
    q.scale.requires_grad_(True)
    q.set_state("quant")
    shape = [1, -1, 1] if per_channel else []
    codes = torch.round(x / scale.reshape(shape)) + zp.reshape(shape)
    weights = torch.randn(x.shape, generator=g)
    results = []
    for forward in (
        q,
        lambda t: _lsq_by_autograd(t, q.scale.reshape(shape), zp.reshape(shape), 15),
    ):
        xs = x.clone().requires_grad_(True)
        q.scale.grad = None
        out = forward(xs)
        (out * weights).sum().backward()
        results.append((out.detach(), xs.grad, q.scale.grad.clone()))
    (out, gx, gs), (ref_out, ref_gx, ref_gs) = results
    ends = (codes == 0) | (codes == 15)
    assert ends.any() and ((codes > 0) & (codes < 15)).any() and ((codes < 0) | (codes > 15)).any()
    assert torch.allclose(out, ref_out, atol=1e-6)
    assert torch.equal(gx == 0, ref_gx == 0) and torch.allclose(gx, ref_gx, rtol=1e-6)
    assert torch.allclose(gs, ref_gs, rtol=1e-5, atol=1e-7)


def test_fake_quant_gradient_stops_at_the_end_codes():
    """A value whose code is 0 or qmax gets no input gradient (as ``torch.clamp``'s, which is 0
    at its bounds), and its step gradient is ``q - z``."""
    q = UniformQuantizer(2, range_method="minmax")  # codes 0..3, zero point 1
    q.set_params(torch.tensor(1.0), torch.tensor(1.0))
    q.scale.requires_grad_(True)
    q.set_state("quant")
    x = torch.tensor([-1.4, 1.7, 2.2, -0.6, 0.3], requires_grad=True)
    out = q(x)
    out.sum().backward()
    assert out.tolist() == [-1.0, 2.0, 2.0, -1.0, 0.0]  # codes 0, 3, 3, 0, 1
    assert x.grad.tolist() == [0.0, 0.0, 0.0, 0.0, 1.0]
    raw = -1.0 + 2.0 + 2.0 - 1.0 + (0.0 - 0.3)
    assert q.scale.grad.item() == pytest.approx(raw / math.sqrt(5 * 3), rel=1e-6)


def test_log2_hand_values():
    q = LogQuantizer(3)  # codes 0..7, delta = 1
    q.calibrated = True
    q.set_state("quant")
    x = torch.tensor([1.0, 0.5, 0.3, 0.1, 2**-7, 2**-7.6, 2**-9, 0.0])
    out = q(x)
    # -log2: 0, 1, 1.74->2, 3.32->3, 7, 7.6 -> beyond 7.5 -> 0, 9 -> 0, 0 -> 0
    assert out.tolist() == [1.0, 0.5, 0.25, 0.125, 2**-7, 0.0, 0.0, 0.0]


def test_log_sqrt2_hand_values():
    q = LogQuantizer(3, k=2.0)
    q.calibrated = True
    q.set_state("quant")
    out = q(torch.tensor([1.0, 0.7, 0.5, 0.4]))
    # -2 log2: 0, 1.03->1, 2, 2.64->3 ; x_hat = 2^(-q/2)
    assert torch.allclose(out, torch.tensor([1.0, 2**-0.5, 0.5, 2**-1.5]))


def test_log2_calibration_picks_delta_from_data():
    q = LogQuantizer(4)
    q.set_state("observe")
    q(torch.rand(1000) * 0.5)
    q.finish_calibration()
    assert 0.45 < q.delta.item() <= 0.5


def test_adaround_soft_init_reproduces_weight_and_hard_is_nearest():
    torch.manual_seed(0)
    w = torch.randn(8, 16) * 0.1
    q = AdaRoundWeightQuantizer(4)
    q.calibrate_from(w)
    q.set_state("quant")
    nearest = q(w)
    q.init_adaround(w)
    soft = q(w)
    # inside the clipping range, floor + frac reproduces w (up to the 0.01/0.99 clamp of h)
    scale = q.scale.reshape(-1, 1)
    inside = (w / scale + q.zero_point.reshape(-1, 1) > 0) & (
        w / scale + q.zero_point.reshape(-1, 1) < q.qmax
    )
    assert torch.all((soft - w).abs()[inside] <= 0.011 * scale.expand_as(w)[inside])
    q.harden()
    assert torch.equal(q(w), nearest)
    ints = q.integer_weight(w)
    assert torch.equal(ints, ints.round()) and ints.min() >= 0 and ints.max() <= 15


def _learning_3bit_adaround():
    """A 3-bit AdaRound quantizer of random weights ``w``, its ``V`` moved to either side of 0."""
    torch.manual_seed(0)
    w = torch.randn(8, 16) * 0.1
    q = AdaRoundWeightQuantizer(3)
    q.calibrate_from(w)
    q.set_state("quant")
    q.init_adaround(w)
    q.alpha.data += torch.randn_like(q.alpha)
    return q, w


def test_adaround_hard_ste_forward_is_hard_and_gradient_is_soft():
    """The hard tail's rounding: the weights the deployed model will have in the forward, the
    soft rounding's gradient to V."""
    q, w = _learning_3bit_adaround()
    upstream = torch.randn_like(w)
    grads = {}
    for mode in ("soft", "hard", "hard_ste"):
        q.rounding = mode
        q.alpha.grad = None
        out = q(w)
        grads[mode] = out.detach()
        if mode != "hard":
            (out * upstream).sum().backward()
            grads[mode + "_grad"] = q.alpha.grad.clone()
    assert torch.equal(grads["hard_ste"], grads["hard"])
    assert not torch.equal(grads["hard"], grads["soft"])
    # the soft codes' gradient (the hard ones clipped to [0, qmax] or not)
    assert torch.equal(grads["hard_ste_grad"], grads["soft_grad"])
    assert (grads["soft_grad"] != 0).float().mean() > 0.5


def _adaround_by_autograd(q, w, hard_forward):
    """AdaRound's weight as the chain of autograd ops: floor, rectified sigmoid, clamp."""
    scale, zp = q.scale.reshape(-1, 1), q.zero_point.reshape(-1, 1)
    down = torch.floor(w / scale)
    codes = torch.clamp(down + q.soft_rounding() + zp, 0, q.qmax)
    if hard_forward:
        hard = torch.clamp(down + (q.alpha >= 0).to(w.dtype) + zp, 0, q.qmax)
        codes = hard + (codes - codes.detach())
    return (codes - zp) * scale


@pytest.mark.parametrize("rounding", ["soft", "hard_ste"])
def test_adaround_values_and_gradient_match_the_chain_of_autograd_ops(rounding):
    """Soft and hard-tail rounding against the chain of ops, with weights beyond the range
    (codes clipped at 0 and qmax) and ``V`` far enough out for ``h`` to sit at 0 or 1."""
    g = torch.Generator().manual_seed(0)
    w = torch.randn(8, 16, generator=g) * 0.1
    q = AdaRoundWeightQuantizer(3)
    q.calibrate_from(w * 0.6)  # a range narrower than the weights: some codes clip
    q.set_state("quant")
    q.init_adaround(w)
    q.alpha.data += torch.randn(q.alpha.shape, generator=g) * 4  # h at 0 or 1 for some
    q.rounding = rounding
    upstream = torch.randn(w.shape, generator=g)
    results = []
    for forward in (q, lambda t: _adaround_by_autograd(q, t, rounding == "hard_ste")):
        q.alpha.grad = None
        out = forward(w)
        (out * upstream).sum().backward()
        results.append((out.detach(), q.alpha.grad.clone()))
    (out, grad), (ref_out, ref_grad) = results
    scale, zp = q.scale.reshape(-1, 1), q.zero_point.reshape(-1, 1)
    h = q.soft_rounding().detach()
    codes = torch.floor(w / scale) + h + zp
    assert ((codes <= 0) | (codes >= q.qmax)).any()  # clipped codes are exercised
    assert ((h == 0) | (h == 1)).any() and ((h > 0) & (h < 1)).any()
    assert torch.equal(out, ref_out)
    assert torch.equal(grad == 0, ref_grad == 0)
    assert torch.allclose(grad, ref_grad, rtol=1e-5, atol=1e-9)


@pytest.mark.parametrize("beta", [2.0, 7.3, 20.0])
def test_adaround_regularizer_and_gradient_match_the_chain_of_autograd_ops(beta):
    g = torch.Generator().manual_seed(0)
    q = AdaRoundWeightQuantizer(4)
    w = torch.randn(16, 32, generator=g)
    q.calibrate_from(w)
    q.init_adaround(w)
    q.alpha.data = torch.randn(q.alpha.shape, generator=g) * 3  # h at 0 or 1 for some
    h = q.soft_rounding()
    chain = (1 - (2 * h - 1).abs().pow(beta)).sum()
    (ref_grad,) = torch.autograd.grad(chain, q.alpha)
    loss = q.rounding_loss(beta)
    (grad,) = torch.autograd.grad(loss, q.alpha)
    assert ((h == 0) | (h == 1)).any()
    assert loss.item() == pytest.approx(chain.item(), rel=1e-6)
    assert torch.equal(grad == 0, ref_grad == 0)
    assert torch.allclose(grad, ref_grad, rtol=1e-5, atol=1e-9)


def test_adaround_hard_ste_without_learning_is_hard():
    """Outside the learning path (no gradient, or ``V`` frozen) the hard tail's rounding still
    gives the hard weights."""
    q, w = _learning_3bit_adaround()
    q.rounding = "hard"
    hard = q(w).detach()
    q.rounding = "hard_ste"
    with torch.no_grad():
        assert torch.equal(q(w), hard)
    q.alpha.requires_grad_(False)
    assert torch.equal(q(w), hard)


def test_adaround_regularizer_zero_when_binary():
    q = AdaRoundWeightQuantizer(4)
    w = torch.randn(4, 4)
    q.calibrate_from(w)
    q.init_adaround(w)
    q.alpha.data = torch.full_like(q.alpha, 10.0)  # h -> 1
    assert q.rounding_loss(2.0).item() == pytest.approx(0.0, abs=1e-6)
    q.alpha.data.zero_()  # h = 0.5
    assert q.rounding_loss(2.0).item() == pytest.approx(16.0)


@pytest.mark.parametrize("bits", [1, 9, 2.5, True])
def test_bits_outside_range_rejected(bits):
    with pytest.raises(ValueError, match="2 to 8"):
        UniformQuantizer(bits)


def test_quant_before_calibration_rejected():
    with pytest.raises(RuntimeError, match="before calibration"):
        UniformQuantizer(4).set_state("quant")
