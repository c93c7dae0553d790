"""Reconstruction: units and levels, unit caches, the per-unit optimization, the PFCR driver.

Pure torch (matplotlib is imported only when a plot is written)::

    plan = prepare_calibrated(model, QuantConfig(w_bits=4, a_bits=4), forward_loop)
    schedule = FineToCoarseSchedule(plan.units)            # or FineToCoarseSchedule.block(...)
    settings = ReconSettings(iters=2000, cache_dtype="float16")
    source = ChainDataSource(model, plan.units, calib_batches, cache_dtype=settings.cache_dtype)
    run_reconstruction(schedule, source, settings, log_dir="work/recon")
"""

from .data import ChainDataSource, UnitDataSource
from .driver import load_loss_log, run_reconstruction
from .engine import ReconSettings, UnitRecord, beta_at, harden, reconstruct_unit
from .pos import POS_STRATEGIES, UnitRecipe, layer_recipe, level_recipes
from .report import peak_memory_mb
from .units import (
    ComposedUnit,
    FineToCoarseSchedule,
    LayerUnit,
    leaves,
    stage_of_container,
    unit_level,
)

__all__ = [
    "ChainDataSource",
    "ComposedUnit",
    "FineToCoarseSchedule",
    "LayerUnit",
    "POS_STRATEGIES",
    "ReconSettings",
    "UnitDataSource",
    "UnitRecipe",
    "UnitRecord",
    "beta_at",
    "harden",
    "layer_recipe",
    "level_recipes",
    "leaves",
    "load_loss_log",
    "peak_memory_mb",
    "reconstruct_unit",
    "run_reconstruction",
    "stage_of_container",
    "unit_level",
]
