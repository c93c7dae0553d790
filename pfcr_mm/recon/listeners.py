"""What happens around each step of a reconstruction run besides the optimization itself:
progress lines, memory records, the loss log and plot, resume checkpoints. The driver calls
every listener's hooks in order, as MMEngine's loops call hooks; each hook is optional."""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from pathlib import Path

from .plan import ReconPlan, ReconStep
from .report import peak_memory_mb, plot_losses, write_loss_log
from .unit import UnitRecord

LOG_NAME = "recon_log.json"
PLOT_NAME = "recon_loss.png"


class ReconListener:
    """The hooks of a run; ``k`` is the 1-based index of a step in the plan."""

    def before_run(self, plan: ReconPlan, done: Sequence[UnitRecord]) -> None: ...

    def before_unit(self, k: int, step: ReconStep) -> None: ...

    def after_caches(self, k: int, step: ReconStep) -> None: ...

    def on_iteration(self, k: int, step: ReconStep, it: int, loss: float) -> None: ...

    def after_unit(self, k: int, step: ReconStep, records: list[UnitRecord]) -> None: ...

    def on_failure(self, step: ReconStep, records: list[UnitRecord]) -> None: ...

    def after_run(self, records: list[UnitRecord], hardened: int | None) -> None: ...


class ProgressPrinter(ReconListener):
    """``(k/N) unit, level, loss first -> last, integer weights before -> after (seconds)``."""

    def __init__(self, print_fn: Callable[[str], None] = print):
        self.print = print_fn

    def before_run(self, plan: ReconPlan, done: Sequence[UnitRecord]) -> None:
        self.total = len(plan.steps)
        if done:
            self.print(f"resuming after unit {len(done)}/{self.total} {done[-1].name}")

    def on_iteration(self, k: int, step: ReconStep, it: int, loss: float) -> None:
        self.print(
            f"  ({k}/{self.total}) {step.name} iter {it}/{step.recipe.iters} loss {loss:.4g}"
        )

    def after_unit(self, k: int, step: ReconStep, records: list[UnitRecord]) -> None:
        r = records[-1]
        self.print(
            f"({k}/{self.total}) {r.name}, level {r.level}, loss {r.first_loss:.4g} -> "
            f"{r.last_loss:.4g}, integer weights {r.hard_before:.4g} -> "
            f"{r.hard_after:.4g} ({r.seconds:.1f}s)"
        )

    def after_run(self, records: list[UnitRecord], hardened: int | None) -> None:
        if hardened is not None:
            self.print(f"hardened the rounding of {hardened} weight quantizer(s)")


class MemoryRecorder(ReconListener):
    """Each record's process memory peaks and, given a :class:`~pfcr_mm.recon.cache.CacheStore`,
    the bytes of the unit's caches in memory and on disk (held: the unit's caches; peak: also
    the fronts moving to them)."""

    def __init__(self, cache=None):
        self.cache = cache

    def before_unit(self, k: int, step: ReconStep) -> None:
        if self.cache is not None:
            self.cache.reset_peaks()

    def after_caches(self, k: int, step: ReconStep) -> None:
        if self.cache is not None:
            self.held = {"memory": self.cache.memory, "disk": self.cache.disk}

    def after_unit(self, k: int, step: ReconStep, records: list[UnitRecord]) -> None:
        records[-1].peak_mem_mb = peak_memory_mb()
        if self.cache is not None:
            peak = {"peak_memory": self.cache.peak_memory, "peak_disk": self.cache.peak_disk}
            records[-1].cache_bytes = {**self.held, **peak}


class LossLog(ReconListener):
    """``recon_log.json`` in ``log_dir``, rewritten after every unit (a crash keeps what was
    done, and a failure says where it stopped), and ``recon_loss.png`` at the end."""

    def __init__(self, log_dir: str | Path, cache=None):
        self.dir, self.cache = Path(log_dir), cache

    def before_run(self, plan: ReconPlan, done: Sequence[UnitRecord]) -> None:
        self.dir.mkdir(parents=True, exist_ok=True)
        self.meta = plan.describe()
        if done:
            self.meta["resumed_after"] = len(done)
        self.start = time.perf_counter()

    def _write(self, records: list[UnitRecord], **extra) -> None:
        if self.cache is not None and records:
            self.meta["cache"] = self.cache.stats()
        seconds = time.perf_counter() - self.start
        write_loss_log(self.dir / LOG_NAME, records, {**self.meta, "seconds": seconds, **extra})

    def after_unit(self, k: int, step: ReconStep, records: list[UnitRecord]) -> None:
        self._write(records)

    def on_failure(self, step: ReconStep, records: list[UnitRecord]) -> None:
        self._write(records, failed=step.name)

    def after_run(self, records: list[UnitRecord], hardened: int | None) -> None:
        self._write(records, finished=True)
        if records:
            plot_losses(records, self.dir / PLOT_NAME)


class ResumeCheckpoint(ReconListener):
    """``save(records so far)`` after every unit: what a resumed run continues from."""

    def __init__(self, save: Callable[[list[UnitRecord]], None]):
        self.save = save

    def after_unit(self, k: int, step: ReconStep, records: list[UnitRecord]) -> None:
        self.save(records)
