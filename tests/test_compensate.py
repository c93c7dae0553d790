"""Bias correction after reconstruction (pfcr_mm.recon.compensate): the quantized output means
move to the FP ones, the FP state stays the FP model, and the correction travels with the saved
state and into the export."""

import pytest
import torch
from torch import nn

from pfcr_mm import PTQConfig, ReconSettings
from pfcr_mm.export.onnx_export import integer_model
from pfcr_mm.quant.calibrate import quantizer_states
from pfcr_mm.quant.modules import QuantConv2d, QuantLinear
from pfcr_mm.recon.compensate import correct_biases


def _quantized_mlp(seed: int = 0) -> nn.Sequential:
    """Linear(16, 32) with a bias -> GELU -> Linear(32, 8) without one, at W3A3, calibrated on
    random inputs and in the quantized state."""
    torch.manual_seed(seed)
    net = nn.Sequential(nn.Linear(16, 32), nn.GELU(), nn.Linear(32, 8, bias=False))
    net[0], net[2] = QuantLinear(net[0], 3, 3), QuantLinear(net[2], 3, 3)
    return net


def _calibrate(net: nn.Sequential, x: torch.Tensor) -> None:
    for layer in (net[0], net[2]):
        layer.input_quantizer.set_state("observe")
    with torch.no_grad():
        net(x)
    for layer in (net[0], net[2]):
        layer.input_quantizer.finish_calibration()
        layer.input_quantizer.set_state("quant")
        layer.weight_quantizer.set_state("quant")


def _mean_gap(net: nn.Sequential, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        with quantizer_states(net, weights=False, activations=False):
            fp = net(x)
        return (net(x).mean(0) - fp.mean(0)).abs()


def test_bias_correction_moves_the_quantized_means_to_the_fp_ones():
    net = _quantized_mlp()
    x = torch.randn(512, 16) + 0.5
    _calibrate(net, x)
    with torch.no_grad(), quantizer_states(net, weights=False, activations=False):
        fp_before = net(x)
    gap_before = _mean_gap(net, x)
    assert float(gap_before.max()) > 0.01  # W3A3 moves the output means

    report = correct_biases(net, list(x.split(128)), lambda m, b: m(b))

    assert report["layers"] == 2
    assert report["relative_mean_shift_after"] < 1e-6 * report["relative_mean_shift_before"]
    gap_after = _mean_gap(net, x)
    assert float(gap_after.max()) < 0.02 * float(gap_before.max())
    # a layer without a bias gets a correction and still no bias
    assert net[2].bias is None and net[2].bias_correction.shape == (8,)
    # the FP state is still the FP model
    with torch.no_grad(), quantizer_states(net, weights=False, activations=False):
        assert torch.equal(net(x), fp_before)


def test_the_correction_is_saved_loaded_and_exported():
    net = _quantized_mlp()
    x = torch.randn(256, 16) + 0.5
    _calibrate(net, x)
    correct_biases(net, [x], lambda m, b: m(b))
    with torch.no_grad():
        ref = net(x)

    fresh = _quantized_mlp(seed=1)  # other weights: the state dict must replace them all
    _calibrate(fresh, x)
    fresh.load_state_dict(net.state_dict())  # strict: the correction buffers are created
    with torch.no_grad():
        assert torch.equal(fresh(x), ref)
        # the integer model folds the correction into the bias: the same outputs
        assert torch.equal(integer_model(net)(x), ref)


def test_compensate_setting_is_checked():
    assert ReconSettings(compensate="bias").compensate == "bias"
    with pytest.raises(ValueError, match="compensate"):
        ReconSettings(compensate="weights")
    assert PTQConfig.from_dict({"recon": {"compensate": "bias"}}).recon.compensate == "bias"


class _Twice(nn.Module):
    """One linear run twice per forward (as a head shared by the FPN levels), then another."""

    def __init__(self):
        super().__init__()
        self.shared = nn.Linear(16, 16)
        self.out = nn.Linear(16, 8)

    def forward(self, x):
        return self.out(torch.relu(self.shared(torch.relu(self.shared(x)))))


def _quantize_all(net: nn.Module, x: torch.Tensor) -> None:
    layers = [m for m in net.modules() if isinstance(m, QuantLinear | QuantConv2d)]
    for m in layers:
        m.input_quantizer.set_state("observe")
    with torch.no_grad():
        net(x)
    for m in layers:
        m.input_quantizer.finish_calibration()
        m.input_quantizer.set_state("quant")
        m.weight_quantizer.set_state("quant")


def test_a_layer_run_twice_per_forward_is_measured_over_both_runs():
    torch.manual_seed(0)
    net = _Twice()
    net.shared, net.out = QuantLinear(net.shared, 3, 3), QuantLinear(net.out, 3, 3)
    x = torch.randn(512, 16) + 0.5
    _quantize_all(net, x)
    report = correct_biases(net, list(x.split(128)), lambda m, b: m(b))
    # one correction serves both runs, so the shared layer's means cannot all be exact; the
    # stop after its first run alone would leave most of the shift (measured: 0.90 of it)
    assert report["layers"] == 2
    assert report["relative_mean_shift_after"] < 0.3 * report["relative_mean_shift_before"]
    assert float(_mean_gap(net, x).max()) < 1e-5  # the last layer's output means are the FP ones


def test_convolutions_are_corrected_per_output_channel_and_excluded_parts_are_not():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 4, 1))
    net[0], net[2] = QuantConv2d(net[0], 3, 3), QuantConv2d(net[2], 3, 3)
    x = torch.randn(16, 3, 12, 12) + 0.5
    _quantize_all(net, x)
    with torch.no_grad():
        with quantizer_states(net, weights=False, activations=False):
            fp = net(x).mean((0, 2, 3))
        before = (net(x).mean((0, 2, 3)) - fp).abs().max()
    report = correct_biases(net, [x], lambda m, b: m(b), exclude=[net[2]])
    assert report["layers"] == 1 and net[2].bias_correction is None
    assert net[0].bias_correction.shape == (8,)
    correct_biases(net, [x], lambda m, b: m(b))
    with torch.no_grad():
        after = (net(x).mean((0, 2, 3)) - fp).abs().max()
    assert float(before) > 0.01 and float(after) < 1e-5 * float(before) + 1e-6
