"""Reconstruction core on a tiny timm ViT at W4A4: units, levels, one unit's optimization,
hardening, reproducibility, failure handling, caches and the fine-to-coarse driver."""

import copy
import json
import math
import subprocess
import sys
import weakref

import pytest
import torch
from conftest import tiny_timm_swin, tiny_timm_vit
from torch import nn

import pfcr_mm.recon.driver as driver_module
from pfcr_mm.adapters import prepare, prepare_calibrated
from pfcr_mm.adapters.base import ReconUnit
from pfcr_mm.quant.calibrate import quantizer_states
from pfcr_mm.quant.config import QuantConfig
from pfcr_mm.quant.quantizers import AdaRoundWeightQuantizer
from pfcr_mm.recon import (
    ChainDataSource,
    ComposedUnit,
    FineToCoarseSchedule,
    ReconSettings,
    UnitRecipe,
    UnitRecord,
    beta_at,
    harden,
    layer_recipe,
    leaves,
    level_recipes,
    reconstruct_unit,
    run_reconstruction,
)
from pfcr_mm.recon.engine import CacheSampler, reconstruction_loss


def quantized_vit():
    """A tiny ViT (4 blocks, 17 tokens of 48 channels) quantized at W4A4, two calib batches."""
    model = tiny_timm_vit()
    batches = [torch.randn(16, 3, 32, 32) for _ in range(2)]
    plan = prepare_calibrated(
        model, QuantConfig(w_bits=4, a_bits=4), lambda m: [m(b) for b in batches]
    )
    return model, plan, batches


def unit_caches(model, plan, batches, unit, **kw):
    source = ChainDataSource(model, plan.units, batches, **kw)
    fp_inputs, fp_targets, extra = source.fp_io(unit)
    return source.quant_input(unit), fp_inputs, fp_targets, extra


def weight_quantizers(unit):
    return [(m.weight_quantizer, m) for m in unit.modules() if hasattr(m, "weight_quantizer")]


def same_state(a, b):
    """Two state dicts hold equal tensors (and equal extra states)."""
    return a.keys() == b.keys() and all(
        torch.equal(a[k], b[k]) if isinstance(a[k], torch.Tensor) else a[k] == b[k] for k in a
    )


def mean_error(unit, inputs, targets):
    """The unit's reconstruction error on every cached sample, without QDrop."""
    with torch.no_grad():
        errors = [reconstruction_loss(unit(x), y).item() for x, y in zip(inputs, targets)]
    return sum(errors) / len(errors)


# --- units and levels -------------------------------------------------------------------------


def test_composed_units_reproduce_blocks_exactly_in_fp():
    model, plan, batches = quantized_vit()
    schedule = FineToCoarseSchedule(plan.units)
    seen = {}
    hooks = [
        b.register_forward_hook(lambda m, a, o: seen.__setitem__(id(m), (a[0], o)))
        for b in model.blocks
    ]
    with quantizer_states(model, weights=False, activations=False), torch.no_grad():
        model(batches[0])
        for h in hooks:
            h.remove()
        for block_unit in schedule.levels[1]:
            attn, mlp = block_unit.parts
            assert (attn.kind, mlp.kind) == ("attn", "mlp")
            x, y = seen[id(attn.block)]
            assert torch.equal(block_unit(x), y)
            assert torch.equal(mlp(attn(x)), y)
        (encoder,) = schedule.levels[3]
        assert encoder.name == "blocks.0..blocks.3"
        assert torch.equal(encoder(seen[id(model.blocks[0])][0]), seen[id(model.blocks[3])][1])


def _covered_blocks(unit):
    return [leaf.block for leaf in leaves(unit)]


def _assert_each_block_once(level_units, finest_units):
    """The level's units hold every finest unit (so every block) once, in forward order."""
    covered = [id(leaf) for u in level_units for leaf in leaves(u)]
    assert covered == [id(u) for u in finest_units]


