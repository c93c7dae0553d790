"""FP32 and quantized demo models side by side, in one run.

``--models vit`` (default): PyTorch FP32, onnxruntime FP32, the PyTorch fake-quant model and its
ONNX exports in onnxruntime (W8A8 exact, W8A8 ``--int8``, W4A4 with packed uint4 weights):
top-1 on the demo val images, latency at batch 1 and 32, file size, the session options and
which kernels onnxruntime ran (the optimized graph's node types).

``--models det``: the demo Mask R-CNN's backbone and neck exported (W8A8 exact, W8A8
``--int8``, W4A4 uint4) at the test pipeline's padded size, its heads in PyTorch: box and mask
mAP on the 100 demo val images with the features from onnxruntime against the PyTorch
fake-quant model, the features' largest difference, file size, kernels, and the latency of the
dense part at batch 1 (FP32 PyTorch and onnxruntime against the exports). Also the PyTorch
model's own mAP with its input scaled by ``1 + 1e-6 * noise`` (two seeds): how far float
rounding alone moves the mAP of the quantized model, the floor of any parity measurement.

    python tools/benchmarks/benchmark_export.py [--models vit|det] [--w8 CONFIG QUANTIZED]
                                     [--w4 CONFIG QUANTIZED] [--threads 1 2] [--out DIR]

The quantized models come from ``tools/ptq.py`` (defaults: the demo configs' work dirs).
Writes ``<out>/benchmark.json`` and ``<out>/benchmark.md`` (default ``benchmarks/export`` and
``benchmarks/export_det``); the ONNX files and their reports go to
``work_dirs/benchmark_export/``. Latency: the median over ``--rounds`` rounds of ``--iters``
runs each, the variants interleaved within every round so that load from other processes on
the machine falls on all of them alike.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnxruntime as ort
import torch
from mmengine.config import Config

from pfcr_mm.engine.checkpoint import load_weights_strict
from pfcr_mm.engine.classification import create_timm_model
from pfcr_mm.engine.export import (
    DetectorFeatures,
    build_quantized,
    evaluate_detector,
    export_quantized,
    features_from,
    mean_average_precisions,
)
from pfcr_mm.engine.ptq import package_versions, saved_model_path
from pfcr_mm.export import export_onnx
from pfcr_mm.export.runtime import (
    FixedSizeRunner,
    cpu_session,
    describe_options,
    integer_kernel_counts,
    optimized_op_counts,
    run_session,
    session_options,
)

# (config, its quantized model or the work dir of tools/ptq.py: the last run's model)
W8 = ("configs/demo/demo_vit_shapes_w8a8.py", "work_dirs/demo_vit_shapes_w8a8")
W4 = ("configs/demo/demo_vit_shapes_w4a4.py", "work_dirs/demo_vit_shapes_w4a4")
DET_W8 = (
    "configs/demo/demo_mask_rcnn_swin_shapes_w8a8.py",
    "work_dirs/demo_mask_rcnn_swin_shapes_w8a8",
)
DET_W4 = (
    "configs/demo/demo_mask_rcnn_swin_shapes_w4a4.py",
    "work_dirs/demo_mask_rcnn_swin_shapes_w4a4",
)


def val_batches(runner) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Every val image of the runner's test loader, preprocessed, with its label."""
    model = runner.model
    out = []
    for batch in runner.test_dataloader:
        data = model.data_preprocessor(batch, False)
        labels = torch.as_tensor(data["data_samples"]["gt_label"])
        out.append((data["inputs"], labels))
    return out


def top1(predict: Callable[[torch.Tensor], torch.Tensor], batches) -> float:
    """Top-1 accuracy in percent of ``predict`` (images -> logits)."""
    right = total = 0
    for images, labels in batches:
        right += int((predict(images).argmax(1) == labels).sum())
        total += len(labels)
    return 100.0 * right / total


def latency_ms(
    runners: dict[str, Callable[[torch.Tensor], object]],
    shape: tuple[int, ...],
    rounds: int,
    iters: int,
) -> dict[str, float]:
    """Median milliseconds per call of each runner on a random input of ``shape``; the
    runners interleaved in each round."""
    x = torch.randn(shape)
    times: dict[str, list[float]] = {name: [] for name in runners}
    for fn in runners.values():  # warm-up
        for _ in range(3):
            fn(x)
    for _ in range(rounds):
        for name, fn in runners.items():
            for _ in range(iters):
                start = time.perf_counter()
                fn(x)
                times[name].append(time.perf_counter() - start)
    return {name: 1000 * statistics.median(t) for name, t in times.items()}


