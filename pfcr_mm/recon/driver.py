"""The reconstruction run: walk the plan's steps, fine to coarse (``docs/method.md``
sections 3-5).

For each :class:`~pfcr_mm.recon.plan.ReconStep` in order:

1. take the unit's caches (FP inputs, FP targets, extra arguments, and the quantized-path inputs
   computed with every preceding unit as it was just learned) from a :class:`UnitDataSource`;
2. reconstruct the unit (:func:`~pfcr_mm.recon.unit.reconstruct_unit`), starting from the
   rounding variables and step sizes the previous level left;
3. free the caches and call the listeners (:mod:`pfcr_mm.recon.listeners`).

At the end every learned rounding is hardened. The same loop runs the baselines: only the plan
differs. A run continues where an earlier one stopped given the records of its finished units
(``done``) and a model holding their learned state: every unit's seeds are its own and the data
source recomputes the caches from the model, so the rest of the run is the same.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path

from torch import nn

from ..settings import ReconSettings
from .data import UnitDataSource
from .listeners import LossLog, MemoryRecorder, ProgressPrinter, ReconListener, ResumeCheckpoint
from .plan import ReconPlan, order_steps
from .pos import block_passes
from .sampling import UnitCaches
from .unit import UnitRecord, harden, reconstruct_unit
from .units import FineToCoarseSchedule


def run_plan(
    plan: ReconPlan,
    source: UnitDataSource,
    listeners: Sequence[ReconListener] = (),
    done: Sequence[UnitRecord] = (),
    harden_at_end: bool = True,
) -> list[UnitRecord]:
    """Reconstruct the units of ``plan`` in order; returns one record per unit.

    done: the records of the first steps, reconstructed in an earlier session whose learned
        state the model holds: those steps are skipped (their names must match).
    harden_at_end: fix every learned rounding to integers after the last unit.
    """
    records = list(done)
    finished = [s.name for s in plan.steps[: len(records)]]
    if [r.name for r in records] != finished:
        raise ValueError(
            f"the {len(records)} finished unit(s) {[r.name for r in records][:4]} are not the "
            f"first units of this run's plan {[s.name for s in plan.steps][:4]}"
        )
    _call(listeners, "before_run", plan, records)
    for k, step in enumerate(plan.steps[len(records) :], start=len(records) + 1):
        _call(listeners, "before_unit", k, step)
        start = time.perf_counter()
        caches = unit_caches(source, step.unit, plan.settings, step.level)
        cache_seconds = time.perf_counter() - start
        _call(listeners, "after_caches", k, step)

        def progress(it: int, loss: float, k=k, step=step) -> None:
            _call(listeners, "on_iteration", k, step, it, loss)

        try:
            record = reconstruct_unit(step.unit, caches, plan.settings, step.recipe, progress)
        except BaseException:
            _call(listeners, "on_failure", step, records)
            raise
        finally:
            # A unit's caches are dead once it is done (or failed): drop the last reference
            # now, before the next unit's caches are built.
            del caches
        record.level, record.cache_seconds = step.level, cache_seconds
        record.block_passes = record.iters * block_passes(step.unit)
        records.append(record)
        _call(listeners, "after_unit", k, step, records)
    hardened = harden(s.unit for s in plan.steps) if harden_at_end else None
    _call(listeners, "after_run", records, hardened)
    return records


def unit_caches(
    source: UnitDataSource, unit: nn.Module, settings: ReconSettings, level: int = 0
) -> UnitCaches:
    """The caches of ``unit`` (a unit of ``level``) from ``source``, with the output weights of
    the output-aware term when it is on at that level."""
    fp_inputs, fp_targets, extra_args = source.fp_io(unit)
    q_inputs = source.quant_input(unit)
    weights = None
    if settings.downstream_weight > 0 and level >= settings.downstream_min_level:
        weights = source.output_weights(
            unit,
            fp_targets,
            settings.downstream_probes,
            settings.seed,
            settings.downstream_metric,
            settings.downstream_temperature,
        )
    return UnitCaches(q_inputs, fp_inputs, fp_targets, extra_args, weights)


def _call(listeners: Sequence[ReconListener], hook: str, *args) -> None:
    for listener in listeners:
        getattr(listener, hook)(*args)


def default_listeners(
    source: UnitDataSource,
    log_dir: str | Path | None = None,
    print_fn: Callable[[str], None] = print,
    on_unit_done: Callable[[list[UnitRecord]], None] | None = None,
) -> list[ReconListener]:
    """Memory records, progress lines, the loss log in ``log_dir`` (``None``: none) and a resume
    checkpoint ``on_unit_done(records so far)`` (``None``: none), in that order."""
    cache = getattr(source, "cache", None)  # a CacheStore counting the cached bytes, if any
    listeners = [MemoryRecorder(cache), ProgressPrinter(print_fn)]
    if log_dir is not None:
        listeners.append(LossLog(log_dir, cache))
    if on_unit_done is not None:
        listeners.append(ResumeCheckpoint(on_unit_done))
    return listeners


def run_reconstruction(
    schedule: FineToCoarseSchedule | Iterable[tuple[int, Sequence[nn.Module]]],
    source: UnitDataSource,
    settings: ReconSettings,
    log_dir: str | Path | None = None,
    print_fn: Callable[[str], None] = print,
    harden_at_end: bool = True,
    budget: float | None = None,
    layers_before: Sequence[nn.Module] = (),
    layers_after: Sequence[nn.Module] = (),
    layers_between: Sequence[tuple[nn.Module, nn.Module]] = (),
    done: Sequence[UnitRecord] = (),
    on_unit_done: Callable[[list[UnitRecord]], None] | None = None,
) -> list[UnitRecord]:
    """:func:`run_plan` on the steps of a schedule (``(level, units)`` pairs, finest first) with
    units outside the blocks (:func:`~pfcr_mm.recon.plan.order_steps`) and the default
    listeners: for a schedule built by hand; ``pfcr_mm.quantize`` builds the whole plan with
    :func:`~pfcr_mm.recon.plan.build_plan`."""
    steps, recipes = order_steps(
        schedule, settings, budget, layers_before, layers_between, layers_after
    )
    described = schedule.describe() if isinstance(schedule, FineToCoarseSchedule) else None
    plan = ReconPlan(steps, settings, budget, recipes, described)
    listeners = default_listeners(source, log_dir, print_fn, on_unit_done)
    return run_plan(plan, source, listeners, done, harden_at_end)


def load_loss_log(path: str | Path) -> dict:
    """Read a ``recon_log.json`` back."""
    return json.loads(Path(path).read_text())