def test_vit_levels_cover_every_block_once():
    model = tiny_timm_vit()
    plan = prepare(model, QuantConfig())
    schedule = FineToCoarseSchedule(plan.units)  # max_level="top": the whole encoder
    assert list(schedule.levels) == [0, 1, 2, 3]
    sizes = {
        k: [len(dict.fromkeys(_covered_blocks(u))) for u in us] for k, us in schedule.levels.items()
    }
    assert sizes == {0: [1] * 8, 1: [1] * 4, 2: [2, 2], 3: [4]}
    assert [u.name for u in schedule.levels[0]] == [u.name for u in plan.units]
    for units in schedule.levels.values():
        _assert_each_block_once(units, plan.units)
    assert len(schedule) == 8 + 4 + 2 + 1
    block_only = FineToCoarseSchedule.block(plan.units)
    assert [k for k, _ in block_only] == [1]
    assert [u.name for u in block_only.levels[1]] == [f"blocks.{i}" for i in range(4)]
    assert list(FineToCoarseSchedule(plan.units, max_level=2).levels) == [0, 1, 2]
    assert list(FineToCoarseSchedule(plan.units, max_level=9).levels) == [0, 1, 2, 3]


def _fake_units(stage_depths):
    units, blocks = [], []
    for s, depth in enumerate(stage_depths):
        for i in range(depth):
            block = nn.Identity()
            blocks.append(block)
            for kind in ("attn", "mlp"):
                units.append(
                    ReconUnit(f"layers.{s}.blocks.{i}.{kind}", kind, block, lambda b, x: x)
                )
    return units, blocks


def test_swin_like_levels_stay_within_stages_with_odd_counts():
    units, blocks = _fake_units([3, 5])
    stage = {id(b): (0 if k < 3 else 1) for k, b in enumerate(blocks)}
    schedule = FineToCoarseSchedule(units, stage_of=lambda u: stage[id(u.block)])
    assert list(schedule.levels) == [0, 1, 2, 3, 4]  # top: 1 + ceil(log2 5)
    expected = {
        1: [1, 1, 1, 1, 1, 1, 1, 1],
        2: [2, 1, 2, 2, 1],
        3: [3, 4, 1],
        4: [3, 5],
    }
    for k, units_k in schedule.levels.items():
        _assert_each_block_once(units_k, units)
        for u in units_k:
            assert len({stage[id(b)] for b in _covered_blocks(u)}) == 1  # never across stages
        if k:
            assert [len(dict.fromkeys(_covered_blocks(u))) for u in units_k] == expected[k]
            assert all(getattr(u, "level", None) == k for u in units_k)
    # iterating leaves out the groups that repeat the previous level's units
    run = {k: [u.name for u in us] for k, us in schedule}
    assert run[2] == [
        "layers.0.blocks.0..layers.0.blocks.1",
        "layers.1.blocks.0..layers.1.blocks.1",
        "layers.1.blocks.2..layers.1.blocks.3",
    ]
    assert run[3] == [
        "layers.0.blocks.0..layers.0.blocks.2",
        "layers.1.blocks.0..layers.1.blocks.3",
    ]
    assert run[4] == ["layers.1.blocks.0..layers.1.blocks.4"]
    assert len(FineToCoarseSchedule(units, lambda u: stage[id(u.block)], skip_repeated=False)) == (
        16 + 8 + 5 + 3 + 2
    )
    # the default mapping reads the stage from the module names: same levels
    default = FineToCoarseSchedule(units)
    assert {k: [u.name for u in us] for k, us in default.levels.items()} == {
        k: [u.name for u in us] for k, us in schedule.levels.items()
    }
    with pytest.raises(ValueError, match="not consecutive"):
        FineToCoarseSchedule(
            units, stage_of=lambda u: stage[id(u.block)] if u.block is not blocks[1] else 1
        )


