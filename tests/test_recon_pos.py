"""Progressive optimization strategies (pfcr_mm/recon/pos.py): how one iteration budget and
the temperature decay are spread over the levels."""

from pfcr_mm.recon import FineToCoarseSchedule, UnitRecipe, layer_recipe, level_recipes


def test_level_recipes_spread_one_budget_as_pos_says(fake_units):
    units, _ = fake_units([4])
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
