"""The reconstruction plan: which unit is reconstructed when, and how (``docs/method.md``
sections 3-5).

:func:`build_plan` turns the quantized structure of a model (:class:`~pfcr_mm.adapters.QuantPlan`)
and the settings into the ordered list of :class:`ReconStep` (level, unit, recipe) that
:func:`pfcr_mm.recon.driver.run_plan` walks:

* ``block``: one level, every transformer block once; ``pfcr``: the levels of a
  :class:`~pfcr_mm.recon.units.FineToCoarseSchedule`, finest first, the budget of ``iters`` x
  blocks block-passes spread over them as POS says (:mod:`pfcr_mm.recon.pos`);
* the layers outside the blocks (``settings.non_block``) slotted in forward order: those before
  the first block first, a layer between two blocks (a Swin PatchMerging) just before the first
  unit holding the next block, the others (head, neck, RPN, RoI heads) after the last level.

A new schedule changes the plan, never the loop that runs it.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from ..adapters import QuantPlan, task_loss_of
from ..settings import ReconSettings, with_closest
from .pos import UnitRecipe, block_passes, layer_recipe, level_recipes
from .units import FineToCoarseSchedule, LayerUnit, leaves

OUTSIDE = -1  # the level of a unit outside the blocks


@dataclass(frozen=True)
class ReconStep:
    """One unit's reconstruction: its level (:data:`OUTSIDE` for a layer or part outside the
    blocks), the unit, and how it is optimized."""

    level: int
    unit: nn.Module
    recipe: UnitRecipe

    @property
    def name(self) -> str:
        return getattr(self.unit, "name", type(self.unit).__name__)


@dataclass
class ReconPlan:
    """The ordered steps of a run and what decided them.

    budget: block-passes (or steps) spread over the block levels; ``None``: ``iters`` each.
    recipes: the recipe of each block level.
    layer_units: unit outside the blocks -> the quantized layers it holds.
    calib_only: quantized layers outside the blocks left calibrated only -> why.
    """

    steps: list[ReconStep]
    settings: ReconSettings
    budget: float | None = None
    recipes: dict[int, UnitRecipe] = field(default_factory=dict)
    schedule: dict | None = None
    layer_units: dict[str, list[str]] = field(default_factory=dict)
    calib_only: dict[str, str] = field(default_factory=dict)

    @property
    def levels_run(self) -> list[int]:
        return list(self.recipes)

    def describe(self) -> dict:
        """The plan as plain values, for the loss log."""
        return {
            "settings": self.settings.to_dict(),
            "budget": self.budget,
            "budget_unit": self.settings.budget_unit,
            "iters_per_unit": (
                {k: r.iters for k, r in self.recipes.items()} if self.budget is not None else None
            ),
            "levels_run": self.levels_run,
            "layer_units": [s.name for s in self.steps if s.level == OUTSIDE],
            "schedule": self.schedule,
        }


def order_steps(
    levels: Iterable[tuple[int, Sequence[nn.Module]]],
    settings: ReconSettings,
    budget: float | None = None,
    before: Sequence[nn.Module] = (),
    between: Sequence[tuple[nn.Module, nn.Module]] = (),
    after: Sequence[nn.Module] = (),
) -> tuple[list[ReconStep], dict[int, UnitRecipe]]:
    """The steps of ``levels`` (``(level, units)`` pairs, finest first) with the units outside
    the blocks slotted in; and the recipe of each level.

    budget: the total cost of the block levels (``settings.budget_unit``); ``None``:
        ``settings.iters`` for every unit.
    before / after: units reconstructed before the first level and after the last one.
    between: ``(unit, block)`` pairs: ``unit`` goes just before the first unit holding
        ``block``. Units outside the blocks get ``settings.outside_iters`` (default
        ``settings.iters``) each, outside the budget.
    """
    levels = [(k, list(units)) for k, units in levels]
    cost = (lambda u: 1) if settings.budget_unit == "steps" else block_passes
    recipes = level_recipes(levels, settings.pos, settings.iters, budget, cost)
    outside = OutsideSteps(settings)
    steps = [outside.step(u) for u in before]
    pending = list(between)
    for k, units in levels:
        for unit in units:
            holds = {id(leaf.block) for leaf in leaves(unit)}
            steps += [outside.step(lu) for lu, block in pending if id(block) in holds]
            pending = [(lu, block) for lu, block in pending if id(block) not in holds]
            steps.append(ReconStep(k, unit, recipes[k]))
    if pending:
        raise ValueError(f"no unit holds the block after layer {pending[0][0].name!r}")
    steps += [outside.step(u) for u in after]
    outside.check_named(steps)
    return steps, recipes


class OutsideSteps:
    """The recipe of each unit outside the blocks: ``settings.outside_iters`` steps (one number
    for all, or by unit name), else ``settings.iters``; outside the block budget."""

    def __init__(self, settings: ReconSettings):
        self.settings = settings
        per = settings.outside_iters
        self.by_name = per if isinstance(per, dict) else {}
        self.all = settings.iters if isinstance(per, dict) else per or settings.iters

    def step(self, unit: nn.Module) -> ReconStep:
        iters = self.by_name.get(getattr(unit, "name", None), self.all)
        return ReconStep(OUTSIDE, unit, layer_recipe(self.settings.pos, iters))

    def check_named(self, steps: list[ReconStep]) -> None:
        """Raise ValueError if ``outside_iters`` names a unit the plan does not have."""
        names = [s.name for s in steps if s.level == OUTSIDE]
        unknown = sorted(set(self.by_name) - set(names))
        if unknown:
            raise ValueError(
                f"recon.outside_iters names {with_closest(unknown[0], names)}, not a unit "
                f"outside the blocks of this run; they are: {names or 'none (non_block=calib?)'}"
            )


def build_plan(
    model: nn.Module,
    quant_plan: QuantPlan,
    method: str,
    settings: ReconSettings,
    run_batch: Callable[[nn.Module, Any], Any],
    batch: Any,
) -> ReconPlan:
    """The plan of a ``block`` or ``pfcr`` run on the calibrated ``model``; ``run_batch`` on
    ``batch`` shows which layers outside the blocks the reconstruction forward reaches."""
    if method == "block":
        schedule, budget = FineToCoarseSchedule.block(quant_plan.units), None
    else:
        schedule = FineToCoarseSchedule(quant_plan.units, max_level=settings.max_level)
        budget = settings.iters * len(schedule.blocks)
    outside = OutsideUnits(quant_plan, settings)
    if settings.non_block != "calib":
        outside.collect(_layers_reached(model, quant_plan, run_batch, batch))
    steps, recipes = order_steps(
        schedule, settings, budget, outside.before, outside.between, outside.after
    )
    return ReconPlan(
        steps,
        settings,
        budget,
        recipes,
        schedule.describe(),
        {s.name: outside.layers_of(s.unit.layer) for s in steps if s.level == OUTSIDE},
        outside.calib_only,
    )


class OutsideUnits:
    """The units of the quantized layers outside the blocks, in forward order.

    ``non_block="layerwise"``: a unit per layer; ``"parts"``: a unit per part of
    ``plan.parts`` (a detector's neck, RPN head, RoI box and mask heads) for the layers inside
    one, a unit per layer for the others; ``"calib"``: none (every layer calibrated only).
    """

    def __init__(self, plan: QuantPlan, settings: ReconSettings):
        self.plan, self.settings = plan, settings
        self.before: list[LayerUnit] = []
        self.between: list[tuple[LayerUnit, nn.Module]] = []  # (unit, the block it precedes)
        self.after: list[LayerUnit] = []
        self.calib_only = {name: "non_block='calib'" for name, _, _ in plan.layers}

    def collect(self, reached: Counter) -> None:
        """Make the units of the layers the reconstruction forward reaches (``reached``: calls
        per forward, by layer ``id``)."""
        part_of = {}
        if self.settings.non_block == "parts":
            part_of = {id(m): part for part in self.plan.parts for m in part[1].modules()}
        blocks = list(dict.fromkeys(u.block for u in self.plan.units))  # in forward order
        self.calib_only, seen = {}, set()
        for name, layer, next_block in self.plan.layers:
            why = self._why_calib_only(layer, reached, part_of)
            if why:
                self.calib_only[name] = why
                continue
            unit = self._unit(name, layer, part_of, seen)
            if unit is None:
                continue
            if next_block is None:
                self.after.append(unit)
            elif next_block == 0:
                self.before.append(unit)
            else:
                self.between.append((unit, blocks[next_block]))

    @staticmethod
    def _why_calib_only(layer: nn.Module, reached: Counter, part_of: dict) -> str | None:
        if id(layer) not in reached:
            return "the reconstruction forward does not reach it"
        if id(layer) not in part_of and reached[id(layer)] > 1:
            return (
                f"called {reached[id(layer)]} times per forward (shared, e.g. across FPN levels): "
                "a unit of its own would see the first call only; non_block='parts' "
                "reconstructs it within its part"
            )
        return None

    def _unit(self, name: str, layer: nn.Module, part_of: dict, seen: set) -> LayerUnit | None:
        """The unit of ``layer``: its own, or its part's (``None`` when the part has one)."""
        if id(layer) not in part_of:
            return LayerUnit(name, layer)
        name, part, per_roi = part_of[id(layer)]
        if name in seen:
            return None
        seen.add(name)
        rows = self.settings.roi_batch_size if per_roi else None
        task = task_loss_of(part) if self.settings.part_loss == "task" else None
        return LayerUnit(name, part, channels_first=True, rows_per_step=rows, task_loss=task)

    def layers_of(self, module: nn.Module) -> list[str]:
        """The names of the plan's layers outside the blocks that ``module`` is or holds."""
        inside = {id(m) for m in module.modules()}
        return [name for name, layer, _ in self.plan.layers if id(layer) in inside]


def _layers_reached(model: nn.Module, plan: QuantPlan, run_batch, batch) -> Counter:
    """How many times one reconstruction forward calls each of the plan's layers outside the
    blocks, by ``id``."""
    called: Counter = Counter()

    def count(module: nn.Module, args: tuple) -> None:
        called[id(module)] += 1

    hooks = [layer.register_forward_pre_hook(count) for _, layer, _ in plan.layers]
    try:
        with torch.no_grad():
            run_batch(model, batch)
    finally:
        for h in hooks:
            h.remove()
    return called
