"""Reconstruction on mmdet's Swin: units take ``(x, hw_shape)``, calibration images differ in
size, and levels stay within a stage."""

import pytest
import torch

from pfcr_mm.adapters import prepare_calibrated
from pfcr_mm.quant.calibrate import quantizer_states
from pfcr_mm.recon import (
    ChainDataSource,
    FineToCoarseSchedule,
    ReconSettings,
    run_reconstruction,
)
from pfcr_mm.settings import QuantConfig


@pytest.fixture
def quantized_tiny_swin(tiny_mmdet_swin):
    """Factory: ``quantized_tiny_swin()`` returns ``(model, plan, batches)``."""

    def build():
        model = tiny_mmdet_swin()
        # two image sizes: 15x19 and 14x14 tokens at stage 1 (the first needs window padding)
        batches = [torch.randn(2, 3, 60, 76), torch.randn(1, 3, 56, 56)]
        plan = prepare_calibrated(
            model, QuantConfig(w_bits=4, a_bits=4), lambda m: [m(b) for b in batches]
        )
        return model, plan, batches

    return build


@pytest.mark.slow
def test_swin_blocks_composed_and_hw_shape_cached_per_image_size(quantized_tiny_swin):
    model, plan, batches = quantized_tiny_swin()
    schedule = FineToCoarseSchedule(plan.units)
    assert schedule.describe()["stages"] == [
        ["stages.0.blocks.0", "stages.0.blocks.1"],
        ["stages.1.blocks.0", "stages.1.blocks.1"],
    ]
    block = schedule.levels[1][2]  # stages.1.blocks.0
    seen = []
    hook = (
        model.stages[1]
        .blocks[0]
        .register_forward_hook(lambda m, a, o: seen.append((a[0], a[1], o)))
    )
    with quantizer_states(model, weights=False, activations=False), torch.no_grad():
        for b in batches:
            model(b)
    hook.remove()
    source = ChainDataSource(model, plan.units, batches)
    x, y, args = source.fp_io(block)
    assert args == [(hw,) for _, hw, _ in seen] == [((8, 10),), ((7, 7),)]
    for (fx, _, fy), xi, yi in zip(seen, x, y):
        assert torch.equal(xi, fx) and torch.equal(yi, fy)
    assert [t.shape[1] for t in source.quant_input(block)] == [80, 49]

    lines = []
    settings = ReconSettings(iters=4, batch_size=2, log_every=0)
    records = run_reconstruction(schedule, source, settings, None, print_fn=lines.append)
    assert [r.level for r in records] == [0] * 8 + [1] * 4 + [2] * 2
    assert records[-1].name == "stages.1.blocks.0..stages.1.blocks.1"
    assert [r.n_weight_quantizers for r in records] == [2] * 8 + [4] * 4 + [8] * 2
    assert lines[-1] == "hardened the rounding of 16 weight quantizer(s)"
