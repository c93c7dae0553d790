"""The fine-to-coarse driver (pfcr_mm/recon/driver.py): the order of the units, freeing
caches, the temperature spans, and a whole PFCR run on a tiny ViT with its log and plot."""

import json
import math
import weakref

import pytest
import torch

import pfcr_mm.recon.driver as driver_module
from pfcr_mm.quant.calibrate import quantizer_states
from pfcr_mm.quant.quantizers import AdaRoundWeightQuantizer
from pfcr_mm.recon import (
    ChainDataSource,
    FineToCoarseSchedule,
    ReconSettings,
    UnitRecord,
    run_reconstruction,
)
from pfcr_mm.recon.loss import reconstruction_loss


class _FakeSource:
    """Hands out fresh caches and remembers them weakly, to see when the driver lets go."""

    def __init__(self):
        self.calls, self.alive_at_call = [], []
        self.refs = []

    def _alive(self):
        return sum(r() is not None for r in self.refs)

    def fp_io(self, unit):
        self.alive_at_call.append(self._alive())
        self.calls.append(unit.name)
        x, y = torch.zeros(2, 3), torch.zeros(2, 3)
        self.refs += [weakref.ref(x), weakref.ref(y)]
        return [x], [y], [()]

    def quant_input(self, unit):
        q = torch.zeros(2, 3)
        self.refs.append(weakref.ref(q))
        return [q]


def test_driver_walks_fine_to_coarse_frees_caches_and_spans_beta(monkeypatch, tmp_path, fake_units):
    units, _ = fake_units([3])
    schedule = FineToCoarseSchedule(units)
    spans = []

    def fake_reconstruct(unit, caches, settings, recipe, progress=None):
        spans.append(recipe.beta_span)
        return UnitRecord(unit.name, 0, recipe.iters, 1.0, 0.5, 0.0, [1.0, 0.5])

    monkeypatch.setattr(driver_module, "reconstruct_unit", fake_reconstruct)
    source = _FakeSource()
    lines = []
    settings = ReconSettings(iters=2, pos="anneal")
    records = run_reconstruction(schedule, source, settings, tmp_path, print_fn=lines.append)
    order = [u.name for _, us in schedule for u in us]
    assert source.calls == order and [r.name for r in records] == order
    assert (
        order[:6] == [u.name for u in units] and order[-1] == "layers.0.blocks.0..layers.0.blocks.2"
    )
    assert source.alive_at_call == [0] * len(order)  # every unit's caches freed before the next
    # level 2 is [0, 1], [2]: the group of block 2 alone repeats level 1 and is skipped
    assert [r.level for r in records] == [0] * 6 + [1] * 3 + [2] + [3]
    # pos='anneal': the temperature decay is split over the 4 levels run
    assert spans == [(0.0, 0.25)] * 6 + [(0.25, 0.5)] * 3 + [(0.5, 0.75)] + [(0.75, 1.0)]
    assert lines[0].startswith("(1/11) layers.0.blocks.0.attn, level 0, loss 1 -> 0.5")


def test_output_aware_term_only_from_its_level_with_its_metric(monkeypatch, fake_units):
    """``downstream_min_level``: units of finer levels get no output weights (the plain loss),
    the others get weights asked for with the run's metric, temperature, probes and seed."""
    units, _ = fake_units([2])
    asked, got = [], []

    class WeightedSource(_FakeSource):
        def output_weights(self, unit, fp_targets, probes, seed, metric, temperature):
            asked.append((unit.name, probes, seed, metric, temperature))
            return [torch.ones_like(t) for t in fp_targets]

    def fake_reconstruct(unit, caches, settings, recipe, progress=None):
        got.append((recipe, caches.weights is not None))
        return UnitRecord(unit.name, 0, recipe.iters, 1.0, 0.5, 0.0, [1.0, 0.5])

    monkeypatch.setattr(driver_module, "reconstruct_unit", fake_reconstruct)
    settings = ReconSettings(
        iters=2,
        seed=3,
        downstream_weight=1.0,
        downstream_probes=5,
        downstream_metric="kl",
        downstream_temperature=4.0,
        downstream_min_level=1,
    )
    records = run_reconstruction(FineToCoarseSchedule(units), WeightedSource(), settings, None,
                                 print_fn=lambda s: None)  # fmt: skip
    levels = [r.level for r in records]
    assert levels == [0] * 4 + [1] * 2 + [2]
    assert [w for _, w in got] == [lvl >= 1 for lvl in levels]
    assert [a[0] for a in asked] == [r.name for r in records if r.level >= 1]
    assert {a[1:] for a in asked} == {(5, 3, "kl", 4.0)}


def encoder_outputs(model, batches):
    """The last block's output ``(B, N, C)`` per batch."""
    outs = []
    hook = model.blocks[-1].register_forward_hook(lambda m, a, o: outs.append(o))
    with torch.no_grad():
        for b in batches:
            model(b)
    hook.remove()
    return outs


def encoder_error(model, batches, ref):
    outs = encoder_outputs(model, batches)
    return sum(reconstruction_loss(o, r).item() for o, r in zip(outs, ref)) / len(ref)


@pytest.mark.slow
def test_pfcr_run_on_vit_writes_log_and_plot_and_hardens(tmp_path, quantized_vit):
    model, plan, batches = quantized_vit()
    with quantizer_states(model, weights=False, activations=False):
        ref = encoder_outputs(model, batches)
    calib_err = encoder_error(model, batches, ref)
    schedule = FineToCoarseSchedule(plan.units, max_level=2)
    source = ChainDataSource(model, plan.units, batches, cache_dtype="float16")
    settings = ReconSettings(iters=30, batch_size=8, w_lr=1e-2, a_lr=1e-3, cache_dtype="float16")
    lines = []
    records = run_reconstruction(schedule, source, settings, tmp_path, print_fn=lines.append)
    assert len(records) == 8 + 4 + 2
    unit_lines = [ln for ln in lines if ln.startswith("(")]
    assert [ln.split(")")[0] for ln in unit_lines] == [f"({k}/14" for k in range(1, 15)]
    log = json.loads((tmp_path / "recon_log.json").read_text())
    assert log["finished"] and log["levels_run"] == [0, 1, 2]
    assert [u["name"] for u in log["units"]] == [r.name for r in records]
    assert all(len(u["curve"]["loss"]) == 30 for u in log["units"])
    assert all(u["peak_mem_mb"]["host_rss"] > 0 for u in log["units"])
    assert all(math.isfinite(u["hard_before"] + u["hard_after"]) for u in log["units"])
    assert (tmp_path / "recon_loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    quantizers = [m for m in model.blocks.modules() if isinstance(m, AdaRoundWeightQuantizer)]
    assert len(quantizers) == 16 and all(q.rounding == "hard" for q in quantizers)
    # the encoder output (what the blocks' reconstruction targets) is closer to the FP one; the
    # logits of this random tiny model are dominated by its 4-bit head, left to calibration
    assert encoder_error(model, batches, ref) < 0.9 * calib_err
