"""The PFCR run: reconstruct every unit of every level, fine to coarse (method.md sections 3-5).

For each level (finest first) and each of its units in forward order:

1. take the unit's FP inputs, FP targets and extra arguments, and its quantized-path inputs
   (computed with every preceding unit as it was just learned), from a :class:`UnitDataSource`;
2. reconstruct the unit (:func:`reconstruct_unit`), starting from the rounding variables and
   step sizes the previous level left;
3. free the caches, print ``(k/N) unit, level, loss`` and rewrite the loss log.

At the end every learned rounding is hardened. The same driver runs the baselines: a
``FineToCoarseSchedule.block`` schedule is the single-granularity (QDrop/BRECQ-like) one.

A run continues where an earlier one stopped given the records of its finished units (``done``)
and a model holding their learned state: every unit's seeds are its own (``unit_seed``) and the
data source recomputes the caches from the model, so the rest of the run is the same.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path

from torch import nn

from .data import UnitDataSource
from .engine import ReconSettings, UnitRecord, harden, reconstruct_unit
from .pos import block_passes, layer_recipe, level_recipes
from .report import peak_memory_mb, plot_losses, write_loss_log
from .units import FineToCoarseSchedule, leaves

LOG_NAME = "recon_log.json"
PLOT_NAME = "recon_loss.png"


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
    """Reconstruct the units of ``schedule`` level by level; returns one record per unit.

    schedule: a :class:`FineToCoarseSchedule`, or ``(level, units)`` pairs, finest first.
    source: gives each unit's caches (:class:`~pfcr_mm.recon.data.ChainDataSource` for a model
        and calibration batches).
    log_dir: where ``recon_log.json`` (rewritten after every unit, so a crash keeps what was
        done) and ``recon_loss.png`` go; ``None`` writes nothing.
    harden_at_end: fix every learned rounding to integers after the last unit.
    budget: the total cost of the run, in block-passes or steps (``settings.budget_unit``),
        spread over the levels and units as ``settings.pos`` says (:mod:`pfcr_mm.recon.pos`,
        the only place POS is read); ``None``: ``settings.iters`` for every unit.

    layers_before / layers_after: units of single layers outside the blocks
        (:class:`~pfcr_mm.recon.units.LayerUnit`, level -1) reconstructed before the first
        level (the layers before the first block) and after the last one (the others), with
        ``settings.iters`` iterations each, outside the budget of the blocks; a detector's
        neck and heads are such units too (a whole part each, see ``QuantPlan.parts``).
    layers_between: ``(layer unit, block)`` pairs: a layer between two blocks (a Swin
        PatchMerging reduction, with the first block of the next stage), reconstructed in
        forward order within the first level, just before the first unit holding that block
        (the next stage then learns from the reconstructed layer); ``settings.iters``
        iterations each, outside the budget.
    done: the records of the first units of the run, reconstructed in an earlier session whose
        learned state the model holds: those units are skipped (their names must match).
    on_unit_done: called with the records so far after each unit (a resume checkpoint).
    """
    levels = [(k, list(units)) for k, units in schedule]
    steps = settings.budget_unit == "steps"
    recipes = level_recipes(
        levels, settings.pos, settings.iters, budget, (lambda u: 1) if steps else block_passes
    )
    layer = layer_recipe(settings.pos, settings.iters)
    # (level, unit, recipe) in the order they are reconstructed
    plan = [(-1, u, layer) for u in layers_before]
    between = list(layers_between)
    for k, units in levels:
        for unit in units:
            if between:
                holds = {id(leaf.block) for leaf in leaves(unit)}
                plan += [(-1, lu, layer) for lu, block in between if id(block) in holds]
                between = [(lu, block) for lu, block in between if id(block) not in holds]
            plan.append((k, unit, recipes[k]))
    if between:
        raise ValueError(f"no unit holds the block after layer {between[0][0].name!r}")
    plan += [(-1, u, layer) for u in layers_after]
    total = len(plan)
    log_dir = Path(log_dir) if log_dir is not None else None
    if log_dir is not None:
        log_dir.mkdir(parents=True, exist_ok=True)
    meta = {
        "settings": settings.to_dict(),
        "budget": budget,
        "budget_unit": settings.budget_unit,
        "iters_per_unit": {k: r.iters for k, r in recipes.items()} if budget is not None else None,
        "levels_run": [k for k, _ in levels],
        "layer_units": [u.name for level, u, _ in plan if level == -1],
        "schedule": schedule.describe() if isinstance(schedule, FineToCoarseSchedule) else None,
    }
    records = list(done)
    finished = [_name(u) for _, u, _ in plan[: len(records)]]
    if [r.name for r in records] != finished:
        raise ValueError(
            f"the {len(records)} finished unit(s) {[r.name for r in records][:4]} are not the "
            f"first units of this run's plan {[_name(u) for _, u, _ in plan][:4]}"
        )
    if records:
        meta["resumed_after"] = len(records)
        print_fn(f"resuming after unit {len(records)}/{total} {records[-1].name}")
    cache = getattr(source, "cache", None)  # a CacheStore counting the cached bytes, if any
    start = time.perf_counter()
    for k, (level, unit, recipe) in enumerate(plan[len(records) :], start=len(records) + 1):
        name = _name(unit)
        if cache is not None:
            cache.reset_peaks()
        cache_start = time.perf_counter()
        fp_inputs, fp_targets, extra_args = source.fp_io(unit)
        q_inputs = source.quant_input(unit)
        weights = None
        if settings.downstream_weight > 0:
            probes, seed = settings.downstream_probes, settings.seed
            weights = source.output_weights(unit, fp_targets, probes, seed)
        cache_seconds = time.perf_counter() - cache_start
        held = None if cache is None else {"memory": cache.memory, "disk": cache.disk}

        def progress(it: int, loss: float, k=k, name=name, n=recipe.iters) -> None:
            print_fn(f"  ({k}/{total}) {name} iter {it}/{n} loss {loss:.4g}")

        try:
            record = reconstruct_unit(
                unit,
                q_inputs,
                fp_inputs,
                fp_targets,
                extra_args,
                settings,
                recipe,
                progress=progress,
                output_weights=weights,
            )
        except BaseException:
            if log_dir is not None:  # keep what was done, and say where it stopped
                seconds = time.perf_counter() - start
                write_loss_log(
                    log_dir / LOG_NAME, records, {**meta, "seconds": seconds, "failed": name}
                )
            raise
        finally:
            # The caches of a unit are dead once it is done (or failed): drop the last
            # references now, before the next unit's caches are built.
            del fp_inputs, fp_targets, extra_args, q_inputs, weights
        record.level = level
        record.peak_mem_mb = peak_memory_mb()
        record.cache_seconds = cache_seconds
        if cache is not None:  # held: the unit's caches; peak: also the fronts moving to them
            peak = {"peak_memory": cache.peak_memory, "peak_disk": cache.peak_disk}
            record.cache_bytes = {**held, **peak}
            meta["cache"] = cache.stats()
        record.block_passes = record.iters * block_passes(unit)
        records.append(record)
        print_fn(
            f"({k}/{total}) {name}, level {level}, loss {record.first_loss:.4g} -> "
            f"{record.last_loss:.4g}, integer weights {record.hard_before:.4g} -> "
            f"{record.hard_after:.4g} ({record.seconds:.1f}s)"
        )
        if log_dir is not None:
            write_loss_log(
                log_dir / LOG_NAME, records, {**meta, "seconds": time.perf_counter() - start}
            )
        if on_unit_done is not None:
            on_unit_done(records)
    if harden_at_end:
        n = harden(u for _, u, _ in plan)
        print_fn(f"hardened the rounding of {n} weight quantizer(s)")
    if log_dir is not None:
        write_loss_log(
            log_dir / LOG_NAME,
            records,
            {**meta, "seconds": time.perf_counter() - start, "finished": True},
        )
        if records:
            plot_losses(records, log_dir / PLOT_NAME)
    return records


def _name(unit: nn.Module) -> str:
    return getattr(unit, "name", type(unit).__name__)


def load_loss_log(path: str | Path) -> dict:
    """Read a ``recon_log.json`` back."""
    return json.loads(Path(path).read_text())
