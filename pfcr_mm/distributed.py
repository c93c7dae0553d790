"""The collectives of a distributed run (an initialized ``torch.distributed`` default group);
without one, every helper here is the single-process identity.

While rank 0 works alone (:func:`on_rank0_with_all_batches`: hours of reconstruction at
paper-grade budgets), the others wait for it outside any collective of the default group, whose
timeout is minutes: each process counts up a heartbeat in the group's store every few seconds,
and one whose heartbeat stops for the group's timeout, or whose connection closes, stops the
run in every other process with :class:`PeerLost`.
"""

from __future__ import annotations

import datetime
import itertools
import threading
import time
from collections.abc import Callable, Iterable
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.modules.module import register_module_forward_pre_hook

from .tree import to_device

_WAITS = itertools.count()  # the waits for rank 0 of this process, as every process counts them
_BEAT_SECONDS = 5.0  # the most seconds between two heartbeats (a tenth of the timeout if less)
# The group that carries rank 0's status holds a receive open for as long as rank 0 works: the
# heartbeats, not this timeout, end a wait for a process that stopped.
_STATUS_TIMEOUT = datetime.timedelta(days=30)


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
    raised in every process; a process that stops meanwhile (no heartbeat for the group's
    timeout, or its connection closed) raises :class:`PeerLost` in every other one, rank 0
    stopping ``fn`` at its next module forward. Outside ``torch.distributed``: ``fn(batches)``.
    """
    rank, world = distributed_world()
    if world == 1:
        return fn(batches)
    # Collectives carry CPU objects: a CUDA tensor would come back on the sender's device.
    shares = [None] * world if rank == 0 else None
    dist.gather_object(to_device(batches, "cpu"), shares, dst=0)
    done, failure = [None, None], None
    heartbeats = _Heartbeats.of_default_group(rank, range(1, world) if rank == 0 else [0])
    group = dist.new_group(backend="gloo", timeout=_STATUS_TIMEOUT)
    if rank == 0:
        whole = [b for share in itertools.zip_longest(*shares) for b in share if b is not None]
        device = next(model.parameters()).device

        def work() -> list:
            result = fn(to_device(whole, device))
            return [to_device(model.state_dict(), "cpu"), result]

        done, failure, lost = _work_alone(work, heartbeats)
        lost = _send_status(group, world, lost)
    else:
        lost = _wait_for_rank0(group, heartbeats)
    if lost is not None:  # rank 0's own failure first (a SIGTERM), else the process lost
        raise failure or lost
    dist.destroy_process_group(group)
    raise_if_any_failed(failure, what)
    dist.broadcast_object_list(done, src=0)
    if rank != 0:
        model.load_state_dict(done[0])
    return done[1]


class PeerLost(RuntimeError):
    """Process ``rank`` of the group stopped: it sent no heartbeat for ``seconds`` (dead, killed,
    hung or out of reach), or its connection closed (``seconds`` is ``None``)."""

    def __init__(self, rank: int, seconds: float | None = None):
        self.rank, self.seconds = rank, seconds
        if seconds is None:
            super().__init__(f"process {rank} closed its connection: dead or killed")
        else:
            super().__init__(
                f"process {rank} sent no heartbeat for {seconds:.0f} s: dead, killed or hung"
            )


class _Heartbeats:
    """Liveness through a store while rank 0 works alone. Inside ``with``, a daemon thread counts
    up process ``rank``'s counter every ``interval`` seconds and reads those of the ``watched``
    processes; one whose counter has not moved for ``timeout`` seconds is :meth:`silent`, timed
    on this process's clock (the machines' clocks need not agree; a store that stopped answering,
    its holder hung, leaves every counter still). ``lost``: the first silent one the thread saw.
    """

    def __init__(
        self, store: dist.Store, key: str, rank: int, watched: Iterable[int], timeout: float
    ):
        self.store, self.key, self.rank, self.timeout = store, key, rank, timeout
        self.interval = min(_BEAT_SECONDS, timeout / 10)
        start = time.monotonic()
        self.seen = {r: (0, start) for r in watched}  # rank -> (counter, when it last moved)
        self.lost: PeerLost | None = None
        self._stop = threading.Event()

    @classmethod
    def of_default_group(cls, rank: int, watched: Iterable[int]) -> _Heartbeats:
        """Counters of the next wait in the default group's store, its timeout the group's."""
        store = dist.distributed_c10d._get_default_store()
        key = f"pfcr_mm/wait_for_rank0/{next(_WAITS)}"
        return cls(store, key, rank, watched, store.timeout.total_seconds())

    def __enter__(self) -> _Heartbeats:
        threading.Thread(target=self._run, name="pfcr-heartbeat", daemon=True).start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()  # not joined: it may wait on a store that no longer answers

    def _run(self) -> None:
        try:
            while True:
                self.store.add(f"{self.key}/{self.rank}", 1)
                for rank, (count, _) in list(self.seen.items()):
                    current = self.store.add(f"{self.key}/{rank}", 0)  # 0 before its first beat
                    if current != count:
                        self.seen[rank] = (current, time.monotonic())
                self.lost = self.lost or self.silent()
                if self._stop.wait(self.interval):
                    return
        except dist.DistError:  # the store is gone with the process that held it
            return

    def silent(self) -> PeerLost | None:
        """The first watched process whose counter has not moved for the timeout, if any."""
        now = time.monotonic()
        for rank, (_, since) in self.seen.items():
            if now - since > self.timeout:
                return PeerLost(rank, now - since)
        return None


def _work_alone(
    work: Callable[[], Any], heartbeats: _Heartbeats
) -> tuple[Any, Exception | None, PeerLost | None]:
    """``work()`` on rank 0 while ``heartbeats`` beat for it and watch the others; once one is
    silent, the next forward of any module (every step of a reconstruction runs some) raises, so
    that ``work`` stops where it is and unwinds as on any error. Its result or failure, and the
    process that stopped, if any."""

    def check(module: nn.Module, args: tuple) -> None:
        if heartbeats.lost is not None:
            raise heartbeats.lost

    result = failure = None
    hook = register_module_forward_pre_hook(check)
    with heartbeats:
        try:
            result = work()
        except Exception as err:  # raised in every process once the others heard the status
            failure = err
        finally:
            hook.remove()
    return result, failure, heartbeats.lost


def _send_status(group, world: int, lost: PeerLost | None) -> PeerLost | None:
    """Rank 0's status, sent on ``group`` to every other process still there: ``(-1, -1)``
    once it is done, else the rank that stopped and its silent seconds (-1: its connection
    closed).
    The process that stopped, if any (one that can no longer be sent to, too)."""
    seconds = -1.0 if lost is None or lost.seconds is None else lost.seconds
    status = torch.tensor([-1.0 if lost is None else lost.rank, seconds])
    for rank in range(1, world):
        if lost is not None and rank == lost.rank:
            continue
        try:
            dist.send(status, dst=rank, group=group)
        except RuntimeError:
            lost = lost or PeerLost(rank)
    return lost


def _wait_for_rank0(group, heartbeats: _Heartbeats) -> PeerLost | None:
    """Beat until rank 0's status arrives on ``group`` (a daemon thread receives it, so that a
    closed connection is seen at once); the process that stopped, or ``None`` once rank 0 is
    done."""
    status, received, closed = torch.zeros(2), threading.Event(), []

    def receive() -> None:
        try:
            dist.recv(status, src=0, group=group)
        except RuntimeError:  # rank 0's connection closed
            closed.append(True)
        received.set()

    threading.Thread(target=receive, name="pfcr-rank0-status", daemon=True).start()
    with heartbeats:
        while not received.wait(heartbeats.interval):
            silent = heartbeats.silent()
            if silent is not None:
                return silent
    lost_rank, seconds = status.tolist()
    if closed:
        return PeerLost(0)
    return None if lost_rank < 0 else PeerLost(int(lost_rank), None if seconds < 0 else seconds)
