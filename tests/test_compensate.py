"""Closed-form compensation (pfcr_mm.recon.compensate). Bias correction: the quantized output
means move to the FP ones. GPTQ: each column's rounding error is taken out of the columns after
it, lowering the layers' output error below round-to-nearest. Both leave the FP state the FP
model and travel with the saved state and into the export."""

from pathlib import Path

import pytest
import torch
from torch import nn

from pfcr_mm import PTQConfig, QuantConfig, ReconSettings, quantize
from pfcr_mm.export.onnx_export import integer_model
from pfcr_mm.quant.calibrate import quantizer_states
from pfcr_mm.quant.modules import QuantConv2d, QuantConvTranspose2d, QuantLinear
from pfcr_mm.recon.compensate import GPTQ_DAMPING, correct_biases, gptq_weights


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
    assert ReconSettings(compensate="gptq").compensate == "gptq"
    with pytest.raises(ValueError, match="compensate"):
        ReconSettings(compensate="weights")
    assert PTQConfig.from_dict({"recon": {"compensate": "bias"}}).recon.compensate == "bias"


@pytest.mark.parametrize(
    "method, resolved", [("calib", "gptq"), ("block", "none"), ("pfcr", "none")]
)
def test_compensate_auto_is_gptq_for_calib_only_and_resolved_once(method, resolved):
    given = ReconSettings()
    assert given.compensate == "auto"
    config = PTQConfig(method=method, recon=given)
    assert config.recon.compensate == resolved
    assert given.compensate == "auto"  # the caller's settings are not changed
    assert PTQConfig.from_dict(config.to_dict()) == config  # the resolved value round-trips
    # an explicit value is kept whatever the method
    explicit = PTQConfig(method=method, recon=ReconSettings(compensate="bias"))
    assert explicit.recon.compensate == "bias"


class _Twice(nn.Module):
    """One linear run twice per forward (as a head shared by the FPN levels), then another."""

    def __init__(self):
        super().__init__()
        self.shared = nn.Linear(16, 16)
        self.out = nn.Linear(16, 8)

    def forward(self, x):
        return self.out(torch.relu(self.shared(torch.relu(self.shared(x)))))


def _quantize_all(net: nn.Module, x: torch.Tensor) -> None:
    layers = [
        m for m in net.modules() if isinstance(m, QuantLinear | QuantConv2d | QuantConvTranspose2d)
    ]
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


def _correlated_inputs(n: int, dim: int, seed: int = 0) -> torch.Tensor:
    """Inputs whose channels are correlated (what GPTQ's error feedback can use)."""
    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(dim, dim, generator=g) / dim**0.5 + torch.eye(dim)
    return torch.randn(n, dim, generator=g) @ mix + 0.5


def _weight_error(layer: QuantLinear, x: torch.Tensor) -> float:
    """``||W_hat x_q - W x_q||^2 / ||W x_q||^2`` over ``x``: the error the weights add, the
    layer's input quantized."""
    with torch.no_grad():
        xq = layer.input_quantizer(x)
        ref = xq @ layer.weight.T
        return float((xq @ layer.active_weight().T - ref).pow(2).sum() / ref.pow(2).sum())


def test_gptq_rounds_each_weight_below_round_to_nearest_and_keeps_the_fp_model():
    net = _quantized_mlp()
    x = _correlated_inputs(1024, 16)
    _calibrate(net, x)
    with torch.no_grad():
        with quantizer_states(net, weights=False, activations=False):
            fp = net(x)
        nearest_error = float((net(x) - fp).pow(2).sum())
    first_nearest = _weight_error(net[0], x)

    lines = []
    report = gptq_weights(net, list(x.split(256)), lambda m, b: m(b), print_fn=lines.append)

    assert report["layers"] == 2
    # progress: a line per batch of the inputs' pass, then one per layer solved
    assert lines == [f"gptq: inputs of batch {i}/4" for i in (1, 2, 3, 4)] + [
        "gptq: 1/2 0",
        "gptq: 2/2 2",
    ]
    assert report["relative_output_error_gptq"] < 0.85 * report["relative_output_error_nearest"]
    assert _weight_error(net[0], x) < 0.85 * first_nearest
    with torch.no_grad():
        assert float((net(x) - fp).pow(2).sum()) < nearest_error
        with quantizer_states(net, weights=False, activations=False):
            assert torch.equal(net(x), fp)  # the FP state is still the FP model
    # rounding the corrected weight to nearest lands on the quantizer's grid
    wq = net[0].weight_quantizer
    codes = wq.integer_weight(net[0].corrected_weight())
    dequant = (codes - wq.zero_point.reshape(-1, 1)) * wq.scale.reshape(-1, 1)
    assert torch.allclose(net[0].active_weight(), dequant, atol=1e-6)


