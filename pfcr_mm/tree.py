"""Trees of tensors: a tensor, or tuples, lists and dicts of them nested (a detector part's
maps per level, a head's scores and box deltas, MMEngine data batches)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch


def flat_tensors(obj) -> list[torch.Tensor]:
    """The leaves of a (nested) tuple or list, in order."""
    if isinstance(obj, (tuple, list)):
        return [t for part in obj for t in flat_tensors(part)]
    return [obj]


def map_tensors(fn: Callable, *objs):
    """``fn`` applied to the leaves at the same place of ``objs`` (tensors, or tuples and lists
    of them nested alike), in the structure of ``objs[0]``."""
    first = objs[0]
    if isinstance(first, (tuple, list)):
        if any(not isinstance(o, (tuple, list)) or len(o) != len(first) for o in objs[1:]):
            raise ValueError("map_tensors: the nested structures differ")
        return type(first)(map_tensors(fn, *parts) for parts in zip(*objs))
    return fn(*objs)


def to_device(obj: Any, device: torch.device | str) -> Any:
    """``obj`` with every tensor (in lists, tuples, dicts, or objects with ``.to``, such as
    MMEngine data samples) on ``device``."""
    if isinstance(obj, dict):
        return type(obj)({k: to_device(v, device) for k, v in obj.items()})
    if isinstance(obj, (list, tuple)):
        return type(obj)(to_device(v, device) for v in obj)
    to = getattr(obj, "to", None)
    return to(device) if callable(to) else obj
