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
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
from mmengine.config import Config

from pfcr_mm.adapters import prepare_calibrated
from pfcr_mm.benchmark_tables import export_det_table, export_sizes_table, export_table
from pfcr_mm.engine.checkpoint import load_weights_strict
from pfcr_mm.engine.classification import create_timm_model
from pfcr_mm.engine.deploy import (
    DetectorFeatures,
    build_quantized,
    evaluate_detector,
    export_quantized,
    features_from,
    mean_average_precisions,
)
from pfcr_mm.engine.run_dir import saved_model_path
from pfcr_mm.export import export_onnx
from pfcr_mm.export.runtime import (
    FixedSizeRunner,
    cpu_session,
    describe_options,
    integer_kernel_counts,
    op_time_shares,
    optimized_op_counts,
    run_outputs,
    run_session,
    session_options,
)
from pfcr_mm.provenance import PACKAGES, machine_record, package_versions, write_benchmark
from pfcr_mm.settings import QuantConfig

ONNX_DIR = Path("work_dirs/benchmark_export")
# the variants run in onnxruntime, by their file: <kind>_<key>.onnx
EXPORTED = {
    "fp32": "FP32 onnxruntime",
    "w8a8": "W8A8 onnxruntime (exact)",
    "w8a8_int8": "W8A8 onnxruntime int8 (--int8)",
    "w4a4_uint4": "W4A4 onnxruntime (uint4 weights)",
}
W8_UNIFORM = "W8A8 fake-quant PyTorch, 8-bit uniform post-softmax"
W4_FAKE = "W4A4 fake-quant PyTorch"
NOISE = 1e-6  # relative input perturbation of the float-rounding floor
# the Swin-T Mask R-CNN of the README's detector configs (its model part)
SWIN_T_DETECTOR = "configs/pfcr_mask_rcnn_swin_t_w4a4.py"


def demo_run(name: str) -> tuple[str, str]:
    """A demo config and its quantized model: the work dir ``tools/ptq.py`` gives it."""
    return f"configs/demo/{name}.py", f"work_dirs/{name}"


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