def test_gptq_moves_the_error_of_a_column_onto_the_next_by_least_squares():
    # two inputs: after the first column is rounded, the second absorbs its error by
    # e0 * H01 / H11 (e0 = w0 - q0: its output error e0 x0 is cancelled by least squares), H the
    # damped second moments of the quantized inputs
    torch.manual_seed(0)
    layer = QuantLinear(nn.Linear(2, 3, bias=False), 4, 8)
    x = torch.randn(4096, 2) @ torch.tensor([[1.0, 0.8], [0.0, 0.6]])
    net = nn.Sequential(layer)
    _quantize_all(net, x)
    gptq_weights(net, [x], lambda m, b: m(b), print_fn=lambda s: None)
    with torch.no_grad():
        xq = layer.input_quantizer(x).double()
    h = xq.T @ xq
    h += GPTQ_DAMPING * h.diagonal().mean() * torch.eye(2, dtype=torch.float64)
    w = layer.weight.detach().double()
    wq = layer.weight_quantizer
    s, z = wq.scale.detach().double(), wq.zero_point.double()
    e0 = w[:, 0] - (torch.clamp(torch.round(w[:, 0] / s) + z, 0, wq.qmax) - z) * s
    expected = torch.stack([torch.zeros(3, dtype=torch.float64), e0 * h[0, 1] / h[1, 1]], 1)
    assert torch.allclose(layer.weight_correction.double(), expected, atol=1e-6)


def test_gptq_on_a_convolution_unfolds_its_inputs():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1, stride=2), nn.ReLU(), nn.Conv2d(8, 4, 1))
    net[0], net[2] = QuantConv2d(net[0], 3, 8), QuantConv2d(net[2], 3, 8)
    x = torch.nn.functional.avg_pool2d(torch.randn(32, 3, 20, 20), 3, 1, 1) + 0.5  # smooth
    _quantize_all(net, x)

    def conv_error(layer):
        with torch.no_grad():
            xq = layer.input_quantizer(x)
            ref = layer._conv_forward(xq, layer.weight, None)
            out = layer._conv_forward(xq, layer.active_weight(), None)
            return float((out - ref).pow(2).sum() / ref.pow(2).sum())

    before = conv_error(net[0])
    report = gptq_weights(net, [x], lambda m, b: m(b), print_fn=lambda s: None)
    assert report["layers"] == 2
    # a padding F.unfold does not reproduce: that convolution keeps round-to-nearest
    same = QuantConv2d(nn.Conv2d(3, 4, 3, padding="same", padding_mode="reflect"), 3, 8)
    _quantize_all(same, x)
    assert gptq_weights(same, [x], lambda m, b: m(b), print_fn=lambda s: None)["layers"] == 0
    assert same.weight_correction is None
    # the error the report computes from the unfolded moments is the convolution's own
    assert conv_error(net[0]) < 0.8 * before


def test_the_gptq_weights_are_saved_loaded_and_exported():
    net = _quantized_mlp()
    x = _correlated_inputs(256, 16)
    _calibrate(net, x)
    gptq_weights(net, [x], lambda m, b: m(b), print_fn=lambda s: None)
    with torch.no_grad():
        ref = net(x)
    fresh = _quantized_mlp(seed=1)
    _calibrate(fresh, x)
    fresh.load_state_dict(net.state_dict())  # strict: the correction buffers are created
    with torch.no_grad():
        assert torch.equal(fresh(x), ref)
        # the integer model holds the codes of the corrected weights
        assert torch.allclose(integer_model(net)(x), ref, atol=1e-5)


