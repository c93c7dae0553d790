"""Bias correction after reconstruction (pfcr_mm.recon.compensate): the quantized output means
move to the FP ones, the FP state stays the FP model, and the correction travels with the saved
state and into the export."""

import pytest
import torch
from torch import nn

from pfcr_mm import PTQConfig, ReconSettings
from pfcr_mm.export.onnx_export import integer_model
from pfcr_mm.quant.calibrate import quantizer_states
from pfcr_mm.quant.modules import QuantLinear
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
