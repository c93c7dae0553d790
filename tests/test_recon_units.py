"""Reconstruction units and levels (pfcr_mm/recon/units.py): composed units reproduce the
blocks, and the fine-to-coarse levels cover every block once, within stages."""

import pytest
import torch

from pfcr_mm.adapters import prepare
from pfcr_mm.quant.calibrate import quantizer_states
from pfcr_mm.recon import FineToCoarseSchedule, leaves
from pfcr_mm.settings import QuantConfig


def test_composed_units_reproduce_blocks_exactly_in_fp(quantized_vit):
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


def test_vit_levels_cover_every_block_once(tiny_timm_vit):
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
    with pytest.raises(ValueError, match="max_level=9 is above this model's top level 3"):
        FineToCoarseSchedule(plan.units, max_level=9)


def test_swin_like_levels_stay_within_stages_with_odd_counts(fake_units):
    units, blocks = fake_units([3, 5])
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


def test_real_swin_default_stages(tiny_timm_swin):
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