@pytest.fixture(scope="module")
def demo_vit_and_images(seed_and_one_thread):
    """The demo ViT (committed checkpoint) and demo images drawn in memory: 64 calibration
    images (train split), 200 held-out ones (val split), and the FP logits on those."""
    import json

    import numpy as np
    import timm

    from pfcr_mm.demo.shapes import CLASSES, image_rng, render_shape_image

    meta = json.loads(Path("checkpoints/demo_vit_shapes.json").read_text())

    def images(split: str, per_class: int) -> torch.Tensor:
        x = [
            render_shape_image(name, image_rng(0, split, c, i))
            for c, name in enumerate(CLASSES)
            for i in range(per_class)
        ]
        return (torch.from_numpy(np.stack(x)).permute(0, 3, 1, 2).float() / 255 - 0.5) / 0.5

    def build() -> nn.Module:
        m = timm.create_model(meta["arch"], pretrained=False, **meta["model_kwargs"])
        m.load_state_dict(torch.load("checkpoints/demo_vit_shapes.pth", weights_only=True))
        return m.eval()

    train = images("train", 8)  # 80, by class: 64 of them in a seeded order
    calib = train[torch.randperm(80, generator=torch.Generator().manual_seed(0))[:64]]
    held = images("val", 20)
    with torch.no_grad():
        ref = build()(held)
    return build, list(calib.split(32)), held, ref


def _quantized_error(demo, method: str, compensate: str) -> tuple[float, nn.Module, dict]:
    build, calib, held, ref = demo
    model = build()
    config = PTQConfig(
        method=method,
        quant=QuantConfig(w_bits=3, a_bits=3),
        recon=ReconSettings(iters=20, batch_size=32, log_every=0, compensate=compensate),
    )
    result = quantize(model, config, calib, print_fn=lambda s: None)
    with torch.no_grad():
        error = float((model(held) - ref).pow(2).sum() / ref.pow(2).sum())
    return error, model, result.recon


def test_gptq_after_calibration_lowers_the_demo_vits_held_out_error(demo_vit_and_images):
    nearest, _, _ = _quantized_error(demo_vit_and_images, "calib", "none")
    gptq, model, recon = _quantized_error(demo_vit_and_images, "calib", "gptq")
    layers = [m for m in model.modules() if isinstance(m, QuantLinear | QuantConv2d)]
    report = recon["compensation"]
    # every linear and the patch embedding's convolution, each below round-to-nearest
    assert report["layers"] == len(layers) == 26
    assert all(m.weight_correction is not None for m in layers)
    assert report["relative_output_error_gptq"] < 0.5 * report["relative_output_error_nearest"]
    # on 200 held-out images (measured: 0.091 -> 0.065)
    assert gptq < 0.8 * nearest


def test_a_reconstruction_starts_from_the_gptq_weights(demo_vit_and_images):
    _, model, recon = _quantized_error(demo_vit_and_images, "block", "gptq")
    assert recon["compensation"]["method"] == "gptq" and recon["units"] > 0
    layer = model.blocks[0].mlp.fc1
    wq = layer.weight_quantizer
    assert wq.rounding == "hard" and layer.weight_correction is not None
    # GPTQ moved some weights by more than one step (measured: up to 2.1 in this layer)
    steps = layer.weight_correction / wq.scale.detach().reshape(-1, 1)
    assert float(steps.abs().max()) > 1.5
    # AdaRound started on the corrected weights, so after 20 steps the hardened codes are still
    # GPTQ's almost everywhere (measured: 99.6 % over the linears; 67-75 % when it started on
    # the FP weights' fractional parts)
    for m in model.modules():
        if isinstance(m, QuantLinear):
            q, corrected = m.weight_quantizer, m.corrected_weight().detach()
            zero = q.zero_point.reshape(-1, 1)
            gptq = torch.clamp(
                torch.round(corrected / q.scale.detach().reshape(-1, 1)) + zero, 0, q.qmax
            )
            assert float((q.integer_weight(corrected) == gptq).float().mean()) > 0.95, m


def _as_rows(layer: nn.Module, weight: torch.Tensor) -> torch.Tensor:
    """A weight as the matrix whose rows multiply a pixel's (or token's) 300 input channels: a
    2x2 stride-2 transposed convolution's rows are (output channel, kernel row, kernel column)."""
    if isinstance(layer, nn.ConvTranspose2d):
        return weight.permute(1, 2, 3, 0).reshape(-1, 300)
    return weight.reshape(-1, 300)