def test_real_swin_default_stages():
    plan = prepare(tiny_timm_swin(), QuantConfig())
    schedule = FineToCoarseSchedule(plan.units)
    assert schedule.describe()["stages"] == [
        ["layers.0.blocks.0", "layers.0.blocks.1"],
        ["layers.1.blocks.0", "layers.1.blocks.1"],
    ]
    assert [u.name for u in schedule.levels[2]] == [
        "layers.0.blocks.0..layers.0.blocks.1",
        "layers.1.blocks.0..layers.1.blocks.1",
    ]


# --- caches -------------------------------------------------------------------------------------


def test_data_source_matches_the_model():
    model, plan, batches = quantized_vit()
    attn1, mlp1 = plan.units[2], plan.units[3]
    block1 = ComposedUnit("blocks.1", 1, [attn1, mlp1])
    fp, quant = [], []
    hook = model.blocks[1].register_forward_hook(lambda m, a, o: seen.append((a[0], o)))
    with torch.no_grad():
        seen = fp
        with quantizer_states(model, weights=False, activations=False):
            for b in batches:
                model(b)
        seen = quant
        for b in batches:
            model(b)
    hook.remove()
    source = ChainDataSource(model, plan.units, batches)
    x, y, args = source.fp_io(block1)
    assert args == [(), ()]
    for (fx, fy), xi, yi in zip(fp, x, y):
        assert torch.equal(xi, fx) and torch.allclose(yi, fy, atol=1e-6)
    for (qx, _), xi in zip(quant, source.quant_input(block1)):
        assert torch.equal(xi, qx)
    # an MLP unit starts after its block's MHSA: its inputs go through the MHSA unit first
    x_mlp, y_mlp, _ = source.fp_io(mlp1)
    with torch.no_grad(), quantizer_states(model, weights=False, activations=False):
        assert torch.allclose(x_mlp[0], attn1(fp[0][0]), atol=1e-6)
        assert torch.allclose(y_mlp[0], fp[0][1], atol=1e-6)
    half = ChainDataSource(model, plan.units, batches, cache_dtype="float16")
    h_x, h_y, _ = half.fp_io(block1)
    assert h_x[0].dtype == torch.float16 and h_x[0].device.type == "cpu"
    assert torch.allclose(h_y[0].float(), y[0], rtol=1e-3, atol=1e-3)


# --- one unit ----------------------------------------------------------------------------------


def test_unit_loss_goes_down():
    model, plan, batches = quantized_vit()
    unit = plan.units[1]  # blocks.0.mlp
    q, x, y, args = unit_caches(model, plan, batches, unit)
    before = mean_error(unit, q, y)  # rounding to nearest, calibrated step sizes
    settings = ReconSettings(iters=50, batch_size=8, w_lr=1e-2, a_lr=1e-3, drop_prob=0.0)
    record = reconstruct_unit(unit, q, x, y, args, settings)
    assert isinstance(record, UnitRecord) and record.name == "blocks.0.mlp" and record.level == 0
    assert len(record.losses) == 50 and record.iters == 50
    assert (record.n_weight_quantizers, record.n_act_quantizers) == (2, 2)  # fc1, fc2
    first, last = sum(record.losses[:10]) / 10, sum(record.losses[-10:]) / 10
    assert last < 0.99 * first
    harden(model)
    after = mean_error(unit, q, y)
    assert after < 0.97 * before
    # the record's integer-weight errors: rounding to nearest before, learned rounding after
    assert record.hard_before == pytest.approx(before, rel=1e-5)
    assert record.hard_after == pytest.approx(after, rel=1e-5)
    assert not any(m.training for m in model.modules())  # the model stays in eval mode
    # only the MLP's rounding was learned: the block's MHSA layers are untouched
    assert unit.block.attn.qkv.weight_quantizer.alpha is None
    assert unit.block.mlp.fc1.weight_quantizer.alpha is not None


