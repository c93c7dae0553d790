"""Reconstruction: units and levels, the plan, unit caches, one unit's optimization, the run.

Pure torch (matplotlib is imported only when a plot is written)::

    quant_plan = prepare_calibrated(model, QuantConfig(w_bits=4, a_bits=4), forward_loop)
    settings = ReconSettings(iters=2000, cache_dtype="float16")
    plan = build_plan(model, quant_plan, "pfcr", settings, run_batch, calib_batches[0])
    source = ChainDataSource(model, quant_plan.units, calib_batches)
    run_plan(plan, source, default_listeners(source, log_dir="work/recon"))
"""

from ..settings import POS_STRATEGIES, ReconSettings
from .data import ChainDataSource, UnitDataSource
from .driver import default_listeners, load_loss_log, run_plan, run_reconstruction, unit_caches
from .listeners import LossLog, MemoryRecorder, ProgressPrinter, ReconListener, ResumeCheckpoint
from .loss import ReconLoss, beta_at, reconstruction_loss
from .plan import OUTSIDE, ReconPlan, ReconStep, build_plan, order_steps
from .pos import UnitRecipe, layer_recipe, level_recipes
from .report import peak_memory_mb
from .sampling import UnitCaches
from .unit import UnitRecord, harden, reconstruct_unit
from .units import (
    ComposedUnit,
    FineToCoarseSchedule,
    LayerUnit,
    leaves,
    stage_of_container,
    unit_level,
)

__all__ = [
    "OUTSIDE",
    "POS_STRATEGIES",
    "ChainDataSource",
    "ComposedUnit",
    "FineToCoarseSchedule",
    "LayerUnit",
    "LossLog",
    "MemoryRecorder",
    "ProgressPrinter",
    "ReconListener",
    "ReconLoss",
    "ReconPlan",
    "ReconSettings",
    "ReconStep",
    "ResumeCheckpoint",
    "UnitCaches",
    "UnitDataSource",
    "UnitRecipe",
    "UnitRecord",
    "beta_at",
    "build_plan",
    "default_listeners",
    "harden",
    "layer_recipe",
    "leaves",
    "level_recipes",
    "load_loss_log",
    "order_steps",
    "peak_memory_mb",
    "reconstruct_unit",
    "reconstruction_loss",
    "run_plan",
    "run_reconstruction",
    "stage_of_container",
    "unit_caches",
    "unit_level",
]
