"""Progressive optimization strategies (pfcr_mm/recon/pos.py): how one iteration budget and
the temperature decay are spread over the levels."""

import pytest
from torch import nn

from pfcr_mm.recon import (
    OUTSIDE,
    FineToCoarseSchedule,
    UnitRecipe,
    layer_recipe,
    level_recipes,
    order_steps,
)
from pfcr_mm.recon.pos import block_passes
from pfcr_mm.settings import ReconSettings


def test_level_recipes_spread_one_budget_as_pos_says(fake_units):
    units, _ = fake_units([4])
    levels = list(FineToCoarseSchedule(units))  # 8 finest units, 4 blocks, 2 pairs, 1 group
    assert [len(u) for _, u in levels] == [8, 4, 2, 1]
    assert [block_passes(u[0]) for _, u in levels] == [0.5, 1, 2, 4]
    # 1600 block-passes over 4 levels: 400 each, and every level covers the 4 blocks once
    even = level_recipes(levels, "none", 7, 1600)
    assert {k: r.iters for k, r in even.items()} == {0: 100, 1: 100, 2: 100, 3: 100}
    for k, u in levels:
        assert even[k].iters * sum(block_passes(x) for x in u) == 400
    assert all(r.beta_span == (0.0, 1.0) and r.fp_act_iters == 0 for r in even.values())
    # counted in optimizer steps (the earlier equal-steps mode): coarse units get more steps
    steps = level_recipes(levels, "none", 7, 1600, cost=lambda u: 1)
    assert {k: r.iters for k, r in steps.items()} == {0: 50, 1: 100, 2: 200, 3: 400}
    # shrink: every one of the 15 units gets 100 block-passes, so fine units get more steps
    shrink = level_recipes(levels, "shrink", 7, 1500)
    assert {k: r.iters for k, r in shrink.items()} == {0: 200, 1: 100, 2: 50, 3: 25}
    shrink_steps = level_recipes(levels, "shrink", 7, 1500, cost=lambda u: 1)
    assert {k: r.iters for k, r in shrink_steps.items()} == dict.fromkeys(range(4), 100)
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
    assert [two[k].fp_act_iters for k in range(4)] == [50, 50, 50, 50]
    # no budget: every unit gets the per-unit iterations
    assert {r.iters for r in level_recipes(levels, "anneal", 7, None).values()} == {7}
    assert layer_recipe("two_stage", 9) == UnitRecipe(9, (0.0, 1.0), 4)
    assert layer_recipe("anneal", 9) == UnitRecipe(9)


def test_units_outside_the_blocks_get_outside_iters(fake_units):
    units, _ = fake_units([2])
    levels = list(FineToCoarseSchedule(units, max_level=1))
    stem, head = nn.Linear(2, 2), nn.Linear(2, 2)

    def iters(settings):
        steps, _ = order_steps(levels, settings, 1000, before=[stem], after=[head])
        return [(s.level, s.recipe.iters) for s in steps]

    # the block budget is spread as before; each unit outside the blocks gets iters, or
    # outside_iters when set
    blocks = [(0, 250)] * 4 + [(1, 250)] * 2
    assert iters(ReconSettings(iters=500)) == [(OUTSIDE, 500), *blocks, (OUTSIDE, 500)]
    assert iters(ReconSettings(iters=500, outside_iters=30)) == [
        (OUTSIDE, 30),
        *blocks,
        (OUTSIDE, 30),
    ]
    # by unit name: the units it does not name get iters
    stem.name, head.name = "stem", "roi_head.bbox_head"
    by_name = ReconSettings(iters=500, outside_iters={"roi_head": {"bbox_head": 900}})
    assert iters(by_name) == [(OUTSIDE, 500), *blocks, (OUTSIDE, 900)]
    with pytest.raises(ValueError, match=r"names 'roi_head.bbox' \(did you mean 'roi_head.bbox"):
        iters(ReconSettings(iters=500, outside_iters={"roi_head.bbox": 900}))