def test_pos_two_stage_learns_rounding_with_fp_activations_first():
    model, plan, batches = quantized_vit()
    unit = plan.units[1]  # blocks.0.mlp
    q, x, y, args = unit_caches(model, plan, batches, unit)
    acts = [unit.block.mlp.fc1.input_quantizer, unit.block.mlp.fc2.input_quantizer]
    scales = [a.scale.detach().clone() for a in acts]
    states = []  # the activation quantizers' state at every forward of the unit
    hook = unit.block.mlp.fc1.register_forward_pre_hook(lambda m, a: states.append(acts[0].state))
    settings = ReconSettings(iters=20, batch_size=8, w_lr=1e-2, a_lr=1e-3)
    # what POS "two_stage" gives a unit of 20 iterations (the settings' pos is not read here)
    record = reconstruct_unit(unit, q, x, y, args, settings, layer_recipe("two_stage", 20))
    hook.remove()
    # a probe forward and the integer-weight error on the 2 batches (quantized), then 10
    # iterations in FP, 10 quantized, and the integer-weight error again
    assert states == ["quant"] * 3 + ["fp"] * 10 + ["quant"] * 12
    assert all(a.state == "quant" for a in acts)
    # the weight-only stage cannot have a larger error than the fully quantized one after it
    assert sum(record.losses[:10]) < sum(record.losses[10:])
    # the step sizes moved only in the second stage, but they moved
    assert all(not torch.equal(a.scale, s) for a, s in zip(acts, scales))


def test_level_recipes_spread_one_budget_as_pos_says():
    units, _ = _fake_units([4])
    levels = list(FineToCoarseSchedule(units))  # 8 finest units, 4 blocks, 2 pairs, 1 group
    assert [len(u) for _, u in levels] == [8, 4, 2, 1]
    even = level_recipes(levels, "none", 7, 1600)
    assert {k: r.iters for k, r in even.items()} == {0: 50, 1: 100, 2: 200, 3: 400}
    assert sum(even[k].iters * len(u) for k, u in levels) == 1600  # every level gets 1600 / 4
    assert all(r.beta_span == (0.0, 1.0) and r.fp_act_iters == 0 for r in even.values())
    shrink = level_recipes(levels, "shrink", 7, 1500)
    assert {k: r.iters for k, r in shrink.items()} == {0: 100, 1: 100, 2: 100, 3: 100}
    assert {k: r.iters for k, r in level_recipes(levels, "none", 7, 3).items()} == dict.fromkeys(
        range(4), 1
    )
    anneal = level_recipes(levels, "anneal", 7, 1600)
    assert [anneal[k].beta_span for k in range(4)] == [
        (0, 0.25),
        (0.25, 0.5),
        (0.5, 0.75),
        (0.75, 1),
    ]
    two = level_recipes(levels, "two_stage", 7, 1600)
    assert [two[k].fp_act_iters for k in range(4)] == [25, 50, 100, 200]
    # no budget: every unit gets the per-unit iterations
    assert {r.iters for r in level_recipes(levels, "anneal", 7, None).values()} == {7}
    assert layer_recipe("two_stage", 9) == UnitRecipe(9, (0.0, 1.0), 4)
    assert layer_recipe("anneal", 9) == UnitRecipe(9)