def torch_fn(model: torch.nn.Module) -> Callable[[torch.Tensor], torch.Tensor]:
    def run(x: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return model(x)

    return run


def ort_fn(path: Path, threads: int) -> Callable[[torch.Tensor], torch.Tensor]:
    session = cpu_session(path, threads)
    return lambda x: run_session(session, x)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--models", choices=["vit", "det"], default="vit")
    p.add_argument("--w8", nargs=2, metavar=("CONFIG", "QUANTIZED"))
    p.add_argument("--w4", nargs=2, metavar=("CONFIG", "QUANTIZED"))
    p.add_argument("--threads", nargs="+", type=int, help="default: 1 2 (vit), 1 (det)")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--iters", type=int, default=10)
    p.add_argument("--out", help="default: benchmarks/export (vit), benchmarks/export_det (det)")
    args = p.parse_args(argv)
    det = args.models == "det"
    args.w8 = args.w8 or (DET_W8 if det else W8)
    args.w4 = args.w4 or (DET_W4 if det else W4)
    args.threads = args.threads or ([1] if det else [1, 2])
    args.out = args.out or ("benchmarks/export_det" if det else "benchmarks/export")
    if det:
        return main_det(args)
    out = Path(args.out)
    work = onnx_dir = Path("work_dirs/benchmark_export")
    torch.manual_seed(0)

    # the quantized models, and their exports (the W8A8 one twice: exact, then --int8)
    w8_runner, w8_ptq = build_quantized(args.w8[0], saved_model_path(args.w8[1]), work)
    w4_runner, w4_ptq = build_quantized(args.w4[0], saved_model_path(args.w4[1]), work)
    cfg = w8_runner.cfg
    fp = create_timm_model(cfg.model.arch, cfg.model.model_kwargs).eval()
    load_weights_strict(fp, cfg.model.checkpoint)
    batches = val_batches(w8_runner)
    files = {
        "fp32": onnx_dir / "vit_fp32.onnx",
        "w8a8": onnx_dir / "vit_w8a8.onnx",
        "w8a8_int8": onnx_dir / "vit_w8a8_int8.onnx",
        "w4a4_uint4": onnx_dir / "vit_w4a4_uint4.onnx",
    }
    export_onnx(fp, batches[0][0][:2], files["fp32"])
    reports = {"w8a8": export_quantized(w8_runner, w8_ptq, files["w8a8"])}
    w8_fake_top1 = top1(torch_fn(w8_runner.model.net), batches)
    reports["w8a8_int8"] = export_quantized(w8_runner, w8_ptq, files["w8a8_int8"], int8=True)
    reports["w4a4_uint4"] = export_quantized(w4_runner, w4_ptq, files["w4a4_uint4"])

    variants = {
        "FP32 PyTorch": {"top1": top1(torch_fn(fp), batches), "bytes": Path(cfg.model.checkpoint)},
        "FP32 onnxruntime": {"onnx": files["fp32"]},
        "W8A8 fake-quant PyTorch": {
            "top1": w8_fake_top1,
            "bytes": Path(args.w8[1]),
            "model": "log post-softmax quantizers as chosen at calibration",
        },
        "W8A8 onnxruntime (exact)": {"onnx": files["w8a8"]},
        "W8A8 fake-quant PyTorch, 8-bit uniform post-softmax": {
            "top1": top1(torch_fn(w8_runner.model.net), batches),
            "model": "the model the --int8 export is exact to",
        },
        "W8A8 onnxruntime int8 (--int8)": {"onnx": files["w8a8_int8"]},
        "W4A4 fake-quant PyTorch": {
            "top1": top1(torch_fn(w4_runner.model.net), batches),
            "bytes": Path(args.w4[1]),
        },
        "W4A4 onnxruntime (uint4 weights)": {"onnx": files["w4a4_uint4"]},
    }
    for row in variants.values():
        if "onnx" in row:
            row["top1"] = top1(ort_fn(row["onnx"], 1), batches)
            row["bytes"] = row["onnx"]
            ran = optimized_op_counts(row["onnx"])
            row["onnxruntime_ops"] = ran
            row["integer_kernels"] = integer_kernel_counts(ran)
            row["float_matmuls"] = sum(ran.get(op, 0) for op in ("MatMul", "FusedMatMul", "Gemm"))
        if "bytes" in row:
            row["bytes"] = row["bytes"].stat().st_size

    timed = {
        "FP32 PyTorch": lambda t: torch_fn(fp),
        "FP32 onnxruntime": lambda t: ort_fn(files["fp32"], t),
        "W8A8 onnxruntime int8 (--int8)": lambda t: ort_fn(files["w8a8_int8"], t),
        "W8A8 onnxruntime (exact)": lambda t: ort_fn(files["w8a8"], t),
        "W8A8 fake-quant PyTorch, 8-bit uniform post-softmax": lambda t: torch_fn(
            w8_runner.model.net
        ),
        "W4A4 onnxruntime (uint4 weights)": lambda t: ort_fn(files["w4a4_uint4"], t),
    }
    latency = {}
    for threads in args.threads:
        torch.set_num_threads(threads)
        runners = {name: make(threads) for name, make in timed.items()}
        latency[threads] = {
            batch: latency_ms(runners, (batch, 3, 32, 32), args.rounds, args.iters)
            for batch in (1, 32)
        }
    for name, row in variants.items():
        row["latency_ms"] = {
            f"threads{t}_batch{b}": latency[t][b][name]
            for t in args.threads
            for b in (1, 32)
            if name in latency[t][b]
        }
    int8, fp32 = "W8A8 onnxruntime int8 (--int8)", "FP32 onnxruntime"
    speedup = {
        f"threads{t}_batch{b}": latency[t][b][fp32] / latency[t][b][int8]
        for t in args.threads
        for b in (1, 32)
    }
    results = {
        "model": {"config": args.w8[0], "arch": cfg.model.arch, **cfg.model.model_kwargs},
        "val_images": sum(len(labels) for _, labels in batches),
        "int8_vs_fp32_onnxruntime_speedup": speedup,
        "int8_top1_minus_fake_quant_top1": variants[int8]["top1"]
        - variants["W8A8 fake-quant PyTorch, 8-bit uniform post-softmax"]["top1"],
        **_run_record(args, variants, reports, files),
    }
    _write(out, results, markdown(results, args.threads))
    return 0


def _run_record(args, variants: dict, reports: dict, files: dict) -> dict:
    """What every benchmark JSON holds besides its own results: the variants' rows, the
    export reports, the session options and threads, the latency method, machine and
    versions."""
    return {
        "variants": {
            name: {k: (str(v) if isinstance(v, Path) else v) for k, v in row.items()}
            for name, row in variants.items()
        },
        "exports": {k: {**r, "path": str(files[k])} for k, r in reports.items()},
        "session_options": {t: describe_options(session_options(t)) for t in args.threads},
        "torch_threads": args.threads,
        "latency_method": f"median of {args.rounds} rounds x {args.iters} calls, interleaved",
        "machine": {
            "processor": platform.processor() or platform.machine(),
            "cpu_count": os.cpu_count(),
            "cpu_flags": _cpu_flags(),
        },
        "versions": {**package_versions(), "onnxruntime": ort.__version__, "numpy": np.__version__},
    }


def _write(out: Path, results: dict, table: str) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "benchmark.json").write_text(json.dumps(results, indent=1))
    (out / "benchmark.md").write_text(table)
    print(table)