class ExportBenchmark:
    """One benchmark run (:meth:`run`): the quantized W8A8 and W4A4 models and the FP one,
    their exports, each variant's accuracy, size, kernels and latency. The subclass of a model
    kind says what differs:

    * ``load_fp()``: build the FP model, return its weights file;
    * ``measure_before_int8()``: what the --int8 export changes (it switches the W8A8 model's
      post-softmax quantizers in place);
    * ``export_fp(reports)``: export the FP model to ``files["fp32"]`` (and set
      ``input_size``, the image size timed, where the exports decide it);
    * ``variants(checkpoint, reports)``: one row per variant, by name: its accuracy,
      ``bytes`` (the file whose size it is), ``onnx`` (its export, run in onnxruntime);
    * ``timed_models()``: the PyTorch variants timed, by name; ``onnx_runner(path, threads)``:
      a call of an export in onnxruntime;
    * ``summary(checkpoint, reports, variants)``: the model and the kind's own results, the
      head of the JSON; ``markdown(results)``: the table, with a line on the setup
      (:mod:`pfcr_mm.benchmark_tables`).
    """

    kind: str  # the --models choice; names the ONNX files
    defaults: dict  # w8, w4, threads, out when not given
    batches: tuple[int, ...]  # the batch sizes timed
    input_size: tuple[int, int]  # the image size timed
    float_ops: tuple[str, ...]  # the float kernels counted in an export ...
    float_key: str  # ... and their key in its row

    def __init__(self, args: argparse.Namespace):
        self.args = args
        torch.manual_seed(0)
        # (Runner, PTQConfig) of each quantized model
        self.w8 = build_quantized(args.w8[0], saved_model_path(args.w8[1]), ONNX_DIR)
        self.w4 = build_quantized(args.w4[0], saved_model_path(args.w4[1]), ONNX_DIR)
        self.w8_runner, self.w4_runner = self.w8[0], self.w4[0]
        self.files = {key: ONNX_DIR / f"{self.kind}_{key}.onnx" for key in EXPORTED}

    def run(self) -> int:
        checkpoint = self.load_fp()
        self.measure_before_int8()
        # the W8A8 model exported twice: exact, then --int8
        reports = {
            "w8a8": export_quantized(*self.w8, self.files["w8a8"]),
            "w8a8_int8": export_quantized(*self.w8, self.files["w8a8_int8"], int8=True),
            "w4a4_uint4": export_quantized(*self.w4, self.files["w4a4_uint4"]),
        }
        self.export_fp(reports)
        variants = self.variants(checkpoint, reports)
        for row in variants.values():
            if "onnx" in row:
                ran = optimized_op_counts(row["onnx"])
                row["onnxruntime_ops"] = ran
                row["integer_kernels"] = integer_kernel_counts(ran)
                row[self.float_key] = sum(ran.get(op, 0) for op in self.float_ops)
                row["bytes"] = row["onnx"]
            if "bytes" in row:
                row["bytes"] = row["bytes"].stat().st_size
        latency = self.latency(variants)
        for name, row in variants.items():
            row["latency_ms"] = {
                f"threads{t}_batch{b}": latency[t][b][name]
                for t in self.args.threads
                for b in self.batches
                if name in latency[t][b]
            }
        results = self.summary(checkpoint, reports, variants)
        results.update(self.run_record(variants, reports))
        table = self.markdown(results)
        print(table)
        print(write_benchmark(self.args.out, results, table))
        return 0

    def latency(self, variants: dict) -> dict[int, dict[int, dict[str, float]]]:
        """Milliseconds per call of the timed variants, by threads, batch and name."""
        latency = {}
        for threads in self.args.threads:
            torch.set_num_threads(threads)
            runners = {name: torch_fn(model) for name, model in self.timed_models().items()}
            for name, row in variants.items():
                if "onnx" in row:
                    runners[name] = self.onnx_runner(row["onnx"], threads)
            latency[threads] = {
                b: latency_ms(runners, (b, 3, *self.input_size), self.args.rounds, self.args.iters)
                for b in self.batches
            }
        return latency

    def run_record(self, variants: dict, reports: dict) -> dict:
        """What the JSON holds besides the kind's own results: the variants' rows, the export
        reports, the session options and threads, the latency method, machine and versions."""
        args = self.args
        return {
            "variants": {
                name: {k: (str(v) if isinstance(v, Path) else v) for k, v in row.items()}
                for name, row in variants.items()
            },
            "exports": {k: {**r, "path": str(self.files[k])} for k, r in reports.items()},
            "session_options": {t: describe_options(session_options(t)) for t in args.threads},
            "torch_threads": args.threads,
            "latency_method": f"median of {args.rounds} rounds x {args.iters} calls, interleaved",
            "machine": machine_record(),
            "versions": package_versions((*PACKAGES, "onnxruntime", "numpy")),
        }


