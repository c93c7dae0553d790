"""Memory of the reconstruction caches at COCO resolution, measured on the demo detector.

Runs ``tools/ptq.py`` (``pfcr``, the whole detector: ``scope="all"``, neck and heads as units,
fp16 caches, batch 1, as ``configs/_base_/ptq_coco.py``) with the calibration images resized to
``--size`` (default 800x1333, ``keep_ratio=False``: every image at COCO's largest test shape,
padded to 800x1344, so stage 1 has 200x336 tokens), ``--iters`` steps per unit (the caches do
not depend on it), on two models:

* ``demo``: the committed demo detector (Swin widths 32/64/128, FPN 64, RPN 300 proposals per
  image at test time);
* ``swin_t_width``: the demo's depth (3 stages of 2 blocks) at Swin-T Mask R-CNN's widths
  (96/192/384, heads 3/6/12, FPN and RoI features 256, box head fc 1024, 4-conv mask head, RPN
  1000 proposals per image), randomly initialised (cache sizes do not depend on the weights),
  with ``rcnn.score_thr=0`` so the mask head gets mmdet's cap of 100 detections per image
  (a trained model gives at most that). Swin-T's first three stages have exactly these unit
  inputs; its fourth stage (768 channels on 25x42 tokens) is 8x smaller than its first.

each without a limit and with ``recon.cache.limit_gb`` set to ``--limit-fraction`` of the peak
measured without one (forcing spills). Each run is a ``tools/ptq.py`` process whose
``/proc/<pid>/status`` is sampled every 0.1 s (peak ``VmRSS``, anonymous ``RssAnon``,
file-backed ``RssFile``: pages of memory-mapped spill files count here, and the kernel may drop
them; ``VmHWM`` as of the last sample; the wall time from the process's start to its exit) and
which records the ``CacheStore`` counters (bytes of cached tensors in memory and on disk: per
unit in the recon log, the run's maximum in ``ptq_results.json``). The per-unit bytes are
extrapolated linearly to ``--coco-images`` (256) images: every cached tensor holds one image's
rows.

Writes ``<out>/benchmark.json`` and ``<out>/benchmark.md``; work folders under ``<out>/runs``
(deleted unless ``--keep``).

    python tools/benchmarks/benchmark_cache.py [--images 8] [--models demo swin_t_width]
        [--iters 2] [--size 800 1333] [--limit-fraction 0.25] [--out benchmarks/cache]

About 10 minutes on one CPU core with the defaults.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

from pfcr_mm.benchmark_tables import cache_table
from pfcr_mm.engine.run_dir import last_run_dir
from pfcr_mm.provenance import cpu_model, package_versions, write_benchmark

ROOT = Path(__file__).resolve().parents[2]
TITLE = "# Reconstruction caches at COCO resolution (tools/benchmarks/benchmark_cache.py)\n\n"
BASE_CONFIG = ROOT / "configs/demo/demo_mask_rcnn_swin_shapes_w4a4.py"

# Swin-T Mask R-CNN's widths on the demo's depth (mmdet::swin/mask-rcnn_swin-t-p4-w7_fpn_1x_coco)
SWIN_T_WIDTH = """
load_from = None
allow_random_init = True  # the cache sizes do not depend on the weights
model = dict(
    backbone=dict(embed_dims=96, num_heads=[3, 6, 12]),
    neck=dict(in_channels=[96, 192, 384], out_channels=256),
    rpn_head=dict(in_channels=256, feat_channels=256),
    roi_head=dict(
        bbox_roi_extractor=dict(out_channels=256),
        bbox_head=dict(in_channels=256, fc_out_channels=1024),
        mask_roi_extractor=dict(out_channels=256),
        mask_head=dict(num_convs=4, in_channels=256, conv_out_channels=256),
    ),
    test_cfg=dict(rpn=dict(nms_pre=1000, max_per_img=1000), rcnn=dict(score_thr=0.0)),
)
"""
MODELS = {"demo": "", "swin_t_width": SWIN_T_WIDTH}


def write_config(
    path: Path, model: str, images: int, size: tuple[int, int], iters: int, limit_gb: float | None
) -> Path:
    """A config on top of the demo detector's: calibration pipeline at ``size`` (h, w)."""
    h, w = size
    text = f"""_base_ = [{str(BASE_CONFIG)!r}]
{MODELS[model]}
calib_pipeline = [
    dict(type="LoadImageFromFile"),
    dict(type="Resize", scale=({w}, {h}), keep_ratio=False),
    dict(type="LoadAnnotations", with_bbox=True, with_mask=True),
    dict(type="PackDetInputs",
         meta_keys=("img_id", "img_path", "ori_shape", "img_shape", "scale_factor")),
]
ptq = dict(
    method="pfcr",
    calib=dict(num_images={images}, batch_size=1, heldout_images=0,
               dataset=dict(pipeline=calib_pipeline)),
    recon=dict(iters={iters}, batch_size=1, log_every=0, cache=dict(limit_gb={limit_gb!r})),
)
"""
    path.write_text(text)
    return path


