"""Post-training quantization of an MMEngine model: FP evaluation, quantization, quantized
evaluation, in the shape of mmdet's ``tools/test.py``: the config's test loop becomes
``pfcr.PTQLoop`` and the Runner runs it. Each run writes into its own folder
``<work_dir>/<YYYYmmdd_HHMMSS>/`` (results in ``ptq_results.json``, the quantized model in
``quantized_model.pth``); ``<work_dir>/last_run`` names the last one that finished.
``--resume`` continues a ``block``/``pfcr`` run that stopped, in its own folder, from its last
reconstructed unit (the same command line, plus ``--resume`` or ``--resume RUN_DIR``).

    python tools/ptq.py CONFIG [CHECKPOINT] [--work-dir DIR] [--cfg-options k=v ...]
                        [--no-fp-eval] [--quantized SAVED_QUANTIZED_MODEL] [--eval-images N]
                        [--resume [RUN_DIR]] [--launcher {none,pytorch,slurm,mpi}]
"""

from __future__ import annotations

import argparse
import datetime
import sys
from pathlib import Path

import torch
from mmengine.config import Config, DictAction
from mmengine.runner import Runner

from pfcr_mm.core import PTQConfig
from pfcr_mm.engine.config_check import check_config_keys
from pfcr_mm.engine.detection import check_coco_dataset, coco_paths, write_subset_annotations
from pfcr_mm.engine.ptq import calib_dataset_cfg
from pfcr_mm.engine.resume import resumable_run


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
    p.add_argument(
        "--resume",
        nargs="?",
        const="",
        metavar="RUN_DIR",
        help="continue the last run of the work dir that stopped during reconstruction (or the "
        "run folder RUN_DIR) from its last finished unit; the config must be the run's own",
    )
    p.add_argument("--launcher", choices=["none", "pytorch", "slurm", "mpi"], default="none")
    p.add_argument("--local_rank", "--local-rank", type=int, default=0, help=argparse.SUPPRESS)
    return p.parse_args(argv)


def build_cfg(args: argparse.Namespace) -> Config:
    """The config with the command line applied and its test loop set to ``pfcr.PTQLoop``;
    missing files, unknown keys, bad ``ptq`` settings and a missing checkpoint fail here, before
    anything is built."""
    if not Path(args.config).is_file():
        raise FileNotFoundError(f"config file not found: {args.config}")
    cfg = Config.fromfile(args.config)
    cfg.merge_from_dict(args.cfg_options)
    if "ptq" not in cfg:
        raise KeyError(f"{args.config} has no 'ptq' section; see configs/ for examples")
    config = PTQConfig.from_dict(cfg.ptq)
    check_config_keys(
        cfg,
        {
            "test_dataloader.dataset": cfg.test_dataloader.dataset,
            "ptq.calib.dataset": calib_dataset_cfg(config, cfg.test_dataloader.dataset),
        },
    )
    cfg.work_dir = (
        args.work_dir or cfg.get("work_dir") or str(Path("work_dirs") / Path(args.config).stem)
    )
    resume = None
    if args.resume is not None:
        if args.quantized:
            raise ValueError("--resume continues a quantization: it does not take --quantized")
        resume = resumable_run(cfg.work_dir, args.resume or None)
        cfg.work_dir = str(resume.parent)  # where last_run points at it when it finishes
    cfg.launcher = args.launcher
    if args.launcher != "none":
        # Evaluation only: no DDP (it refuses CPU models); gloo where there is no GPU; rank 0
        # reconstructs for hours at paper-grade budgets while the others wait for its result.
        cfg.model_wrapper_cfg = dict(type="pfcr.PTQModelWrapper")
        dist_cfg = cfg.setdefault("env_cfg", {}).setdefault("dist_cfg", {})
        dist_cfg.setdefault("timeout", 7 * 24 * 3600)
        if not torch.cuda.is_available():
            dist_cfg["backend"] = "gloo"
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
    if "checkpoint" in cfg.model and cfg.get("load_from"):
        # a model that loads its own weights (pfcr.TimmClassifier: a timm state dict, or a
        # training checkpoint of the wrapper) gets them as its checkpoint
        cfg.model.checkpoint, cfg.load_from = cfg.load_from, None
    check_weights_given(cfg)
    if args.quantized and not Path(args.quantized).is_file():
        raise FileNotFoundError(f"quantized model not found: {args.quantized}")
    if args.eval_images is not None and args.eval_images < 1:
        raise ValueError(f"--eval-images must be >= 1, got {args.eval_images}")
    if cfg.get("task") == "detection":
        check_coco_dataset(cfg.test_dataloader.dataset, "evaluation")
        check_coco_dataset(calib_dataset_cfg(config, cfg.test_dataloader.dataset), "calibration")
        if args.eval_images is not None:
            restrict_evaluation(cfg, args.eval_images)
    elif args.eval_images is not None:
        raise ValueError("--eval-images applies to COCO detection configs only")
    # The loop loads the checkpoint strictly (mmengine's load_from would not), then runs.
    cfg.test_cfg = dict(
        type="pfcr.PTQLoop",
        checkpoint=cfg.get("load_from"),
        quantized=args.quantized,
        eval_images=args.eval_images,
        resume=None if resume is None else str(resume),
    )
    cfg.load_from = None
    return cfg


def check_weights_given(cfg: Config) -> None:
    """Refuse a run without weights (no CHECKPOINT, ``load_from`` or ``model.checkpoint``): it
    would quantize and report a randomly initialised model, unless the config says
    ``allow_random_init=True``."""
    allow = cfg.get("allow_random_init", False)
    if not isinstance(allow, bool):
        raise ValueError(f"allow_random_init must be True or False, got {allow!r}")
    if not (cfg.get("load_from") or cfg.model.get("checkpoint") or allow):
        raise ValueError(
            "no checkpoint: pass CHECKPOINT or set load_from (model.checkpoint for a timm "
            "classifier) in the config; to quantize randomly initialised weights on purpose, "
            "set allow_random_init=True"
        )


def restrict_evaluation(cfg: Config, num_images: int) -> None:
    """Point the test dataset and the metric at an annotation file of the first images only."""
    work_dir = Path(cfg.work_dir)
    work_dir.mkdir(parents=True, exist_ok=True)
    ann, _ = coco_paths(cfg.test_dataloader.dataset)
    subset = work_dir / f"eval_subset_{num_images}.json"
    write_subset_annotations(ann, num_images, subset)
    cfg.test_dataloader.dataset.ann_file = str(subset.resolve())
    cfg.test_evaluator.ann_file = str(subset.resolve())


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        cfg = build_cfg(args)
        if cfg.launcher == "pytorch" and not torch.cuda.is_available():
            # mmengine's pytorch launcher selects a CUDA device unconditionally: without one,
            # start the gloo group here (from torchrun's environment); the Runner then uses it.
            timeout = datetime.timedelta(seconds=cfg.env_cfg.dist_cfg.timeout)
            torch.distributed.init_process_group("gloo", timeout=timeout)
        Runner.from_cfg(cfg).test()
    # FloatingPointError: reconstruction stopped on a non-finite loss (the model left unsaved)
    except (FileNotFoundError, KeyError, ValueError, FloatingPointError) as err:
        message = str(err.args[0] if isinstance(err, KeyError) and err.args else err)
        # raised in a DataLoader worker, the error comes with the worker's traceback: the cause
        # is its last line
        cause = message.strip().splitlines()[-1] if message.strip() else type(err).__name__
        print(f"error ({type(err).__name__}): {cause}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