class ViTBenchmark(ExportBenchmark):
    """``--models vit``: the demo ViT whole, top-1 on the val images, batch 1 and 32."""

    kind = "vit"
    defaults = {
        "w8": demo_run("demo_vit_shapes_w8a8"),
        "w4": demo_run("demo_vit_shapes_w4a4"),
        "threads": [1, 2],
        "out": "benchmarks/export",
    }
    batches = (1, 32)
    input_size = (32, 32)
    float_ops = ("MatMul", "FusedMatMul", "Gemm")
    float_key = "float_matmuls"
    markdown = staticmethod(export_table)

    def load_fp(self) -> Path:
        cfg = self.w8_runner.cfg
        self.fp = create_timm_model(cfg.model.arch, cfg.model.model_kwargs).eval()
        load_weights_strict(self.fp, cfg.model.checkpoint)
        self.val = val_batches(self.w8_runner)
        return Path(cfg.model.checkpoint)

    def measure_before_int8(self) -> None:
        self.w8_log_top1 = top1(torch_fn(self.w8_runner.model.net), self.val)

    def export_fp(self, reports: dict) -> None:
        export_onnx(self.fp, self.val[0][0][:2], self.files["fp32"])

    def variants(self, checkpoint: Path, reports: dict) -> dict[str, dict]:
        rows = {
            "FP32 PyTorch": {"top1": top1(torch_fn(self.fp), self.val), "bytes": checkpoint},
            EXPORTED["fp32"]: {"onnx": self.files["fp32"]},
            "W8A8 fake-quant PyTorch": {
                "top1": self.w8_log_top1,
                "bytes": saved_model_path(self.args.w8[1]),
                "model": "log post-softmax quantizers as chosen at calibration",
            },
            EXPORTED["w8a8"]: {"onnx": self.files["w8a8"]},
            W8_UNIFORM: {
                "top1": top1(torch_fn(self.w8_runner.model.net), self.val),
                "model": "the model the --int8 export is exact to",
            },
            EXPORTED["w8a8_int8"]: {"onnx": self.files["w8a8_int8"]},
            W4_FAKE: {
                "top1": top1(torch_fn(self.w4_runner.model.net), self.val),
                "bytes": saved_model_path(self.args.w4[1]),
            },
            EXPORTED["w4a4_uint4"]: {"onnx": self.files["w4a4_uint4"]},
        }
        for row in rows.values():
            if "onnx" in row:
                row["top1"] = top1(ort_fn(row["onnx"], 1), self.val)
        return rows

    def timed_models(self) -> dict[str, torch.nn.Module]:
        return {"FP32 PyTorch": self.fp, W8_UNIFORM: self.w8_runner.model.net}

    def onnx_runner(self, path: Path, threads: int) -> Callable[[torch.Tensor], object]:
        return ort_fn(path, threads)

    def summary(self, checkpoint: Path, reports: dict, variants: dict) -> dict:
        cfg = self.w8_runner.cfg
        int8, fp32 = EXPORTED["w8a8_int8"], EXPORTED["fp32"]
        return {
            "model": {"config": self.args.w8[0], "arch": cfg.model.arch, **cfg.model.model_kwargs},
            "val_images": sum(len(labels) for _, labels in self.val),
            "int8_vs_fp32_onnxruntime_speedup": {
                key: variants[fp32]["latency_ms"][key] / variants[int8]["latency_ms"][key]
                for key in variants[int8]["latency_ms"]
            },
            "int8_top1_minus_fake_quant_top1": variants[int8]["top1"]
            - variants[W8_UNIFORM]["top1"],
        }