def _cpu_flags() -> list[str]:
    """The SIMD flags that decide onnxruntime's integer kernels (Linux)."""
    try:
        flags = Path("/proc/cpuinfo").read_text().split("flags")[1].split("\n")[0].split()
    except (OSError, IndexError):
        return []
    return sorted(f for f in flags if f.startswith(("avx", "amx")) or "vnni" in f)


def markdown(results: dict, threads: list[int]) -> str:
    cols = [f"threads{t}_batch{b}" for t in threads for b in (1, 32)]
    head = ["variant", "top-1 (%)", "size (MB)"]
    head += [f"ms, {t} thr, batch {b}" for t in threads for b in (1, 32)]
    head += ["integer kernels (float matmuls)"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name, row in results["variants"].items():
        lat = [f"{row['latency_ms'][c]:.2f}" if c in row["latency_ms"] else "" for c in cols]
        kernels = ""
        if "integer_kernels" in row:
            ints = ", ".join(f"{n} {op}" for op, n in row["integer_kernels"].items()) or "none"
            kernels = f"{ints} ({row['float_matmuls']})"
        size = f"{row['bytes'] / 1e6:.2f}" if "bytes" in row else ""
        cells = [name, f"{row['top1']:.1f}", size, *lat, kernels]
        lines.append("| " + " | ".join(cells) + " |")
    speed = ", ".join(
        f"{c.replace('_', ' ')}: {v:.2f}x"
        for c, v in results["int8_vs_fp32_onnxruntime_speedup"].items()
    )
    return (
        f"Demo ViT ({results['val_images']} val images), CPU flags "
        f"{' '.join(results['machine']['cpu_flags'])}, onnxruntime "
        f"{results['versions']['onnxruntime']}.\n\n"
        + "\n".join(lines)
        + f"\n\nint8 onnxruntime speed-up over FP32 onnxruntime: {speed}. int8 top-1 minus the "
        f"fake-quant model's it is exported from: "
        f"{results['int8_top1_minus_fake_quant_top1']:+.2f} points.\n"
    )


NOISE = 1e-6  # relative input perturbation of the float-rounding floor


def perturbed_maps(runner, seeds: tuple[int, ...] = (0, 1)) -> list[dict]:
    """Box and mask mAP of the runner's PyTorch quantized detector with its input images
    scaled by ``1 + NOISE * N(0, 1)`` (one draw per seed): how far float rounding alone moves
    the mAP (activations that sit at a rounding boundary take the neighbouring code)."""
    model = runner.model
    dense = DetectorFeatures(model).eval()
    rows = []
    for seed in seeds:
        gen = torch.Generator().manual_seed(seed)

        def features(x: torch.Tensor, gen=gen) -> tuple[torch.Tensor, ...]:
            return dense(x * (1 + NOISE * torch.randn(x.shape, generator=gen)))

        with features_from(model, features):
            rows.append({"seed": seed, **mean_average_precisions(evaluate_detector(runner))})
    return rows


def main_det(args) -> int:
    """``--models det``: see the module docstring."""
    from mmdet.registry import MODELS

    out, onnx_dir = Path(args.out), Path("work_dirs/benchmark_export")
    torch.manual_seed(0)
    w8_runner, w8_ptq = build_quantized(args.w8[0], saved_model_path(args.w8[1]), onnx_dir)
    w4_runner, w4_ptq = build_quantized(args.w4[0], saved_model_path(args.w4[1]), onnx_dir)
    cfg = w8_runner.cfg
    checkpoint = Path(Config.fromfile(args.w8[0]).load_from)
    fp = MODELS.build(cfg.model).eval()
    load_weights_strict(fp, checkpoint)
    fp_dense = DetectorFeatures(fp).eval()
    files = {
        "fp32": onnx_dir / "det_fp32.onnx",
        "w8a8": onnx_dir / "det_w8a8.onnx",
        "w8a8_int8": onnx_dir / "det_w8a8_int8.onnx",
        "w4a4_uint4": onnx_dir / "det_w4a4_uint4.onnx",
    }
    # the float-rounding floors first: the --int8 export changes the W8A8 model in place
    floors = {"w8a8": perturbed_maps(w8_runner), "w4a4_uint4": perturbed_maps(w4_runner)}
    floors["w8a8_int8"] = None
    reports = {"w8a8": export_quantized(w8_runner, w8_ptq, files["w8a8"])}
    reports["w8a8_int8"] = export_quantized(w8_runner, w8_ptq, files["w8a8_int8"], int8=True)
    reports["w4a4_uint4"] = export_quantized(w4_runner, w4_ptq, files["w4a4_uint4"])
    size = reports["w8a8"]["parity"]["input_size"]
    export_onnx(fp_dense, torch.zeros(1, 3, *size), files["fp32"], dynamic_batch=False)

    names = {
        "w8a8": "W8A8 onnxruntime (exact)",
        "w8a8_int8": "W8A8 onnxruntime int8 (--int8)",
        "w4a4_uint4": "W4A4 onnxruntime (uint4 weights)",
    }
    variants = {
        "FP32 PyTorch": {"bytes": checkpoint.stat().st_size},
        "FP32 onnxruntime": {"onnx": files["fp32"]},
        "W8A8 fake-quant PyTorch, 8-bit uniform post-softmax": {
            "bytes": saved_model_path(args.w8[1]).stat().st_size
        },
        "W4A4 fake-quant PyTorch": {"bytes": saved_model_path(args.w4[1]).stat().st_size},
    }
    for key, name in names.items():
        parity = reports[key]["parity"]
        variants[name] = {"onnx": files[key], "parity": parity, "rounding_floor": floors[key]}
    for row in variants.values():
        if "onnx" in row:
            ran = optimized_op_counts(row["onnx"])
            row["onnxruntime_ops"] = ran
            row["integer_kernels"] = integer_kernel_counts(ran)
            row["float_convs_matmuls"] = sum(
                ran.get(op, 0) for op in ("Conv", "FusedConv", "MatMul", "FusedMatMul", "Gemm")
            )
            row["bytes"] = row["onnx"].stat().st_size

    latency = {}
    for threads in args.threads:
        torch.set_num_threads(threads)
        runners = {
            "FP32 PyTorch": torch_fn(fp_dense),
            "W8A8 fake-quant PyTorch, 8-bit uniform post-softmax": torch_fn(
                DetectorFeatures(w8_runner.model).eval()
            ),
            "W4A4 fake-quant PyTorch": torch_fn(DetectorFeatures(w4_runner.model).eval()),
            **{
                name: FixedSizeRunner(cpu_session(row["onnx"], threads))
                for name, row in variants.items()
                if "onnx" in row
            },
        }
        latency[threads] = latency_ms(runners, (1, 3, *size), args.rounds, args.iters)
    for name, row in variants.items():
        row["latency_ms"] = {f"threads{t}_batch1": latency[t][name] for t in args.threads}
    results = {
        "model": {"config": args.w8[0], "checkpoint": str(checkpoint)},
        "exported": reports["w8a8"]["runs_in"],
        "input_size": size,
        "val_images": reports["w8a8"]["parity"]["images"],
        "rounding_floor_method": f"PyTorch fake-quant, input x (1 + {NOISE:g} N(0,1)), 2 seeds",
        **_run_record(args, variants, reports, files),
    }
    _write(out, results, markdown_det(results, args.threads))
    return 0


def _pair(maps: dict) -> str:
    """Box / mask mAP in %."""
    return " / ".join(
        f"{100 * maps[k]:.1f}" for k in ("coco/bbox_mAP", "coco/segm_mAP") if k in maps
    )


def markdown_det(results: dict, threads: list[int]) -> str:
    head = [
        "variant",
        "PyTorch fake-quant box / mask mAP",
        "onnxruntime box / mask mAP",
        "difference (points)",
        "PyTorch, input x (1 + 1e-6 noise), per seed",
        "features: max diff / range",
        "size (MB)",
        *[f"ms, {t} thr, batch 1" for t in threads],
        "integer kernels (float convs + matmuls)",
    ]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name, row in results["variants"].items():
        cells = [name, "", "", "", "", ""]
        if "parity" in row:
            p = row["parity"]
            diff = " / ".join(
                f"{100 * (p['onnxruntime'][k] - p['pytorch'][k]):+.1f}" for k in p["pytorch"]
            )
            floor = ", ".join(_pair(r) for r in row["rounding_floor"] or [])
            feats = f"{p['features']['max_diff_over_range']:.4f}"
            cells[1:] = [_pair(p["pytorch"]), _pair(p["onnxruntime"]), diff, floor, feats]
        cells.append(f"{row['bytes'] / 1e6:.2f}")
        cells += [f"{row['latency_ms'][f'threads{t}_batch1']:.1f}" for t in threads]
        kernels = ""
        if "integer_kernels" in row:
            ints = ", ".join(f"{n} {op}" for op, n in row["integer_kernels"].items()) or "none"
            kernels = f"{ints} ({row['float_convs_matmuls']})"
        cells.append(kernels)
        lines.append("| " + " | ".join(cells) + " |")
    h, w = results["input_size"]
    return (
        f"Demo Mask R-CNN Swin ({results['val_images']} val images), backbone and neck in "
        f"onnxruntime at 1x3x{h}x{w}, RPN and RoI heads in PyTorch; CPU flags "
        f"{' '.join(results['machine']['cpu_flags'])}, onnxruntime "
        f"{results['versions']['onnxruntime']}.\n\n" + "\n".join(lines) + "\n"
    )


if __name__ == "__main__":
    sys.exit(main())
