"""MMEngine integration (the only layer that imports mmengine / mmdet / mmcv)."""

from . import classification  # noqa: F401  (registers the pfcr.* classification types)
from .registry import DATASETS, METRICS, MODELS

__all__ = ["DATASETS", "METRICS", "MODELS"]