def test_batches_of_different_sizes_and_fp16_caches():
    # pooled: same per-sample shape and extra args -> rows drawn across the cached batches
    same = [torch.arange(4.0).reshape(4, 1) + 10 * i for i in range(3)]
    pooled = CacheSampler(same, same, same, [(7,)] * 3, 5, torch.device("cpu"), torch.float32)
    q, x, y, args = pooled.draw(torch.Generator().manual_seed(0))
    assert pooled.pooled and q.shape == (5, 1) and args == (7,)
    assert torch.equal(q, x) and len(set(q.flatten().tolist())) == 5  # no row twice
    # detection-like: sizes differ -> one cached batch at a time, with its own extra args
    sizes = [torch.zeros(2, 3, 1), torch.ones(3, 5, 1)]
    per_batch = CacheSampler(
        sizes, sizes, sizes, [((3,),), ((5,),)], 8, torch.device("cpu"), torch.float32
    )
    seen = set()
    g = torch.Generator().manual_seed(0)
    for _ in range(10):
        q, _, _, (hw,) = per_batch.draw(g)
        assert q.shape[1] == hw[0]
        seen.add(hw[0])
    assert not per_batch.pooled and seen == {3, 5}
    # a ViT MLP unit learns from cached fp16 token sequences of two lengths
    model, plan, batches = quantized_vit()
    unit = plan.units[1]
    q, x, y, args = unit_caches(model, plan, batches, unit, cache_dtype="float16")
    q, x, y = [q[0], q[1][:, :9]], [x[0], x[1][:, :9]], [y[0], y[1][:, :9]]
    assert q[0].dtype == torch.float16
    with quantizer_states(model, weights=False, activations=False), torch.no_grad():
        y = [unit(t.float()).half() for t in x]
    record = reconstruct_unit(unit, q, x, y, args, ReconSettings(iters=10, batch_size=8))
    assert len(record.losses) == 10 and all(math.isfinite(v) for v in record.losses)


def test_harden_gives_integer_codes_and_soft_equals_hard_once_converged():
    model, plan, batches = quantized_vit()
    unit = plan.units[1]
    q, x, y, args = unit_caches(model, plan, batches, unit)
    reconstruct_unit(unit, q, x, y, args, ReconSettings(iters=5, batch_size=8))
    pairs = [(wq, layer) for wq, layer in weight_quantizers(unit) if wq.alpha is not None]
    assert len(pairs) == 2
    # converged rounding variables: h(V) is exactly 0 or 1 at |V| = 50
    with torch.no_grad():
        for wq, _ in pairs:
            wq.alpha.copy_(torch.where(wq.alpha >= 0, 50.0, -50.0))
            assert set(wq.soft_rounding().unique().tolist()) <= {0.0, 1.0}
        soft = [unit(t) for t in q]
        assert harden(model) == 2
        assert all(wq.rounding == "hard" for wq, _ in pairs)
        hard = [unit(t) for t in q]
    assert all(torch.equal(s, h) for s, h in zip(soft, hard))
    for wq, layer in pairs:
        codes = wq.integer_weight(layer.weight)
        assert torch.equal(codes, codes.round())
        assert codes.min() >= 0 and codes.max() <= 2**4 - 1
        shape = (-1, 1)
        expected = (codes - wq.zero_point.reshape(shape)) * wq.scale.reshape(shape)
        assert torch.equal(wq(layer.weight), expected)
    # layers never reconstructed keep rounding to nearest
    assert plan.units[0].block.attn.qkv.weight_quantizer.rounding == "nearest"


def test_strong_regularizer_drives_rounding_to_integers():
    model, plan, batches = quantized_vit()
    unit = plan.units[1]
    q, x, y, args = unit_caches(model, plan, batches, unit)
    settings = ReconSettings(iters=100, batch_size=8, w_lr=0.1, a_lr=1e-3, round_weight=1.0)
    record = reconstruct_unit(unit, q, x, y, args, settings)
    learned = [wq for wq, _ in weight_quantizers(unit) if wq.alpha is not None]
    h = torch.cat([wq.soft_rounding().flatten() for wq in learned])
    assert ((h == 0) | (h == 1)).float().mean() > 0.99
    with torch.no_grad():
        soft = unit(q[0])
        harden(unit)
        gap = reconstruction_loss(unit(q[0]), soft).item()
    assert gap < 0.1 * record.last_loss


