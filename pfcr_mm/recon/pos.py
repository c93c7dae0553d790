"""The Progressive Optimization Strategy (POS): what each unit of a run is given, decided here.

The paper names POS without details (``docs/method.md`` section 4); ``ReconSettings.pos`` picks
one of the options below, and this module is the only place that reads it. It turns the levels
of a run and its budget into one :class:`UnitRecipe` per level, which
:func:`pfcr_mm.recon.unit.reconstruct_unit` follows without knowing which strategy made it.

The budget is counted in *block-passes* (``ReconSettings.budget_unit="block_passes"``, the
default): one transformer block's forward and backward over one batch. An optimizer step of a
unit costs its :func:`block_passes` (an MHSA or an MLP half a block, a group of n blocks n), so
a level, which covers every block once, costs ``steps per unit x number of blocks``, and a
``pfcr`` run given the budget ``iters x blocks`` costs what ``block`` costs at ``iters`` steps
per block, whatever its levels. ``budget_unit="steps"`` counts optimizer steps instead, as
before (a coarse step then costs as much as the blocks it holds: on the demo ViT such a run
costs 2.7x ``block``).

* ``"none"``: every level gets ``budget / L`` (L levels), shared equally by its units; each
  unit runs its own temperature decay;
* ``"two_stage"`` (option (a)): as ``"none"``, but each unit spends the first half of its
  iterations with activations in floating point, learning only its weight rounding;
* ``"shrink"`` (option (b)): every unit of the run gets ``budget / units``, so the fine levels
  (many small units) take most of the budget;
* ``"anneal"`` (option (c), the default): as ``"none"``, but one temperature decay spans the
  whole run: the units of the i-th of L levels cover the decay from i/L to (i+1)/L.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

from torch import nn

from ..settings import POS_STRATEGIES
from .units import LayerUnit, leaves


def block_passes(unit: nn.Module) -> float:
    """What one optimizer step of ``unit`` costs, in block forward+backward passes: half a block
    per finest unit (MHSA or MLP) it holds. A single layer outside the blocks
    (:class:`~pfcr_mm.recon.units.LayerUnit`) counts 0: it is outside the block budget."""
    return 0.0 if isinstance(unit, LayerUnit) else len(leaves(unit)) / 2


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
    levels: Sequence[tuple[int, Sequence[nn.Module]]],
    pos: str,
    iters: int,
    budget: float | None,
    cost: Callable[[nn.Module], float] = block_passes,
) -> dict[int, UnitRecipe]:
    """The recipe of every unit of each block level, finest first.

    levels: ``(level, units)`` pairs of the run.
    iters: the iterations of a unit when there is no budget to spread (``budget=None``).
    budget: the total cost of the run, spread over levels and units; at least one step each.
    cost: the cost of one step of a unit in the budget's unit: :func:`block_passes`, or
        ``lambda unit: 1`` to count optimizer steps.
    """
    if pos not in POS_STRATEGIES:
        raise ValueError(f"POS must be one of {POS_STRATEGIES}, got {pos!r}")
    n_units = sum(len(units) for _, units in levels)
    recipes = {}
    for i, (k, units) in enumerate(levels):
        n = iters
        level_cost = sum(cost(u) for u in units)  # one step of every unit of the level
        # the level's share of the budget: equal per level, or (shrink) equal per unit
        share = len(units) / n_units if pos == "shrink" else 1 / len(levels)
        if budget is not None:
            n = max(1, round(budget * share / level_cost))
        span = (i / len(levels), (i + 1) / len(levels)) if pos == "anneal" else (0.0, 1.0)
        recipes[k] = _recipe(pos, n, span)
    return recipes


def layer_recipe(pos: str, iters: int) -> UnitRecipe:
    """The recipe of a single layer outside the blocks: ``iters`` iterations, its own decay."""
    return _recipe(pos, iters)
