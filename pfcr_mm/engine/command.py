"""What the command-line tools share: the config of a ``tools/ptq.py`` run built from its
arguments and checked before anything is built, the process group of a CPU launch, and a user
error as the one line the tools print (exit code 2)."""

from __future__ import annotations

import argparse
import datetime
import itertools
import os
import signal
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
from mmengine.config import Config

from ..atomic import DiskFullError
from ..settings import PTQConfig
from .calib_split import calib_dataset_cfg
from .checkpoint import check_is_file
from .config_check import check_config_keys
from .detection import check_coco_dataset, coco_paths, write_subset_annotations
from .resume import RESUME_FILE, resumable_run

_RUNS = itertools.count()  # runs built in this process

# what a user's input or machine can cause; FloatingPointError: a reconstruction stopped on a
# non-finite loss (the model left unsaved)
USER_ERRORS = (FileNotFoundError, KeyError, ValueError, FloatingPointError, DiskFullError)
# How long a process of a distributed run waits for another (env_cfg.dist_cfg.timeout, seconds):
# in a collective, or for the heartbeat of rank 0 while it reconstructs alone for hours, and of
# the others meanwhile (pfcr_mm.distributed). Minutes: a process that stopped stops the run soon;
# long enough for rank 0 to compute the COCO metrics while the others wait.
DIST_TIMEOUT_S = 600


def error_line(err: BaseException) -> str:
    """``error (Type): cause``: the message of a user error in one line."""
    message = str(err.args[0] if isinstance(err, KeyError) and err.args else err)
    # raised in a DataLoader worker, the error comes with the worker's traceback: the cause is
    # its last line
    cause = message.strip().splitlines()[-1] if message.strip() else type(err).__name__
    return f"error ({type(err).__name__}): {cause}"


class Terminated(Exception):
    """The process was sent SIGTERM (what a scheduler sends before it kills a job)."""

    def __init__(self):
        super().__init__("SIGTERM")


@contextmanager
def sigterm_raises() -> Iterator[None]:
    """Inside, SIGTERM raises :class:`Terminated` where the run is, so that it unwinds as any
    error does (a reconstruction unit restored, its log closed) and can say how to continue."""

    def terminate(signum, frame) -> None:
        raise Terminated()

    if threading.current_thread() is not threading.main_thread():
        yield  # only the main thread may set a signal handler
        return
    previous = signal.signal(signal.SIGTERM, terminate)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def stopped_line(run: Path | None, cause: Exception) -> str:
    """What a run stopped from outside left, and how to go on: ``--resume`` where it saved a
    resume checkpoint in its folder ``run``. ``cause``: :class:`Terminated`, or
    :class:`~pfcr_mm.distributed.PeerLost` (another process of a distributed run stopped; the
    run's folder is the one rank 0 writes)."""
    if run is not None and (run / RESUME_FILE).is_file():
        return (
            f"stopped ({cause}): {run} holds the reconstructed units so far; run the same "
            "command with --resume to continue from there"
        )
    where = "before its first reconstructed unit" if run is not None else "before it started"
    return f"stopped ({cause}) {where}: nothing to resume; run the command again"


def set_threads(threads: int | None) -> int:
    """The intra-op threads of this process: ``threads``, else ``OMP_NUM_THREADS``, else 1; set
    and returned. The quantized model's tensors depend on the thread count (floating-point
    sums split differently), and torchrun gives each process 1 thread: with 1 by default, the
    plain command and a distributed launch give the same tensors, and a busy machine is not
    oversubscribed."""
    if threads is None:
        threads = int(os.environ.get("OMP_NUM_THREADS") or 1)
    if threads < 1:
        raise ValueError(
            f"the thread count (--threads, else OMP_NUM_THREADS) must be >= 1, got {threads}"
        )
    torch.set_num_threads(threads)
    return threads


def build_ptq_cfg(args: argparse.Namespace) -> Config:
    """The config with the command line applied and its test loop set to ``pfcr.PTQLoop``;
    missing files, unknown keys, bad ``ptq`` settings and a missing checkpoint fail here, before
    anything is built."""
    cfg, config = _checked_config(args.config, args.cfg_options)
    cfg.work_dir = (
        args.work_dir or cfg.get("work_dir") or str(Path("work_dirs") / Path(args.config).stem)
    )
    if Path(cfg.work_dir).exists() and not Path(cfg.work_dir).is_dir():
        raise ValueError(
            f"the work dir {cfg.work_dir} is a file: pass --work-dir a folder (new or existing)"
        )
    check_writable_folder(Path(cfg.work_dir), "--work-dir")
    resume = None
    if args.resume is not None:
        if args.quantized:
            raise ValueError("--resume continues a quantization: it does not take --quantized")
        resume = resumable_run(cfg.work_dir, args.resume or None)
        cfg.work_dir = str(resume.parent)  # where last_run points at it when it finishes
    # MMEngine keeps a logger and a visualizer per experiment name for the whole process, and
    # its default name repeats for a Runner of the same config in the same second: a name of
    # the run's own keeps a later run in this process from writing through an earlier one's
    name = cfg.get("experiment_name") or Path(args.config).stem
    cfg.experiment_name = f"{name}_{os.getpid()}_{next(_RUNS)}"
    _set_launcher(cfg, args.launcher)
    _set_weights(cfg, args.checkpoint)
    if args.no_fp_eval:
        cfg.ptq.eval_fp = False
    if args.quantized:
        check_is_file(args.quantized, "quantized model")
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