class DetBenchmark(ExportBenchmark):
    """``--models det``: the demo Mask R-CNN's backbone and neck in onnxruntime, its heads in
    PyTorch, box and mask mAP on the val images; the dense part timed at batch 1."""

    kind = "det"
    defaults = {
        "w8": demo_run("demo_mask_rcnn_swin_shapes_w8a8"),
        "w4": demo_run("demo_mask_rcnn_swin_shapes_w4a4"),
        "threads": [1],
        "out": "benchmarks/export_det",
    }
    batches = (1,)
    float_ops = ("Conv", "FusedConv", "MatMul", "FusedMatMul", "Gemm")
    float_key = "float_convs_matmuls"
    markdown = staticmethod(export_det_table)

    def load_fp(self) -> Path:
        from mmdet.registry import MODELS

        checkpoint = Path(Config.fromfile(self.args.w8[0]).load_from)
        fp = MODELS.build(self.w8_runner.cfg.model).eval()
        load_weights_strict(fp, checkpoint)
        self.fp_dense = DetectorFeatures(fp).eval()
        return checkpoint

    def measure_before_int8(self) -> None:
        self.floors = {
            "w8a8": perturbed_maps(self.w8_runner),
            "w8a8_int8": None,
            "w4a4_uint4": perturbed_maps(self.w4_runner),
        }

    def export_fp(self, reports: dict) -> None:
        # the size the quantized exports were made at: the test pipeline's padded size
        self.input_size = tuple(reports["w8a8"]["parity"]["input_size"])
        example = torch.zeros(1, 3, *self.input_size)
        export_onnx(self.fp_dense, example, self.files["fp32"], dynamic_batch=False)

    def variants(self, checkpoint: Path, reports: dict) -> dict[str, dict]:
        rows = {
            "FP32 PyTorch": {"bytes": checkpoint},
            EXPORTED["fp32"]: {"onnx": self.files["fp32"]},
            W8_UNIFORM: {"bytes": saved_model_path(self.args.w8[1])},
            W4_FAKE: {"bytes": saved_model_path(self.args.w4[1])},
        }
        for key in ("w8a8", "w8a8_int8", "w4a4_uint4"):
            rows[EXPORTED[key]] = {
                "onnx": self.files[key],
                "parity": reports[key]["parity"],
                "rounding_floor": self.floors[key],
            }
        return rows

    def timed_models(self) -> dict[str, torch.nn.Module]:
        return {
            "FP32 PyTorch": self.fp_dense,
            W8_UNIFORM: DetectorFeatures(self.w8_runner.model).eval(),
            W4_FAKE: DetectorFeatures(self.w4_runner.model).eval(),
        }

    def onnx_runner(self, path: Path, threads: int) -> Callable[[torch.Tensor], object]:
        return FixedSizeRunner(cpu_session(path, threads))

    def summary(self, checkpoint: Path, reports: dict, variants: dict) -> dict:
        return {
            "model": {"config": self.args.w8[0], "checkpoint": str(checkpoint)},
            "exported": reports["w8a8"]["runs_in"],
            "input_size": reports["w8a8"]["parity"]["input_size"],
            "val_images": reports["w8a8"]["parity"]["images"],
            "rounding_floor_method": f"PyTorch fake-quant, input x (1 + {NOISE:g} N(0,1)), "
            "2 seeds",
        }


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


