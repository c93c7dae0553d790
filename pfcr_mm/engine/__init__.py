"""MMEngine integration (the only layer that imports mmengine / mmdet / mmcv)."""

from . import classification, hooks, loop  # noqa: F401  (register the pfcr.* types)
from .registry import DATASETS, HOOKS, LOOPS, METRICS, MODELS

__all__ = ["DATASETS", "HOOKS", "LOOPS", "METRICS", "MODELS"]
