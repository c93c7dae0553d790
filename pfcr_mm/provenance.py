"""Where a result came from, for the files that record it: the machine (:func:`machine_record`),
the package versions (:func:`package_versions`) and file digests (:func:`file_sha256`); and the
writers of those files (:func:`write_json`, :func:`write_benchmark`), whole or not at all.

Pure Python: it reads ``/proc/cpuinfo`` and the installed distributions' metadata and imports
none of the packages it reports on, so any layer can use it.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import json
import os
import platform
from pathlib import Path

from pfcr_mm.atomic import atomic_path

# the packages that decide a quantized model and its evaluation
PACKAGES = ("torch", "torchvision", "timm", "mmengine", "mmcv", "mmdet", "pfcr_mm")


def _cpuinfo(field: str) -> str | None:
    """The value of the first ``field`` line of ``/proc/cpuinfo``; ``None`` off Linux."""
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        return None
    for line in lines:
        key, _, value = line.partition(":")
        if key.strip() == field:
            return value.strip()
    return None


def cpu_model() -> str:
    """The CPU's model name (``AMD EPYC ...``), else the processor or machine type."""
    return _cpuinfo("model name") or platform.processor() or platform.machine()


def cpu_flags() -> list[str]:
    """The CPU's SIMD flags, which decide the integer kernels onnxruntime runs (``avx*``,
    ``amx*``, ``*vnni*``), sorted; empty off Linux."""
    flags = (_cpuinfo("flags") or "").split()
    return sorted(f for f in flags if f.startswith(("avx", "amx")) or "vnni" in f)


def machine_record() -> dict:
    """The machine a measurement ran on: processor type, CPU model, core count, SIMD flags,
    operating system and Python version."""
    return {
        "processor": platform.processor() or platform.machine(),
        "cpu": cpu_model(),
        "cpu_count": os.cpu_count(),
        "cpu_flags": cpu_flags(),
        "os": platform.platform(),
        "python": platform.python_version(),
    }


def package_versions(packages: tuple[str, ...] = PACKAGES) -> dict[str, str | None]:
    """``python`` and the installed version of each distribution in ``packages`` (``None``: not
    installed), read from the distributions' metadata without importing them."""
    out: dict[str, str | None] = {"python": platform.python_version()}
    for name in packages:
        try:
            out[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            out[name] = None
    return out


def file_sha256(path: str | Path) -> str:
    """The SHA-256 of a file's bytes, in hex."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):  # large checkpoints: 1 MiB at a time
            digest.update(chunk)
    return digest.hexdigest()


def write_json(path: str | Path, data: dict, indent: int = 1) -> None:
    """Write ``data`` as JSON to ``path``, whole or not at all; values JSON has no type for
    (paths, config objects) are written as their ``str``."""
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(data, indent=indent, default=str) + "\n")


def write_benchmark(out_dir: str | Path, data: dict, markdown: str, stem: str = "benchmark") -> str:
    """Write a benchmark's results ``data`` to ``<out_dir>/<stem>.json`` and the table made
    from them, ``markdown``, to ``<out_dir>/<stem>.md`` (the folder made if missing), each
    whole or not at all; returns the line to print: what was written, and which earlier files
    of those names it replaced."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    json_path, md_path = out_dir / f"{stem}.json", out_dir / f"{stem}.md"
    replaced = [p.name for p in (json_path, md_path) if p.exists()]
    write_json(json_path, data)
    with atomic_path(md_path) as tmp:
        tmp.write_text(markdown)
    note = f" (replaced the earlier {' and '.join(replaced)})" if replaced else ""
    return f"wrote {json_path} and {md_path}{note}"