class SizesBenchmark:
    """``--models sizes``: latency at the sizes people deploy, random weights (latency does
    not depend on them): DeiT-S and ViT-B at 224x224, batch 1 and 32, and the Swin-T Mask
    R-CNN's backbone and neck at 800x1344, batch 1. Each model W8A8 (weights per channel,
    activations per tensor, 8-bit uniform post-softmax: every matmul can run as integers),
    calibrated on a few random images, exported ``--int8`` with uint8 weight codes (the
    default) and with int8 ones (``--signed-weights``), against the FP32 export of the same
    model, in onnxruntime at each ``--threads``; then onnxruntime's profile of one run of
    each at batch 1 (1 thread): the time per operator type, which says what each float
    island and each quantize costs."""

    kind = "sizes"
    defaults = {"threads": [1, 2], "out": "benchmarks/export_sizes"}
    models = {
        "DeiT-S": ("deit_small_patch16_224", (224, 224), (1, 32)),
        "ViT-B": ("vit_base_patch16_224", (224, 224), (1, 32)),
        "Swin-T Mask R-CNN backbone+neck": (SWIN_T_DETECTOR, (800, 1344), (1,)),
    }

    def __init__(self, args: argparse.Namespace):
        self.args = args

    def build(self, arch: str) -> torch.nn.Module:
        if arch == SWIN_T_DETECTOR:
            from mmdet.registry import MODELS
            from mmdet.utils import register_all_modules

            register_all_modules()
            return DetectorFeatures(MODELS.build(Config.fromfile(arch).model)).eval()
        return create_timm_model(arch).eval()

    def run(self) -> int:
        torch.manual_seed(0)
        rows, exports = [], {}
        for name, (arch, size, batches) in self.models.items():
            print(f"{name}: building, calibrating and exporting", flush=True)
            fp = self.build(arch)
            files = {
                key: ONNX_DIR / f"sizes_{arch.split('/')[-1]}_{key}.onnx"
                for key in ("fp32", "int8", "int8_signed")
            }
            fixed = arch == SWIN_T_DETECTOR  # Swin's window masks depend on the input size
            example = torch.randn(1, 3, *size)
            export_onnx(fp, example, files["fp32"], dynamic_batch=not fixed)
            calib = [torch.randn(2, 3, *size) for _ in range(2)]
            scope = ["backbone", "neck"] if fixed else None
            config = QuantConfig(w_bits=8, a_bits=8, post_softmax="uniform")
            prepare_calibrated(fp, config, lambda m, calib=calib: [m(x) for x in calib], scope)
            for key, signed in (("int8", False), ("int8_signed", True)):
                export_onnx(
                    fp,
                    example,
                    files[key],
                    int8=True,
                    dynamic_batch=not fixed,
                    signed_weights=signed,
                )
            for threads in self.args.threads:
                for batch in batches:
                    print(f"{name}: timing batch {batch}, {threads} thread(s)", flush=True)
                    runners = {key: outputs_fn(path, threads) for key, path in files.items()}
                    ms = latency_ms(runners, (batch, 3, *size), self.args.rounds, self.args.iters)
                    rows.append(
                        {
                            "model": name,
                            "arch": arch,
                            "input_size": list(size),
                            "batch": batch,
                            "threads": threads,
                            **{f"{key}_ms": t for key, t in ms.items()},
                            "speedup": ms["fp32"] / ms["int8"],
                            "speedup_signed": ms["fp32"] / ms["int8_signed"],
                        }
                    )
            outputs = {key: outputs_fn(files[key], 1)(example) for key in ("int8", "int8_signed")}
            exports[name] = {
                "bytes": {key: path.stat().st_size for key, path in files.items()},
                "onnxruntime_ops": {key: optimized_op_counts(path) for key, path in files.items()},
                "signed_vs_unsigned_max_abs_diff": max(
                    float((a - b).abs().max()) for a, b in zip(*outputs.values())
                ),
                "profile_batch1_threads1": {
                    key: op_time_shares(path, example) for key, path in files.items()
                },
            }
        results = {
            "models": rows,
            "exports": exports,
            "quantization": "W8A8, weights per channel, activations per tensor, 8-bit uniform "
            "post-softmax; calibrated on 4 random images; random weights",
            "latency_method": f"median of {self.args.rounds} rounds x {self.args.iters} calls, "
            "FP32 and int8 interleaved",
            "session_options": {t: describe_options(session_options(t)) for t in self.args.threads},
            "machine": machine_record(),
            "versions": package_versions((*PACKAGES, "onnxruntime", "numpy")),
        }
        print(write_benchmark(self.args.out, results, export_sizes_table(results)))
        return 0


def outputs_fn(path: Path, threads: int) -> Callable[[torch.Tensor], list[torch.Tensor]]:
    session = cpu_session(path, threads)
    return lambda x: run_outputs(session, x)


KINDS = {bench.kind: bench for bench in (ViTBenchmark, DetBenchmark, SizesBenchmark)}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--models", choices=sorted(KINDS), default="vit")
    p.add_argument("--w8", nargs=2, metavar=("CONFIG", "QUANTIZED"))
    p.add_argument("--w4", nargs=2, metavar=("CONFIG", "QUANTIZED"))
    p.add_argument("--threads", nargs="+", type=int, help="default: 1 2 (vit, sizes), 1 (det)")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--iters", type=int, default=10)
    p.add_argument(
        "--out",
        help="default: benchmarks/export (vit), benchmarks/export_det (det), "
        "benchmarks/export_sizes (sizes)",
    )
    args = p.parse_args(argv)
    bench = KINDS[args.models]
    for key, default in bench.defaults.items():
        if getattr(args, key) is None:
            setattr(args, key, default)
    return bench(args).run()


if __name__ == "__main__":
    sys.exit(main())
