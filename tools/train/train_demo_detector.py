"""Train a demo detector: a tiny Swin (or ViTDet) Mask R-CNN on the synthetic COCO shapes set,
on CPU.

    python tools/make_demo_data.py --only detection             # data/demo_coco_shapes (once)
    python tools/train/train_demo_detector.py --time-iters 20  # optional: measure, estimate, stop
    python tools/train/train_demo_detector.py        # checkpoints/demo_mask_rcnn_swin_shapes.*
    python tools/train/train_demo_detector.py \
        --config configs/demo/demo_mask_rcnn_vitdet_shapes.py  # ...demo_mask_rcnn_vitdet_shapes.*

Trains ``--config`` (default ``configs/demo/demo_mask_rcnn_swin_shapes.py``; the checkpoint and
the work dir are named after it) with MMEngine's Runner (seeded, deterministic
algorithms), evaluates bbox and segm mAP on val at the end, and saves a small checkpoint holding
only ``state_dict`` (float32) and a JSON-able ``meta`` (no optimizer state), plus a JSON report.
It then checks the saved file: it loads with ``pfcr_mm.engine.checkpoint.load_checkpoint_file``,
and a fresh Runner built from the config with ``load_from`` set to it reproduces the val metrics
through ``Runner.test()``. ``--verify-only`` repeats that check for an existing checkpoint.
"""

from __future__ import annotations

import argparse
import copy
import json
import platform
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # run from a checkout, uninstalled

from pfcr_mm.demo.coco_shapes import MANIFEST_NAME  # noqa: E402
from pfcr_mm.engine.checkpoint import load_checkpoint_file  # noqa: E402
from pfcr_mm.provenance import file_sha256, package_versions, write_json  # noqa: E402

DEFAULT_CONFIG = "configs/demo/demo_mask_rcnn_swin_shapes.py"
MAX_CHECKPOINT_BYTES = 10 * 1024 * 1024
# The metrics compared between the end of training and the reloaded checkpoint.
KEY_METRICS = ("coco/bbox_mAP", "coco/bbox_mAP_50", "coco/segm_mAP", "coco/segm_mAP_50")


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--config", default=DEFAULT_CONFIG)
    p.add_argument(
        "--out",
        default=None,
        help="checkpoint path (default checkpoints/<config name>.pth); the JSON report goes "
        "next to it",
    )
    p.add_argument("--work-dir", default=None, help="default work_dirs/<config name>")
    p.add_argument("--epochs", type=int, default=None, help="override the config's max_epochs")
    p.add_argument("--lr", type=float, default=None, help="override the config's AdamW lr")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--no-deterministic",
        action="store_true",
        help="do not ask torch for deterministic algorithms (the run stays seeded)",
    )
    # CPU results repeat bit for bit only at a fixed thread count (it sets the reduction order),
    # so the default is a fixed number. One thread: on the 2-core machine the schedule was sized
    # on, two threads collapse (3-10 s/iter instead of ~0.5) as soon as another process holds a
    # core, because the OpenMP threads wait on each other.
    p.add_argument("--threads", type=int, default=1)
    p.add_argument(
        "--time-iters",
        type=int,
        default=0,
        help="only time this many training iterations, print the estimated total, and stop",
    )
    p.add_argument(
        "--verify-only", action="store_true", help="only check an existing checkpoint (--out)"
    )
    args = p.parse_args()
    name = Path(args.config).stem
    args.out = args.out or f"checkpoints/{name}.pth"
    args.work_dir = args.work_dir or f"work_dirs/{name}"
    return args


def versions() -> dict:
    """Python's and the packages' versions, and the operating system."""
    packages = ("torch", "mmengine", "mmcv", "mmdet", "numpy")
    return {**package_versions(packages), "platform": platform.platform()}


def load_config(args: argparse.Namespace, work_dir: str):
    """The config with the command line's overrides; schedule ends follow ``--epochs``."""
    from mmengine.config import Config

    cfg = Config.fromfile(args.config)
    cfg.work_dir = work_dir
    cfg.randomness = dict(seed=args.seed, deterministic=not args.no_deterministic)
    if args.epochs is not None:
        cfg.max_epochs = args.epochs
        cfg.train_cfg.max_epochs = args.epochs
        cfg.train_cfg.val_interval = args.epochs
        cfg.default_hooks.checkpoint.interval = args.epochs
        for sched in cfg.param_scheduler:
            if sched.get("by_epoch", True):  # the epoch-based part spans the whole run
                sched.end = args.epochs
                if "T_max" in sched:
                    sched.T_max = args.epochs
    if args.lr is not None:
        cfg.optim_wrapper.optimizer.lr = args.lr
    return cfg


