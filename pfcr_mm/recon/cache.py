"""Where the reconstruction caches live: host memory up to a limit, memory-mapped files beyond.

A unit's caches (FP inputs, quantized-path inputs, FP targets, output weights: one tensor per
calibration batch) reach tens of GB on COCO (256 images at 800x1333). :class:`CacheStore`
counts the bytes of every cached tensor it holds in memory; a tensor that would take the count
over ``limit_bytes`` is written to a file in ``folder`` instead and handed out as a read-only
memory map of it (``torch.from_file``): the same bytes, so a step drawn from it is bit-identical
to one drawn from memory; the kernel pages it in as the sampler reads it, and may drop those
pages again under memory pressure (they are file-backed, not anonymous memory).

Each file is unlinked as soon as it is mapped: its disk space is released when the last
reference to the tensor goes (the unit's caches are freed), and nothing is left behind whatever
way the process ends (an exception, a kill, running out of memory). The folder itself is removed
by :meth:`CacheStore.close`. A tensor leaves the counts when it is garbage-collected.
"""

from __future__ import annotations

import shutil
import tempfile
import time
import weakref
from pathlib import Path

import torch

GB = 10**9  # CacheSettings.limit_gb counts decimal gigabytes


class CacheStore:
    """Holds cached tensors in memory up to ``limit_bytes``, the rest in memory-mapped files.

    limit_bytes: the most bytes of cached tensors held in memory at once; ``None``: no limit
        (nothing is written to disk).
    folder: where the spill folder is made (``pfcr_cache_*``, on the first spill); ``None``:
        the system's temporary folder.
    device / dtype: of the cached tensors (``ReconSettings.cache_dtype``); a spilled tensor is
        on the CPU whatever ``device`` says.

    Counters (bytes): ``memory`` and ``disk`` now, ``peak_memory`` and ``peak_disk`` since the
    store was made or :meth:`reset_peaks`; ``max_memory`` and ``max_disk`` over the whole run.
    ``spilled``: tensors written to disk; ``spill_seconds``: time spent writing and mapping them.
    """

    def __init__(
        self,
        limit_bytes: int | None = None,
        folder: str | Path | None = None,
        device: str | torch.device = "cpu",
        dtype: torch.dtype = torch.float32,
    ):
        if limit_bytes is not None and limit_bytes < 0:
            raise ValueError(f"CacheStore: limit_bytes must be >= 0 or None, got {limit_bytes}")
        self.limit_bytes = limit_bytes
        self.parent = Path(folder) if folder is not None else None
        self.device, self.dtype = torch.device(device), dtype
        self.folder: Path | None = None  # made on the first spill
        self.memory = self.disk = 0
        self.peak_memory = self.peak_disk = self.max_memory = self.max_disk = 0
        self.spilled = 0
        self.spill_seconds = 0.0

    def store(self, t: torch.Tensor) -> torch.Tensor:
        """``t`` detached, in the cache's dtype and device, held in memory or spilled to disk."""
        t = t.detach().to(self.device, self.dtype)
        nbytes = t.numel() * t.element_size()
        if self.limit_bytes is not None and nbytes > 0 and self.memory + nbytes > self.limit_bytes:
            t = self._spill(t)
            self._count("disk", nbytes, t)
        else:
            self._count("memory", nbytes, t)
        return t

    def _count(self, where: str, nbytes: int, t: torch.Tensor) -> None:
        setattr(self, where, getattr(self, where) + nbytes)
        self.peak_memory = max(self.peak_memory, self.memory)
        self.peak_disk = max(self.peak_disk, self.disk)
        self.max_memory = max(self.max_memory, self.memory)
        self.max_disk = max(self.max_disk, self.disk)
        weakref.finalize(t, self._release, where, nbytes)

    def _release(self, where: str, nbytes: int) -> None:
        setattr(self, where, getattr(self, where) - nbytes)

    def _spill(self, t: torch.Tensor) -> torch.Tensor:
        start = time.perf_counter()
        if self.folder is None:
            if self.parent is not None:
                self.parent.mkdir(parents=True, exist_ok=True)
            self.folder = Path(tempfile.mkdtemp(prefix="pfcr_cache_", dir=self.parent))
        path = self.folder / f"{self.spilled}.bin"
        flat = t.contiguous().cpu().reshape(-1)
        with open(path, "wb") as f:
            flat.view(torch.uint8).numpy().tofile(f)
        # a private mapping: pages come from the file; the file's name can go at once
        mapped = torch.from_file(str(path), shared=False, size=flat.numel(), dtype=flat.dtype)
        path.unlink()
        self.spilled += 1
        self.spill_seconds += time.perf_counter() - start
        return mapped.view(t.shape)

    def reset_peaks(self) -> None:
        """Start the ``peak_*`` counters again from the bytes held now."""
        self.peak_memory, self.peak_disk = self.memory, self.disk

    def stats(self) -> dict:
        """The counters as plain JSON values (bytes, seconds)."""
        return {
            "limit_bytes": self.limit_bytes,
            "max_memory_bytes": self.max_memory,
            "max_disk_bytes": self.max_disk,
            "spilled_tensors": self.spilled,
            "spill_seconds": round(self.spill_seconds, 3),
        }

    def close(self) -> None:
        """Remove the spill folder (its files are already unlinked; tensors still referenced
        stay readable until they are freed)."""
        if self.folder is not None:
            shutil.rmtree(self.folder, ignore_errors=True)
            self.folder = None