def _checked_config(path: str, options: dict) -> tuple[Config, PTQConfig]:
    """The config file with ``options`` merged in, its ``ptq`` settings and every key checked."""
    check_is_file(path, "config file")
    cfg = Config.fromfile(path)
    _open_unset_dicts(cfg, options)
    try:
        cfg.merge_from_dict(options)
    except TypeError as err:  # a dotted key below a value that is not a dict
        raise ValueError(f"--cfg-options: {err}") from None
    if "ptq" not in cfg:
        raise KeyError(f"{path} has no 'ptq' section; see configs/ for examples")
    config = PTQConfig.from_dict(cfg.ptq)
    check_config_keys(
        cfg,
        {
            "test_dataloader.dataset": cfg.test_dataloader.dataset,
            "ptq.calib.dataset": calib_dataset_cfg(config, cfg.test_dataloader.dataset),
        },
    )
    return cfg, config


def _open_unset_dicts(cfg: Config, options: dict) -> None:
    """Replace by an empty dict each ``None`` of ``cfg`` that a dotted key of ``options`` reaches
    below (``ptq.quant.linear_a_bits.qkv=4`` where the config says ``linear_a_bits=None``): an
    unset dict setting, which mmengine's merge would refuse to open."""
    for key in options:
        node = cfg  # a Config, then ConfigDicts; anything else ends the walk
        for part in key.split(".")[:-1]:
            if not hasattr(node, "get"):
                break
            if part in node and node[part] is None:
                node[part] = {}
                break
            node = node.get(part)


def check_writable_folder(folder: Path, what: str) -> None:
    """Refuse, before any long work, a ``folder`` that cannot be written or created (a
    read-only file system, no permission): checked at its nearest existing ancestor, creating
    nothing."""
    existing = Path(folder).absolute()
    while not existing.exists():
        existing = existing.parent
    if not existing.is_dir() or not os.access(existing, os.W_OK | os.X_OK):
        raise ValueError(
            f"cannot write into {folder} ({existing} is not writable): give {what} a "
            "writable folder"
        )


def _set_launcher(cfg: Config, launcher: str) -> None:
    """The launcher and the process group's settings: the config's ``env_cfg.dist_cfg``, its
    ``timeout`` (seconds) :data:`DIST_TIMEOUT_S` unless it says otherwise."""
    cfg.launcher = launcher
    if launcher != "none":
        # Evaluation only: no DDP (it refuses CPU models); gloo where there is no GPU.
        cfg.model_wrapper_cfg = dict(type="pfcr.PTQModelWrapper")
        dist_cfg = cfg.setdefault("env_cfg", {}).setdefault("dist_cfg", {})
        timeout = dist_cfg.setdefault("timeout", DIST_TIMEOUT_S)
        if isinstance(timeout, bool) or not isinstance(timeout, (int, float)) or timeout <= 0:
            raise ValueError(
                f"env_cfg.dist_cfg.timeout must be a number of seconds > 0, got {timeout!r}"
            )
        if not torch.cuda.is_available():
            dist_cfg["backend"] = "gloo"


def _set_weights(cfg: Config, checkpoint: str | None) -> None:
    """``load_from`` (or a timm classifier's ``model.checkpoint``) from ``CHECKPOINT`` or the
    config, the file checked to exist; a run without weights refused."""
    if checkpoint:
        check_is_file(checkpoint, "checkpoint")
        cfg.load_from = checkpoint
    if cfg.get("load_from") and Path(cfg.load_from).is_dir():
        raise ValueError(
            f"the checkpoint {cfg.load_from} (the config's load_from) is a folder: pass the file "
            "itself"
        )
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


def start_cpu_process_group(cfg: Config) -> None:
    """mmengine's pytorch launcher selects a CUDA device unconditionally: without one, start the
    gloo group here (from torchrun's environment); the Runner then uses it."""
    if cfg.launcher == "pytorch" and not torch.cuda.is_available():
        timeout = datetime.timedelta(seconds=cfg.env_cfg.dist_cfg.timeout)
        torch.distributed.init_process_group("gloo", timeout=timeout)
