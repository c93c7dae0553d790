"""The loss log of a reconstruction run: a JSON file and a plot of loss per unit and level."""

from __future__ import annotations

import json
import resource
from collections.abc import Sequence
from pathlib import Path

import torch

from ..atomic import atomic_path
from .unit import UnitRecord

# Points kept per unit curve in the JSON log: 20k iterations x ~50 units stays a small file.
CURVE_POINTS = 200


def loss_curve(losses: Sequence[float], points: int = CURVE_POINTS) -> dict[str, list]:
    """The loss curve reduced to at most ``points`` window means: ``{"iter": [...], "loss": [...]}``
    where ``iter`` is the last iteration (1-based) of each window."""
    n = len(losses)
    if n == 0:
        return {"iter": [], "loss": []}
    step = max(1, -(-n // points))  # ceil(n / points)
    iters, means = [], []
    for start in range(0, n, step):
        window = losses[start : start + step]
        iters.append(start + len(window))
        means.append(sum(window) / len(window))
    return {"iter": iters, "loss": means}


def peak_memory_mb() -> dict:
    """Peak host RSS of the process and, on CUDA, peak allocated device memory, in MiB."""
    out = {"host_rss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}
    if torch.cuda.is_available():
        out["cuda_allocated"] = torch.cuda.max_memory_allocated() / 2**20
    return out


def write_loss_log(path: str | Path, records: Sequence[UnitRecord], meta: dict) -> Path:
    """Write ``meta`` and, per unit, its summary and reduced loss curve as JSON."""
    path = Path(path)
    units = [
        {
            "name": r.name,
            "level": r.level,
            "iters": r.iters,
            "first_loss": r.first_loss,
            "last_loss": r.last_loss,
            "hard_before": r.hard_before,
            "hard_after": r.hard_after,
            "seconds": round(r.seconds, 3),
            "peak_mem_mb": r.peak_mem_mb,
            "cache_bytes": r.cache_bytes,
            "weight_quantizers": r.n_weight_quantizers,
            "act_quantizers": r.n_act_quantizers,
            "curve": loss_curve(r.losses),
        }
        for r in records
    ]
    with atomic_path(path) as tmp:  # a reader never sees a half-written log
        tmp.write_text(json.dumps({**meta, "units": units}, indent=1))
    return path


def plot_losses(records: Sequence[UnitRecord], path: str | Path) -> Path:
    """Two panels: every unit's loss curve along the run, coloured by level; and each unit's
    first and last loss, per level, in unit order."""
    # The object API with the Agg canvas: no pyplot, so no global backend is switched.
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    path = Path(path)
    levels = sorted({r.level for r in records})
    cmap = {lv: f"C{i % 10}" for i, lv in enumerate(levels)}
    fig = Figure(figsize=(11, 7), layout="constrained")
    FigureCanvasAgg(fig)
    run_ax, unit_ax = fig.subplots(2, 1)

    offset = 0
    labelled: set[int] = set()
    for r in records:
        curve = loss_curve(r.losses)
        label = f"level {r.level}" if r.level not in labelled else None
        labelled.add(r.level)
        xs = [offset + i for i in curve["iter"]]
        run_ax.plot(xs, curve["loss"], color=cmap[r.level], lw=1, label=label)
        offset += r.iters
    run_ax.set_yscale("log")
    run_ax.set_xlabel("iteration (units in run order)")
    run_ax.set_ylabel("reconstruction loss")
    run_ax.set_title("loss per unit along the run")
    run_ax.legend(fontsize=8)

    for lv in levels:
        rs = [r for r in records if r.level == lv]
        xs = range(len(rs))
        unit_ax.plot(xs, [r.first_loss for r in rs], ":", color=cmap[lv], marker=".")
        last = [r.last_loss for r in rs]
        unit_ax.plot(xs, last, "-", color=cmap[lv], marker="o", label=f"level {lv} (dotted: first)")
    unit_ax.set_yscale("log")
    unit_ax.set_xlabel("unit index within its level (forward order)")
    unit_ax.set_ylabel("loss")
    unit_ax.set_title("first and last loss per unit and level")
    unit_ax.legend(fontsize=8)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=110)
    return path
