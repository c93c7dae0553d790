"""Post-training quantization of an MMEngine model: FP evaluation, quantization, quantized
evaluation; results in ``<work_dir>/ptq_results.json``, the quantized model in
``<work_dir>/quantized_model.pth``.

    python tools/ptq.py CONFIG [CHECKPOINT] [--work-dir DIR] [--cfg-options k=v ...]
                        [--no-fp-eval] [--quantized SAVED_QUANTIZED_MODEL]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from mmengine.config import Config, DictAction
from mmengine.runner import Runner

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run from a source checkout without installing
    sys.path.insert(0, str(ROOT))

from pfcr_mm.adapters import find_blocks  # noqa: E402
from pfcr_mm.engine.checkpoint import load_weights_strict  # noqa: E402
from pfcr_mm.engine.detection import (  # noqa: E402
    check_coco_dataset,
    coco_paths,
    write_subset_annotations,
)
from pfcr_mm.engine.ptq import (  # noqa: E402
    PTQSettings,
    load_quantized_model,
    output_error,
    package_versions,
    quantize_runner_model,
    save_quantized_model,
    unwrap_model,
    write_results,
)
from pfcr_mm.recon import peak_memory_mb  # noqa: E402


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("config", help="config file")
    p.add_argument("checkpoint", nargs="?", help="model checkpoint (sets load_from)")
    p.add_argument("--work-dir", help="where results go (default: work_dirs/<config name>)")
    p.add_argument(
        "--cfg-options",
        nargs="+",
        action=DictAction,
        default={},
        help="override config keys, e.g. ptq.quant.w_bits=3",
    )
    p.add_argument("--no-fp-eval", action="store_true", help="skip the FP evaluation")
    p.add_argument(
        "--quantized",
        help="evaluate a quantized model saved by an earlier run instead of calibrating",
    )
    p.add_argument(
        "--eval-images",
        type=int,
        help="COCO: evaluate on the first N images only, against their own annotations",
    )
    p.add_argument("--launcher", choices=["none", "pytorch", "slurm", "mpi"], default="none")
    return p.parse_args(argv)


def build_cfg(args: argparse.Namespace) -> Config:
    if not Path(args.config).is_file():
        raise FileNotFoundError(f"config file not found: {args.config}")
    cfg = Config.fromfile(args.config)
    cfg.merge_from_dict(args.cfg_options)
    if "ptq" not in cfg:
        raise KeyError(f"{args.config} has no 'ptq' section; see configs/ for examples")
    cfg.work_dir = (
        args.work_dir or cfg.get("work_dir") or str(Path("work_dirs") / Path(args.config).stem)
    )
    cfg.launcher = args.launcher
    if args.checkpoint:
        if not Path(args.checkpoint).is_file():
            raise FileNotFoundError(f"checkpoint not found: {args.checkpoint}")
        cfg.load_from = args.checkpoint
    if args.no_fp_eval:
        cfg.ptq.eval_fp = False
    if cfg.get("load_from") and not Path(cfg.load_from).is_file():
        raise FileNotFoundError(
            f"checkpoint not found: {cfg.load_from} (the config's load_from; put the file there "
            "or pass another one as the CHECKPOINT argument)"
        )
    if cfg.get("task") == "detection":
        settings = PTQSettings.from_cfg(cfg.ptq)
        check_coco_dataset(cfg.test_dataloader.dataset, "evaluation")
        check_coco_dataset(settings.calib_dataset_cfg(cfg.test_dataloader.dataset), "calibration")
        if args.eval_images:
            restrict_evaluation(cfg, args.eval_images)
    elif args.eval_images:
        raise ValueError("--eval-images applies to COCO detection configs only")
    return cfg


def restrict_evaluation(cfg: Config, num_images: int) -> None:
    """Point the test dataset and the metric at an annotation file of the first images only."""
    work_dir = Path(cfg.work_dir)
    work_dir.mkdir(parents=True, exist_ok=True)
    ann, _ = coco_paths(cfg.test_dataloader.dataset)
    subset = work_dir / f"eval_subset_{num_images}.json"
    write_subset_annotations(ann, num_images, subset)
    cfg.test_dataloader.dataset.ann_file = str(subset.resolve())
    cfg.test_evaluator.ann_file = str(subset.resolve())


def run(cfg: Config, quantized: str | None = None) -> dict:
    settings = PTQSettings.from_cfg(cfg.ptq)
    runner = Runner.from_cfg(cfg)
    loop = runner.test_loop
    # an unsupported model or scope fails now, before the FP evaluation
    find_blocks(unwrap_model(runner.model), settings.scope_modules)
    runner.call_hook("before_run")
    if cfg.get("load_from"):
        # strict: a checkpoint of another model must fail here, not evaluate as garbage
        load_weights_strict(unwrap_model(runner.model), cfg.load_from)
    times = {}
    fp = None
    if settings.eval_fp:
        t = time.time()
        fp = loop.run()
        times["fp_eval"] = time.time() - t
    t = time.time()
    work_dir = Path(cfg.work_dir)
    if quantized:
        _, saved = load_quantized_model(runner, settings, quantized)
        indices, recon = saved["calib_indices"], saved.get("recon", {})
    else:
        _, indices, recon = quantize_runner_model(runner, settings)
        save_quantized_model(runner, settings, indices, recon, work_dir / "quantized_model.pth")
    times["quantize"] = time.time() - t
    t = time.time()
    quant = loop.run()
    times["quant_eval"] = time.time() - t
    error = output_error(unwrap_model(runner.model), loop.dataloader)
    runner.call_hook("after_run")
    results = {
        "task": cfg.get("task", "classification"),
        "method": settings.method,
        "w_bits": settings.quant.w_bits,
        "a_bits": settings.quant.a_bits,
        "scope": settings.scope,
        "quant_config": settings.quant.to_dict(),
        "recon": recon,
        "fp": fp,
        "quant": quant,
        "output_error": error,
        "calib_indices": indices,
        "time_s": times,
        "peak_mem_mb": peak_memory_mb(),
        "versions": package_versions(),
        "config": cfg.filename,
        "quantized_model": str(quantized or work_dir / "quantized_model.pth"),
    }
    path = write_results(work_dir / "ptq_results.json", results)
    cfg.dump(str(work_dir / "ptq_config.py"))
    print_table(results)
    print(f"results: {path}")
    return results


def print_table(results: dict) -> None:
    setting = f"W{results['w_bits']}A{results['a_bits']}"
    print(f"\n{'metric':28s} {'FP':>10s} {setting:>10s}")
    for name, value in results["quant"].items():
        if isinstance(value, (int, float)):
            fp = results["fp"][name] if results["fp"] else float("nan")
            print(f"{name:28s} {fp:10.4g} {value:10.4g}")
    times = ", ".join(f"{k} {v:.1f} s" for k, v in results["time_s"].items())
    error = results["output_error"]
    print(
        f"output error on {error['images']} evaluation images ({error['outputs']}): relative MSE "
        f"{error['relative_mse']:.4g}"
    )
    print(
        f"method {results['method']}, scope {results['scope']}; {times}; "
        f"peak host memory {results['peak_mem_mb']['host_rss']:.0f} MiB"
    )


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        cfg = build_cfg(args)
        run(cfg, args.quantized)
    except (FileNotFoundError, KeyError, ValueError) as err:
        message = err.args[0] if isinstance(err, KeyError) and err.args else err
        print(f"error ({type(err).__name__}): {message}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
