"""The Progressive Optimization Strategy (POS): what each unit of a run is given, decided here.

The paper names POS without details (method.md section 4); ``ReconSettings.pos`` picks one of
the options below, and this module is the only place that reads it. It turns the levels of a run
and its iteration budget into one :class:`UnitRecipe` per level, which
:func:`pfcr_mm.recon.engine.reconstruct_unit` follows without knowing which strategy made it:

* ``"none"``: every level gets ``budget / L`` iterations (L levels), shared equally by its
  units; each unit runs its own temperature decay;
* ``"two_stage"`` (option (a)): as ``"none"``, but each unit spends the first half of its
  iterations with activations in floating point, learning only its weight rounding;
* ``"shrink"`` (option (b)): every unit of the run gets ``budget / units``, so the fine levels
  (many small units) take most of the budget;
* ``"anneal"`` (option (c), the default): as ``"none"``, but one temperature decay spans the
  whole run: the units of the i-th of L levels cover the decay from i/L to (i+1)/L.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

POS_STRATEGIES = ("none", "two_stage", "shrink", "anneal")


@dataclass(frozen=True)
class UnitRecipe:
    """How one unit is optimized.

    iters: optimizer steps.
    beta_span: the part ``(start, end)`` of the AdaRound temperature decay the unit covers
        (``(0, 1)``: the whole decay).
    fp_act_iters: the first iterations run with the unit's activation quantizers in floating
        point (only the weight rounding learns); 0: none.
    """

    iters: int
    beta_span: tuple[float, float] = (0.0, 1.0)
    fp_act_iters: int = 0


def _recipe(pos: str, iters: int, span: tuple[float, float] = (0.0, 1.0)) -> UnitRecipe:
    return UnitRecipe(iters, span, iters // 2 if pos == "two_stage" else 0)


def level_recipes(
    levels: Sequence[tuple[int, Sequence[object]]], pos: str, iters: int, budget: int | None
) -> dict[int, UnitRecipe]:
    """The recipe of every unit of each block level, finest first.

    levels: ``(level, units)`` pairs of the run.
    iters: the iterations of a unit when there is no budget to spread (``budget=None``).
    budget: the total iterations of the run, spread over levels and units; at least one each.
    """
    if pos not in POS_STRATEGIES:
        raise ValueError(f"POS must be one of {POS_STRATEGIES}, got {pos!r}")
    n_units = sum(len(units) for _, units in levels)
    recipes = {}
    for i, (k, units) in enumerate(levels):
        n = iters
        if budget is not None and pos == "shrink":
            n = max(1, round(budget / n_units))
        elif budget is not None:
            n = max(1, round(budget / (len(levels) * len(units))))
        span = (i / len(levels), (i + 1) / len(levels)) if pos == "anneal" else (0.0, 1.0)
        recipes[k] = _recipe(pos, n, span)
    return recipes


def layer_recipe(pos: str, iters: int) -> UnitRecipe:
    """The recipe of a single layer outside the blocks: ``iters`` iterations, its own decay."""
    return _recipe(pos, iters)