@pytest.mark.parametrize("kind", ["linear", "conv1x1", "deconv2x2"])
def test_gptq_in_blocks_of_columns_is_gptq_column_by_column(kind):
    # 300 inputs: blocks of 128, 128 and 44 columns; the reference takes each column's error out
    # of every later column at once
    torch.manual_seed(0)
    rows = torch.randn(2048, 300) @ (torch.eye(300) + 0.1 * torch.randn(300, 300))
    if kind == "linear":
        layer, x = QuantLinear(nn.Linear(300, 6, bias=False), 3, 8), rows
    else:  # 8 images of 16x16 pixels: a pixel's channels are a row of the weight's input
        x = rows.reshape(8, 16, 16, 300).permute(0, 3, 1, 2).contiguous()
        if kind == "conv1x1":
            layer = QuantConv2d(nn.Conv2d(300, 6, 1, bias=False), 3, 8)
        else:  # each pixel writes its own 2x2 output patch
            layer = QuantConvTranspose2d(nn.ConvTranspose2d(300, 6, 2, 2, bias=False), 3, 8)
    net = nn.Sequential(layer)
    _quantize_all(net, x)
    gptq_weights(net, [x], lambda m, b: m(b), print_fn=lambda s: None)
    with torch.no_grad():
        xq = layer.input_quantizer(x).double()
    xq = xq if kind == "linear" else xq.permute(0, 2, 3, 1).reshape(-1, 300)
    h = xq.T @ xq
    h.diagonal().add_(GPTQ_DAMPING * h.diagonal().mean())
    u = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(h)), upper=True)
    wq = layer.weight_quantizer
    s, z = wq.scale.detach().double(), wq.zero_point.double()
    per_channel = 4 if kind == "deconv2x2" else 1  # the 2x2 rows of an output channel
    s = s.repeat_interleave(per_channel).reshape(-1, 1)
    z = z.repeat_interleave(per_channel).reshape(-1, 1)
    w = _as_rows(layer, layer.weight.detach().double()).clone()
    for i in range(300):
        e = w[:, i : i + 1] - (torch.clamp(torch.round(w[:, i : i + 1] / s) + z, 0, 7) - z) * s
        w[:, i + 1 :] -= e / u[i, i] * u[i : i + 1, i + 1 :]
    expected = w - _as_rows(layer, layer.weight.detach().double())
    assert expected.abs().max() > 0.5 * float(s.min())  # GPTQ moved weights: the check can fail
    got = _as_rows(layer, layer.weight_correction.double())
    assert torch.allclose(got, expected, atol=1e-5)


def test_gptq_on_a_transposed_convolution_lowers_its_output_error_where_kernels_do_not_overlap():
    torch.manual_seed(0)
    # a pixel's 24 channels correlated (mostly 4 directions): what GPTQ's columns can absorb
    pixels = torch.randn(16 * 144, 4) @ torch.randn(4, 24) + 0.3 * torch.randn(16 * 144, 24)
    x = pixels.reshape(16, 12, 12, 24).permute(0, 3, 1, 2).contiguous()
    layer = QuantConvTranspose2d(nn.ConvTranspose2d(24, 8, 2, 2, bias=False), 3, 8)
    net = nn.Sequential(layer)
    _quantize_all(net, x)

    def error() -> float:
        with torch.no_grad():
            with quantizer_states(net, weights=False, activations=True):
                ref = net(x)  # the same quantized inputs, FP weights
            return float((net(x) - ref).pow(2).sum() / ref.pow(2).sum())

    before = error()
    report = gptq_weights(net, [x], lambda m, b: m(b), print_fn=lambda s: None)
    assert report["layers"] == 1
    assert error() < 0.8 * before
    assert report["relative_output_error_gptq"] == pytest.approx(error(), rel=1e-3)
    # overlapping kernels (a stride below the kernel) keep round-to-nearest
    overlapping = QuantConvTranspose2d(nn.ConvTranspose2d(24, 8, 3, 2), 3, 8)
    _quantize_all(overlapping, x)
    assert gptq_weights(overlapping, [x], lambda m, b: m(b), print_fn=lambda s: None)["layers"] == 0
    assert overlapping.weight_correction is None
