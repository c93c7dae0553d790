"""MMEngine integration (the only layer that imports mmengine / mmdet / mmcv)."""

from . import classification, hooks  # noqa: F401  (register the pfcr.* types)
from .registry import DATASETS, HOOKS, METRICS, MODELS

__all__ = ["DATASETS", "HOOKS", "METRICS", "MODELS"]