def metric_dict(metrics: dict) -> dict:
    """COCO metrics as plain floats (mmdet reports them on the 0-1 scale)."""
    return {k: float(v) for k, v in metrics.items() if isinstance(v, (int, float, np.floating))}


def build_runner(cfg):
    from mmengine.runner import Runner

    runner = Runner.from_cfg(cfg)
    # Deterministic mode also fills each new tensor with NaN; every op here writes what it
    # reads, so the fill only costs time (set after the Runner, which turns the mode on).
    torch.utils.deterministic.fill_uninitialized_memory = False
    return runner


def time_iterations(cfg, n: int) -> None:
    """Run ``n`` training iterations, print seconds per iteration and the estimated total."""
    from mmengine.hooks import Hook

    class _Stop(Exception):
        pass

    class _Timer(Hook):
        def __init__(self) -> None:
            self.stamps: list[float] = []

        def after_train_iter(self, runner, batch_idx, data_batch=None, outputs=None) -> None:
            self.stamps.append(time.perf_counter())
            if len(self.stamps) > n:
                raise _Stop

    cfg = copy.deepcopy(cfg)
    cfg.default_hooks.logger.interval = 5
    runner = build_runner(cfg)
    timer = _Timer()
    runner.register_hook(timer, priority="LOWEST")
    try:
        runner.train()
    except _Stop:
        pass
    per_iter = float(np.median(np.diff(timer.stamps)))  # the first iteration's setup excluded
    iters_per_epoch = len(runner.train_dataloader)
    epochs = cfg.train_cfg.max_epochs
    total = per_iter * iters_per_epoch * epochs
    print(
        f"timing: {per_iter:.3f} s/iter (median of {len(timer.stamps) - 1}), "
        f"{iters_per_epoch} iters/epoch, {epochs} epochs -> {total / 60:.1f} min of training "
        "(plus evaluation)"
    )


def verify(cfg, out: Path, expected: dict | None, work_dir: str) -> dict:
    """Load ``out`` safely, then test a fresh Runner with ``load_from=out``; returns metrics."""
    checkpoint = load_checkpoint_file(out)
    keys = sorted(checkpoint)
    if keys != ["meta", "state_dict"]:
        raise SystemExit(f"{out}: expected keys ['meta', 'state_dict'], found {keys}")
    print(
        f"verify: {out} loads with load_checkpoint_file (weights_only=True): "
        f"{len(checkpoint['state_dict'])} tensors"
    )
    cfg = copy.deepcopy(cfg)
    cfg.work_dir = work_dir
    cfg.load_from = str(out)
    runner = build_runner(cfg)
    start = time.perf_counter()
    metrics = metric_dict(runner.test())
    seconds = time.perf_counter() - start
    result = {"metrics": metrics, "seconds": seconds}
    if expected is not None:
        diffs = {k: abs(metrics[k] - expected[k]) for k in KEY_METRICS}
        result["max_abs_diff"] = max(diffs.values())
        result["reproduced"] = result["max_abs_diff"] == 0.0
        print(
            "verify: Runner.from_cfg(cfg).test() with load_from -> "
            + ", ".join(f"{k} {metrics[k]:.3f}" for k in KEY_METRICS)
            + f"; max |diff| vs end of training {result['max_abs_diff']:.2e}"
        )
    return result