def _status_kib(pid: int) -> dict[str, int]:
    """Memory figures of process ``pid`` from ``/proc/<pid>/status``, KiB (none once it has
    exited and is waiting to be reaped)."""
    out = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "RssAnon", "RssFile", "VmHWM"):
            out[key] = int(value.split()[0])
    return out


def run_sampled(cmd: list[str], log: Path) -> dict:
    """Run ``cmd`` on one thread, its output to ``log``, sampling its memory every 0.1 s: the
    peaks in MiB and the wall time of the process, start to exit."""
    peaks = {"VmRSS": 0, "RssAnon": 0, "RssFile": 0, "VmHWM": 0}
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    start = time.perf_counter()
    with log.open("w") as f:
        proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=f, stderr=subprocess.STDOUT)
        while proc.poll() is None:
            try:
                now = _status_kib(proc.pid)
            except OSError:  # it exited since the poll
                break
            for key in peaks:
                peaks[key] = max(peaks[key], now.get(key, 0))
            time.sleep(0.1)
        rc = proc.wait()
    if rc != 0:
        raise RuntimeError(f"{' '.join(cmd)}: exit {rc}, see {log}")
    memory = {f"peak_{k}_mib": peaks[k] / 1024 for k in ("VmRSS", "RssAnon", "RssFile")}
    memory["VmHWM_mib"] = peaks["VmHWM"] / 1024
    memory["wall_seconds"] = time.perf_counter() - start
    return memory


def run_one(out: Path, model: str, images: int, size, iters: int, limit_gb) -> dict:
    name = f"{model}_{images}img_" + ("nolimit" if limit_gb is None else f"limit{limit_gb:.3g}")
    work = out / "runs" / name
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    config = write_config(work / "config.py", model, images, size, iters, limit_gb)
    cmd = [sys.executable, str(ROOT / "tools/ptq.py"), str(config), "--work-dir", str(work)]
    cmd += ["--no-fp-eval", "--eval-images", "1"]
    print(f"running {name} ...", flush=True)
    memory = run_sampled(cmd, work / "run.log")
    run = last_run_dir(work)
    results = json.loads((run / "ptq_results.json").read_text())
    log = json.loads((run / "recon" / "recon_log.json").read_text())
    leftover = [str(p) for p in (run / "recon").glob("pfcr_cache_*")]
    units = [
        {"name": u["name"], "level": u["level"], **u["cache_bytes"], "seconds": u["seconds"]}
        for u in log["units"]
    ]
    recon = results["recon"]
    return {
        "model": model,
        "images": images,
        "size": list(size),
        "cache_limit_gb": limit_gb,
        "cache": recon["cache"],
        "units": units,
        "memory_mib": memory,
        "seconds": {
            "run": round(memory["wall_seconds"], 1),
            "reconstruction": round(log["seconds"], 1),
            "caches": round(recon["cache_seconds"], 1),
            "steps": round(recon["seconds"], 1),
            "spill": recon["cache"]["spill_seconds"],
        },
        "spill_folders_left": leftover,
    }


def spill_timing(shape=(1, 200 * 336, 96), tensors: int = 8, steps: int = 40) -> dict:
    """The time cost of spilling, in this process: storing ``tensors`` cached tensors of
    ``shape`` (fp16; default one image's Swin-T stage-1 input at 800x1333, 12.9 MB) in memory
    and spilled, and drawing ``steps`` training batches (three such tensors each, as a unit's
    step) with the sampler from each; the two interleaved, best of 3 rounds, pages warm in
    the page cache (what a machine with free memory for it sees)."""
    import torch

    from pfcr_mm.recon.cache import CacheStore
    from pfcr_mm.recon.sampling import UnitCaches

    gen = torch.Generator().manual_seed(0)
    data = [torch.randn(shape, generator=gen) for _ in range(tensors)]
    best = {"store_memory_s": [], "store_disk_s": [], "draw_memory_s": [], "draw_disk_s": []}
    for _ in range(3):
        for where, limit in (("memory", None), ("disk", 0)):
            store = CacheStore(limit, dtype=torch.float16)
            start = time.perf_counter()
            cached = [store.store(t) for t in data]
            best[f"store_{where}_s"].append(time.perf_counter() - start)
            sampler = UnitCaches(cached, cached, cached, [()] * tensors)
            g = torch.Generator().manual_seed(1)
            start = time.perf_counter()
            for _ in range(steps):
                sampler.draw(g, 1, torch.device("cpu"))
            best[f"draw_{where}_s"].append((time.perf_counter() - start) / steps)
            del cached, sampler
            store.close()
    out = {k: min(v) for k, v in best.items()}
    nbytes = tensors * data[0].numel() * 2
    return {
        "tensor_shape": list(shape),
        "tensors": tensors,
        "bytes": nbytes,
        "store_memory_gb_per_s": nbytes / out["store_memory_s"] / 1e9,
        "store_disk_gb_per_s": nbytes / out["store_disk_s"] / 1e9,
        "draw_memory_ms_per_step": out["draw_memory_s"] * 1e3,
        "draw_disk_ms_per_step": out["draw_disk_s"] * 1e3,
    }


