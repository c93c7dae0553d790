"""The collectives of a distributed run (an initialized ``torch.distributed`` default group);
without one, every helper here is the single-process identity."""

from __future__ import annotations

import itertools
from collections.abc import Callable
from typing import Any

import torch.distributed as dist
from torch import nn

from .tree import to_device


def distributed_world() -> tuple[int, int]:
    """``(rank, world size)`` of the initialized default process group, ``(0, 1)`` without."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def raise_if_any_failed(failure: BaseException | None, what: str) -> None:
    """Collective over all processes: raise in every one of them if ``failure`` is set in any,
    so that no process waits for one that stopped."""
    statuses = [None] * distributed_world()[1]
    dist.all_gather_object(statuses, None if failure is None else repr(failure))
    failed = [(rank, s) for rank, s in enumerate(statuses) if s is not None]
    if failure is not None:
        raise failure
    if failed:
        rank, message = failed[0]
        raise RuntimeError(f"{what} failed in process {rank}: {message}")


def gathered(obj: Any) -> list:
    """``[obj]`` of every process (``[obj]`` alone outside ``torch.distributed``)."""
    _, world = distributed_world()
    if world == 1:
        return [obj]
    parts = [None] * world
    dist.all_gather_object(parts, obj)
    return parts


def on_rank0_with_all_batches(
    model: nn.Module, batches: list, fn: Callable[[list], tuple], what: str
) -> tuple:
    """``fn(all batches)`` run once, on rank 0, changing ``model``; every process returns its
    result and ends with rank 0's model state.

    Each process holds its share of the batches: batch ``i`` of the whole list is batch
    ``i // W`` of rank ``i % W``; rank 0 gathers them back in order. A failure on rank 0 is
    raised in every process. Outside ``torch.distributed``: ``fn(batches)``.
    """
    rank, world = distributed_world()
    if world == 1:
        return fn(batches)
    # Collectives carry CPU objects: a CUDA tensor would come back on the sender's device.
    shares = [None] * world if rank == 0 else None
    dist.gather_object(to_device(batches, "cpu"), shares, dst=0)
    done: list = [None, None]
    failure = None
    if rank == 0:
        whole = [b for group in itertools.zip_longest(*shares) for b in group if b is not None]
        try:
            result = fn(to_device(whole, next(model.parameters()).device))
            done = [to_device(model.state_dict(), "cpu"), result]
        except Exception as err:
            failure = err
    raise_if_any_failed(failure, what)
    dist.broadcast_object_list(done, src=0)
    if rank != 0:
        model.load_state_dict(done[0])
    return done[1]