def main() -> None:
    args = parse_args()
    torch.set_num_threads(args.threads)
    from mmengine.hooks import Hook
    from mmengine.model import is_model_wrapper

    out = Path(args.out)
    report_path = out.with_suffix(".json")
    cfg = load_config(args, args.work_dir)

    if args.verify_only:
        report = json.loads(report_path.read_text()) if report_path.is_file() else {}
        expected = report.get("val_metrics")
        verify(cfg, out, expected, str(Path(args.work_dir) / "verify"))
        return

    data_root = Path(cfg.train_dataloader.dataset.data_root)
    manifest_path = data_root / MANIFEST_NAME
    if not manifest_path.is_file():
        raise SystemExit(
            f"no demo data at {data_root} ({MANIFEST_NAME} missing); run "
            f"`python tools/make_demo_data.py --only detection` first"
        )
    manifest = json.loads(manifest_path.read_text())

    if args.time_iters:
        time_iterations(cfg, args.time_iters)
        return

    class _KeepValMetrics(Hook):
        """Keeps the metrics of the last validation (the one at the end of training)."""

        def __init__(self) -> None:
            self.metrics: dict = {}
            self.seconds = 0.0
            self._start = 0.0

        def before_val_epoch(self, runner) -> None:
            self._start = time.perf_counter()

        def after_val_epoch(self, runner, metrics=None) -> None:
            self.metrics = metric_dict(metrics or {})
            self.seconds = time.perf_counter() - self._start

    runner = build_runner(cfg)
    keeper = _KeepValMetrics()
    runner.register_hook(keeper, priority="LOWEST")
    model = runner.model.module if is_model_wrapper(runner.model) else runner.model
    n_params = sum(p.numel() for p in model.parameters())
    iters_per_epoch = len(runner.train_dataloader)
    print(
        f"training {args.config}: {n_params / 1e6:.3f} M parameters, "
        f"{cfg.train_cfg.max_epochs} epochs x {iters_per_epoch} iters "
        f"(batch {cfg.train_dataloader.batch_size}), {args.threads} threads, "
        f"seed {args.seed}, deterministic={not args.no_deterministic}",
        flush=True,
    )
    start = time.perf_counter()
    runner.train()
    wall = time.perf_counter() - start
    if not keeper.metrics:
        raise SystemExit("training ended without a validation; check train_cfg.val_interval")
    val = keeper.metrics

    dataset_meta = runner.train_dataloader.dataset.metainfo
    classes = list(dataset_meta["classes"])
    meta = {
        "config": args.config,
        "dataset_meta": {
            "classes": classes,
            "palette": [list(c) for c in dataset_meta.get("palette", [])[: len(classes)]],
        },
        "epochs": runner.epoch,
        "iters": runner.iter,
        "seed": args.seed,
        "val": {k: val[k] for k in KEY_METRICS},
        "mmdet_version": versions()["mmdet"],
    }
    state = {k: v.detach().to(torch.float32).contiguous() for k, v in model.state_dict().items()}
    out.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"state_dict": state, "meta": meta}, out)
    size = out.stat().st_size
    if size > MAX_CHECKPOINT_BYTES:
        raise SystemExit(f"checkpoint {out} is {size} bytes, over the {MAX_CHECKPOINT_BYTES} limit")
    print(
        f"saved {out}: {size} bytes, val bbox_mAP {val['coco/bbox_mAP']:.3f}, "
        f"segm_mAP {val['coco/segm_mAP']:.3f}, {wall / 60:.1f} min",
        flush=True,
    )

    check = verify(cfg, out, val, str(Path(args.work_dir) / "verify"))

    optim = cfg.optim_wrapper.optimizer
    report = {
        "checkpoint": out.name,
        "checkpoint_bytes": size,
        "checkpoint_sha256": file_sha256(out),
        "config": args.config,
        "config_sha256": file_sha256(Path(args.config)),
        "num_parameters": n_params,
        "classes": classes,
        "data": {
            "root": str(data_root),
            "seed": manifest.get("seed"),
            "image_size": manifest.get("image_size"),
            "num_images": manifest.get("num_images"),
            "num_instances": manifest.get("num_instances"),
            "sha256": manifest.get("sha256"),
            "generator_version": manifest.get("generator_version"),
        },
        "settings": {
            "seed": args.seed,
            "deterministic": not args.no_deterministic,
            "threads": args.threads,
            "batch_size": cfg.train_dataloader.batch_size,
            "optimizer": {k: v for k, v in optim.items()},
            "clip_grad": cfg.optim_wrapper.get("clip_grad"),
            "param_scheduler": [dict(s) for s in cfg.param_scheduler],
        },
        "epochs": runner.epoch,
        "iters": runner.iter,
        "iters_per_epoch": iters_per_epoch,
        "train_wall_seconds": wall,  # includes the final validation
        "val_seconds": keeper.seconds,
        "val_metrics": val,  # mmdet's 0-1 scale
        "bbox_mAP": val["coco/bbox_mAP"],
        "segm_mAP": val["coco/segm_mAP"],
        "reload_check": check,
        "versions": versions(),
    }
    write_json(report_path, report, indent=2)
    print(
        f"wrote {report_path}: {runner.epoch} epochs / {runner.iter} iters in {wall / 60:.1f} min, "
        f"val bbox_mAP {report['bbox_mAP']:.3f}, segm_mAP {report['segm_mAP']:.3f}, "
        f"reload reproduced: {check.get('reproduced')}"
    )


if __name__ == "__main__":
    main()