def extrapolate(row: dict, coco_images: int) -> dict:
    """Per unit and for the run, the bytes at ``coco_images`` images (linear in images)."""
    f = coco_images / row["images"]
    held = {u["name"]: (u["memory"] + u["disk"]) * f for u in row["units"]}
    biggest = max(held, key=held.get)
    peak = max(u["peak_memory"] + u["peak_disk"] for u in row["units"]) * f
    return {
        "images": coco_images,
        "largest_unit": biggest,
        "largest_unit_gb": held[biggest] / 1e9,
        "peak_cache_gb": peak / 1e9,
        "by_unit_gb": {k: round(v / 1e9, 3) for k, v in held.items()},
    }


def markdown(data: dict) -> str:
    """The Markdown written next to the JSON: a title over the table of
    :func:`pfcr_mm.benchmark_tables.cache_table`."""
    return TITLE + cache_table(data)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--images", type=int, default=8)
    p.add_argument("--models", nargs="+", choices=sorted(MODELS), default=["demo", "swin_t_width"])
    p.add_argument("--iters", type=int, default=2)
    p.add_argument("--size", type=int, nargs=2, default=(800, 1333), metavar=("H", "W"))
    p.add_argument("--limit-fraction", type=float, default=0.25)
    p.add_argument("--coco-images", type=int, default=256)
    p.add_argument("--out", default="benchmarks/cache")
    p.add_argument("--keep", action="store_true", help="keep the work folders")
    p.add_argument(
        "--merge", nargs="+", metavar="JSON", help="merge the rows of earlier benchmark.json files"
    )
    args = p.parse_args(argv)
    out = ROOT / args.out
    if args.merge:  # runs of different models made apart (e.g. at different image counts)
        parts = [json.loads(Path(f).read_text()) for f in args.merge]
        data = {**parts[0], "rows": [r for d in parts for r in d["rows"]]}
        data["merged_from"] = [{"settings": d["settings"], "env": d["env"]} for d in parts]
        data["spill_timing"] = spill_timing()
        print(markdown(data))
        print(write_benchmark(out, data, markdown(data)))
        return 0
    data = {
        "settings": {
            "images": args.images,
            "size": list(args.size),
            "iters": args.iters,
            "limit_fraction": args.limit_fraction,
            "coco_images": args.coco_images,
            "method": "pfcr",
            "scope": "all",
            "cache_dtype": "float16",
        },
        "env": {
            "torch": package_versions(("torch",))["torch"],
            "cpu": cpu_model(),
            "threads": 1,
            "load_average_at_start": os.getloadavg(),
            "date": datetime.datetime.now().isoformat(timespec="seconds"),
            "command": " ".join(
                ["python", "tools/benchmarks/benchmark_cache.py", *(argv or sys.argv[1:])]
            ),
        },
        "rows": [],
    }
    written = None
    for model in args.models:
        free = run_one(out, model, args.images, args.size, args.iters, None)
        limit = round(free["cache"]["max_memory_bytes"] * args.limit_fraction / 1e9, 4)
        capped = run_one(out, model, args.images, args.size, args.iters, limit)
        for row in (free, capped):
            row["extrapolated"] = extrapolate(row, args.coco_images)
            data["rows"].append(row)
        # rewritten after every model: an interrupted benchmark keeps its rows
        line = write_benchmark(out, data, markdown(data))
        written = written or line  # the first write says what this run replaced
    data["spill_timing"] = spill_timing()
    write_benchmark(out, data, markdown(data))
    if not args.keep:
        shutil.rmtree(out / "runs", ignore_errors=True)
    print(markdown(data))
    print(written)
    return 0


if __name__ == "__main__":
    sys.exit(main())
