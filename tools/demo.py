"""The embedded demo end to end: generate the demo data, then for each demo config evaluate the FP
model, quantize it and evaluate the quantized model (``tools/ptq.py``), and print one table. By
default both demo models at W4A4, each with ``calib`` (calibration, then GPTQ's rounding: its
default) and with PFCR reconstruction.

    python tools/demo.py [--configs CONFIG ...] [--work-dir work_dirs/demo]

Writes ``<work-dir>/summary.json``; each run's own files are in
``<work-dir>/<config>/<YYYYmmdd_HHMMSS>/`` (``<work-dir>/<config>/last_run`` names the last).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

from pfcr_mm.engine.run_dir import last_run_dir

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_CONFIGS = [
    "configs/demo/demo_vit_shapes_w4a4.py",
    "configs/demo/demo_vit_shapes_pfcr_w4a4.py",
    "configs/demo/demo_mask_rcnn_swin_shapes_w4a4.py",
    "configs/demo/demo_mask_rcnn_swin_shapes_pfcr_w4a4.py",
]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--configs", nargs="+", default=DEFAULT_CONFIGS)
    p.add_argument("--work-dir", default="work_dirs/demo")
    args = p.parse_args(argv)
    start = time.time()
    subprocess.run([sys.executable, str(ROOT / "tools/make_demo_data.py")], check=True, cwd=ROOT)
    rows = []
    for config in args.configs:
        work_dir = Path(args.work_dir) / Path(config).stem
        print(f"\n=== {config} -> {work_dir}", flush=True)
        cmd = [sys.executable, str(ROOT / "tools/ptq.py"), config, "--work-dir", str(work_dir)]
        if subprocess.run(cmd, cwd=ROOT).returncode != 0:
            print(f"error: {config} failed (see above)", file=sys.stderr)
            return 1
        res = json.loads((last_run_dir(ROOT / work_dir) / "ptq_results.json").read_text())
        rows.append(
            {
                "config": config,
                **{
                    k: res[k]
                    for k in (
                        "task",
                        "method",
                        "w_bits",
                        "a_bits",
                        "scope",
                        "fp",
                        "quant",
                        "time_s",
                        "peak_mem_mb",
                    )
                },
                "head_bits": res["quant_config"]["head_bits"],
                "post_softmax_renorm": res["quant_config"]["post_softmax_renorm"],
            }
        )
    summary = {"rows": rows, "wall_s": time.time() - start}
    (ROOT / args.work_dir / "summary.json").write_text(json.dumps(summary, indent=1))
    print(f"\n{'model':40s} {'metric':22s} {'FP':>8s} {'quant':>8s}  setting")
    for r in rows:
        for metric, value in r["quant"].items():
            if metric.endswith(("top1", "bbox_mAP", "segm_mAP")):
                head = "" if r["head_bits"] is None else f", prediction layers {r['head_bits']}-bit"
                head += ", probability rows renormalized" if r["post_softmax_renorm"] else ""
                print(
                    f"{Path(r['config']).stem:40s} {metric:22s} {r['fp'][metric]:8.4g} "
                    f"{value:8.4g}  W{r['w_bits']}A{r['a_bits']} {r['method']}, scope {r['scope']}"
                    f"{head}"
                )
    print(f"demo wall time {summary['wall_s']:.0f} s; summary: {args.work_dir}/summary.json")
    return 0


if __name__ == "__main__":
    sys.exit(main())