def test_same_seed_same_parameters():
    model, plan, batches = quantized_vit()
    twins = [copy.deepcopy((model, plan.units)) for _ in range(3)]
    learned = []
    for i, (m, units) in enumerate(twins):
        unit = ComposedUnit("blocks.1", 1, units[2:4])
        source = ChainDataSource(m, units, batches)
        x, y, args = source.fp_io(unit)
        q = source.quant_input(unit)
        seed = 0 if i < 2 else 1
        settings = ReconSettings(iters=15, batch_size=8, w_lr=1e-2, a_lr=1e-3, seed=seed)
        reconstruct_unit(unit, q, x, y, args, settings)
        learned.append(
            {n: p.detach().clone() for n, p in unit.named_parameters() if n.endswith("alpha")}
            | {n: p.detach().clone() for n, p in unit.named_parameters() if n.endswith("scale")}
        )
    assert sum(n.endswith("alpha") for n in learned[0]) == 4  # qkv, proj, fc1, fc2
    assert all(torch.equal(learned[0][n], learned[1][n]) for n in learned[0])
    assert not all(torch.equal(learned[0][n], learned[2][n]) for n in learned[0])


def test_nan_loss_raises_and_leaves_the_unit_untouched():
    model, plan, batches = quantized_vit()
    unit = plan.units[3]  # blocks.1.mlp
    q, x, y, args = unit_caches(model, plan, batches, unit)
    before = copy.deepcopy(model.state_dict())
    grads = {n: p.requires_grad for n, p in model.named_parameters()}
    bad = [t.clone() for t in q]
    bad[0][0, 0, 0] = float("nan")
    bad[1][0, 0, 0] = float("nan")
    settings = ReconSettings(iters=20, batch_size=8, drop_prob=0.0)
    with pytest.raises(FloatingPointError, match=r"blocks\.1\.mlp"):
        reconstruct_unit(unit, bad, x, y, args, settings)
    assert same_state(model.state_dict(), before)  # no AdaRound variables added, nothing changed
    assert all(wq.alpha is None and wq.rounding == "nearest" for wq, _ in weight_quantizers(unit))
    assert {n: p.requires_grad for n, p in model.named_parameters()} == grads
    with quantizer_states(model, weights=False, activations=False):
        with pytest.raises(RuntimeError, match="nothing to learn"):
            reconstruct_unit(unit, q, x, y, args, settings)
    # a unit with learned variables keeps them when a later reconstruction fails
    reconstruct_unit(unit, q, x, y, args, settings)
    learned = copy.deepcopy(model.state_dict())
    with pytest.raises(FloatingPointError, match=r"blocks\.1\.mlp"):
        reconstruct_unit(unit, bad, x, y, args, settings)
    assert same_state(model.state_dict(), learned)
    assert [wq.rounding for wq, _ in weight_quantizers(unit) if wq.alpha is not None] == [
        "soft"
    ] * 2


def test_beta_decay_and_settings():
    s = ReconSettings()
    assert (s.iters, s.batch_size, s.w_lr, s.a_lr, s.round_weight, s.drop_prob) == (
        20000, 32, 1e-3, 4e-5, 0.01, 0.5
    )  # fmt: skip
    assert beta_at(0.0, s) == 20.0 and beta_at(1.0, s) == 2.0 and beta_at(0.5, s) == 11.0
    assert ReconSettings.from_dict(s.to_dict()) == s
    with pytest.raises(ValueError, match="pos must be one of"):
        ReconSettings(pos="never")
    with pytest.raises(KeyError, match="itres"):
        ReconSettings.from_dict({"itres": 5})


# --- the driver -------------------------------------------------------------------------------


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


def test_driver_walks_fine_to_coarse_frees_caches_and_spans_beta(monkeypatch, tmp_path):
    units, _ = _fake_units([3])
    schedule = FineToCoarseSchedule(units)
    spans = []

    def fake_reconstruct(unit, q, x, y, args, settings, recipe, progress=None):
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


def test_pfcr_run_on_vit_writes_log_and_plot_and_hardens(tmp_path):
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


def test_recon_imports_no_openmmlab_and_no_matplotlib():
    code = (
        "import sys, pfcr_mm.recon; "
        "bad = [m for m in sys.modules if m.split('.')[0] in "
        "('mmdet', 'mmcv', 'mmengine', 'matplotlib')]; print(bad); sys.exit(1 if bad else 0)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0, out.stdout + out.stderr
