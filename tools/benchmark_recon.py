"""Ablation of the reconstruction methods on the embedded demo models.

For each demo model and bit width, runs ``tools/ptq.py`` with ``calib``, ``block``, ``pfcr`` with
POS (temperature annealed across levels) and ``pfcr`` without POS (annealed within each unit),
all on the same calibration images and with the same per-block iteration budget, and writes
``<out>/benchmark.json`` and ``<out>/benchmark.md``: FP and quantized accuracy or box/mask mAP,
quantization (calibration + reconstruction) time, peak host memory.

    python tools/benchmark_recon.py [--preset quick|paper] [--bits 4 3] [--models cls det]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MODELS = {
    "cls": ("configs/demo/demo_vit_shapes_w4a4.py", "accuracy/top1"),
    "det": ("configs/demo/demo_mask_rcnn_swin_shapes_w4a4.py", "coco/bbox_mAP"),
}
METHODS = {
    "calib": ["ptq.method=calib"],
    "block": ["ptq.method=block"],
    "pfcr": ["ptq.method=pfcr", "ptq.recon.beta_schedule=levels"],
    "pfcr_nopos": ["ptq.method=pfcr", "ptq.recon.beta_schedule=unit"],
}
# iterations per block and calibration images; "paper" follows method.md (20k iterations)
PRESETS = {
    "quick": {"iters": 300, "cls_images": 128, "det_images": 32},
    "paper": {"iters": 20000, "cls_images": 1024, "det_images": 256},
}


def run_one(model: str, bits: int, method: str, preset: dict, out: Path) -> dict:
    config, _ = MODELS[model]
    work = out / f"{model}_w{bits}a{bits}_{method}"
    images = preset["cls_images" if model == "cls" else "det_images"]
    opts = [
        f"ptq.quant.w_bits={bits}",
        f"ptq.quant.a_bits={bits}",
        f"ptq.calib.num_images={images}",
        f"ptq.recon.iters={preset['iters']}",
        # detection: a batch is a few whole images (peers use 1-2), classification 32 images
        f"ptq.recon.batch_size={4 if model == 'det' else 32}",
        *METHODS[method],
    ]
    cmd = [sys.executable, str(ROOT / "tools/ptq.py"), config, "--work-dir", str(work)]
    cmd += ["--cfg-options", *opts]
    log = work.with_suffix(".log")
    work.parent.mkdir(parents=True, exist_ok=True)
    with log.open("w") as f:
        rc = subprocess.run(cmd, cwd=ROOT, stdout=f, stderr=subprocess.STDOUT).returncode
    if rc != 0:
        return {"model": model, "bits": bits, "method": method, "error": f"exit {rc}, see {log}"}
    res = json.loads((work / "ptq_results.json").read_text())
    return {
        "model": model,
        "bits": bits,
        "method": method,
        "fp": res["fp"],
        "quant": res["quant"],
        "quantize_s": res["time_s"]["quantize"],
        "peak_host_mb": res["peak_mem_mb"]["host_rss"],
        "scope": res["scope"],
    }


def markdown(rows: list[dict]) -> str:
    lines = [
        "| model | bits | method | metric | FP | quantized | quantize time (s) | peak host MiB |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        metric = MODELS[r["model"]][1]
        if "error" in r:
            lines.append(
                f"| {r['model']} | W{r['bits']}A{r['bits']} | {r['method']} | "
                f"{metric} | | {r['error']} | | |"
            )
            continue
        lines.append(
            f"| {r['model']} | W{r['bits']}A{r['bits']} | {r['method']} | {metric} | "
            f"{r['fp'][metric]:.4g} | {r['quant'][metric]:.4g} | {r['quantize_s']:.0f} | "
            f"{r['peak_host_mb']:.0f} |"
        )
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--preset", choices=sorted(PRESETS), default="quick")
    p.add_argument("--bits", type=int, nargs="+", default=[4, 3])
    p.add_argument("--models", nargs="+", choices=sorted(MODELS), default=sorted(MODELS))
    p.add_argument("--methods", nargs="+", choices=list(METHODS), default=list(METHODS))
    p.add_argument("--out", default="work_dirs/benchmark_recon")
    args = p.parse_args(argv)
    out = ROOT / args.out
    rows = []
    for model in args.models:
        for bits in args.bits:
            for method in args.methods:
                print(f"{model} W{bits}A{bits} {method} ...", flush=True)
                rows.append(run_one(model, bits, method, PRESETS[args.preset], out))
                (out / "benchmark.json").write_text(
                    json.dumps(
                        {"preset": args.preset, **PRESETS[args.preset], "rows": rows}, indent=1
                    )
                )
                (out / "benchmark.md").write_text(markdown(rows))
                print(markdown(rows[-1:]).splitlines()[-1], flush=True)
    print(f"wrote {out / 'benchmark.json'} and {out / 'benchmark.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
