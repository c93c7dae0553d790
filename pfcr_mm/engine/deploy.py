"""The MMEngine side of an ONNX export: a config and a saved ``quantized_model.pth`` turned into
the quantized model, the calibration images for ``--int8``, and the export report.

A timm classifier is exported whole. An MMDetection detector is exported in its dense part,
backbone and neck (:class:`DetectorFeatures`: image -> FPN levels), at one fixed input size;
its RPN and RoI heads stay the PyTorch quantized modules (RoIAlign, NMS and the box and mask
post-processing have no simple ONNX form), fed by onnxruntime's FPN levels
(:func:`evaluate_detector` with a :class:`~pfcr_mm.export.runtime.FixedSizeRunner`), so box
and mask mAP are computed through onnxruntime.

``tools/export.py`` and ``tools/benchmarks/benchmark_export.py`` both go through
:func:`build_quantized` and :func:`export_quantized`.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
from mmengine.config import Config
from mmengine.logging import print_log
from mmengine.runner import Runner
from torch import nn

from ..atomic import atomic_path
from ..export import export_onnx, uniform_post_softmax
from ..export.runtime import FixedSizeRunner, cpu_session, pad_images, run_session
from ..quant.modules import QUANT_LAYERS
from ..settings import PTQConfig
from .calib_split import calibration_loader
from .checkpoint import check_is_file
from .runner_io import PreprocessedBatches, run_batch, unwrap_model
from .saved_model import load_quantized_model


def build_quantized(
    config: str | Path, quantized: str | Path, work_dir: str | Path, cfg_options: dict | None = None
) -> tuple[Runner, PTQConfig]:
    """A Runner of ``config`` whose model is the saved quantized model ``quantized``.

    Raises FileNotFoundError for a missing file, ValueError for a quantized model of other
    settings or an unsupported model, KeyError for a quantized model of another model."""
    check_is_file(config, "config file")
    check_is_file(quantized, "quantized model")
    cfg = Config.fromfile(str(config))
    cfg.merge_from_dict(cfg_options or {})
    cfg.work_dir = str(work_dir)
    cfg.load_from = None
    runner = Runner.from_cfg(cfg)
    ptq = PTQConfig.from_dict(cfg.ptq)
    load_quantized_model(runner, ptq, quantized)
    unwrap_model(runner.model).eval()
    return runner, ptq


def first_test_batch(runner: Runner) -> torch.Tensor:
    """The first batch of the test loader, preprocessed: ``(B, 3, H, W)``."""
    model = unwrap_model(runner.model)
    data = model.data_preprocessor(next(iter(runner.test_dataloader)), False)
    return data["inputs"]


def is_detector(runner: Runner) -> bool:
    return runner.cfg.get("task") == "detection"


def switch_post_softmax(runner: Runner, ptq: PTQConfig) -> list[dict]:
    """``--int8``: the runner's log post-softmax quantizers become 8-bit uniform ones
    (:func:`~pfcr_mm.export.uniform_post_softmax`), calibrated on the run's calibration images
    (the same ``ptq.calib`` seed and count as the quantization) through the whole model."""
    model = unwrap_model(runner.model)
    loader, _ = calibration_loader(ptq, runner.cfg.test_dataloader, Path(runner.work_dir))
    batches = PreprocessedBatches(loader, model)
    return uniform_post_softmax(model, lambda m: [run_batch(m, d) for d in batches])


def export_quantized(
    runner: Runner,
    ptq: PTQConfig,
    out: str | Path,
    int8: bool = False,
    input_size: tuple[int, int] | None = None,
    signed_weights: bool = False,
) -> dict:
    """Export the runner's quantized model to ``out`` and write the report next to it
    (``<out>`` with the suffix ``.json``): a classifier whole (:func:`export_classifier`), a
    detector's backbone and neck (:func:`export_detector`, at ``input_size``).

    int8: the log post-softmax quantizers become 8-bit uniform ones
    (:func:`switch_post_softmax`) and every point is written in 8-bit containers: the graph
    onnxruntime runs with integer kernels. signed_weights: int8 weight codes
    (:func:`pfcr_mm.export.export_onnx`). The report holds
    :func:`pfcr_mm.export.export_onnx`'s, the post-softmax switch per attention (``int8``) and
    the parity of onnxruntime against the PyTorch fake-quant model."""
    if is_detector(runner):
        report = export_detector(runner, ptq, out, int8, input_size, signed_weights)
    elif input_size is not None:
        raise ValueError("--input-size is for detectors; a classifier is exported at any size")
    else:
        report = export_classifier(runner, ptq, out, int8, signed_weights)
    report.update(config=runner.cfg.filename, method=ptq.method, quant_config=ptq.quant.to_dict())
    with atomic_path(Path(out).with_suffix(".json")) as tmp:
        tmp.write_text(json.dumps(report, indent=1))
    return report


def export_classifier(
    runner: Runner, ptq: PTQConfig, out: str | Path, int8: bool, signed_weights: bool = False
) -> dict:
    """The whole classifier, dynamic batch; parity on the first test batch: maximum logit
    difference, top-1 agreement (in ``int8`` mode also against the fake-quant model before the
    post-softmax switch: what the switch costs there)."""
    net = unwrap_model(runner.model).net
    images = first_test_batch(runner)
    with torch.no_grad():
        before = net(images)
    switch = switch_post_softmax(runner, ptq) if int8 else []
    with torch.no_grad():
        fake = net(images)
    report = export_onnx(net, images[:2], out, int8=int8, signed_weights=signed_weights)
    logits = run_session(cpu_session(out), images)
    report["post_softmax_switch"] = switch
    report["parity"] = {
        "images": len(images),
        "max_abs_logit_diff": float((logits - fake).abs().max()),
        "top1_agreement": float((logits.argmax(1) == fake.argmax(1)).float().mean()),
        "logit_range": float(fake.max() - fake.min()),
    }
    if int8:
        report["parity"]["before_switch"] = {
            "max_abs_logit_diff": float((logits - before).abs().max()),
            "top1_agreement": float((logits.argmax(1) == before.argmax(1)).float().mean()),
        }
    return report


class DetectorFeatures(nn.Module):
    """The dense part of an MMDetection detector, what ``extract_feat`` computes: backbone,
    then neck. ``(B, 3, H, W)`` images -> tuple of the neck's levels ``(B, C, H_i, W_i)``."""

    def __init__(self, detector: nn.Module):
        super().__init__()
        self.backbone = detector.backbone
        self.neck = detector.neck if getattr(detector, "with_neck", False) else nn.Identity()

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return tuple(self.neck(self.backbone(images)))


@contextmanager
def features_from(
    detector: nn.Module, extract: Callable[[torch.Tensor], tuple[torch.Tensor, ...]]
) -> Iterator[None]:
    """Within the block, ``detector.extract_feat`` is ``extract``: the heads of the PyTorch
    detector read the features ``extract`` computes (onnxruntime's)."""
    detector.extract_feat = extract
    try:
        yield
    finally:
        del detector.extract_feat


@torch.no_grad()
def evaluate_detector(runner: Runner) -> dict:
    """The runner's test metrics of its model (every test image, the test evaluator), as
    ``tools/ptq.py`` evaluates it, without the Runner's hooks."""
    model, loop = unwrap_model(runner.model), runner.test_loop
    for i, batch in enumerate(loop.dataloader):
        loop.evaluator.process(data_samples=model.test_step(batch), data_batch=batch)
        if (i + 1) % 10 == 0:
            print_log(f"evaluation: batch {i + 1}/{len(loop.dataloader)}", logger="current")
    return loop.evaluator.evaluate(len(loop.dataloader.dataset))


MAP_KEYS = ("coco/bbox_mAP", "coco/segm_mAP")


def export_detector(
    runner: Runner,
    ptq: PTQConfig,
    out: str | Path,
    int8: bool,
    input_size: tuple[int, int] | None = None,
    signed_weights: bool = False,
) -> dict:
    """The detector's backbone and neck (:class:`DetectorFeatures`) at a fixed input
    ``(1, 3, H, W)``: ``input_size``, by default the padded size of the first test batch.
    Parity: box and mask mAP on every test image, the PyTorch fake-quant model (as
    ``tools/ptq.py`` evaluates it) against the same model whose features come from
    onnxruntime (each image padded to the input size, run alone); and the features of the
    first test batch, onnxruntime against PyTorch on the same padded images (maximum absolute
    difference per level, and the level's range). In ``int8`` mode the PyTorch mAP is also
    measured before the post-softmax switch."""
    model = unwrap_model(runner.model)
    images = first_test_batch(runner)
    size = tuple(input_size) if input_size is not None else tuple(images.shape[-2:])
    padded = pad_images(images, size)
    dense = DetectorFeatures(model).eval()
    parity: dict = {"images": len(runner.test_loop.dataloader.dataset), "input_size": list(size)}
    switch = []
    if int8:
        parity["before_switch"] = mean_average_precisions(evaluate_detector(runner))
        switch = switch_post_softmax(runner, ptq)
    pytorch = mean_average_precisions(evaluate_detector(runner))
    report = export_onnx(
        dense, padded[:1], out, int8, dynamic_batch=False, signed_weights=signed_weights
    )
    onnx_features = FixedSizeRunner(cpu_session(out))
    with features_from(model, onnx_features):
        onnxruntime = mean_average_precisions(evaluate_detector(runner))
    with torch.no_grad():
        ref = dense(padded)
    got = onnx_features(images)
    diffs = [float((a - b).abs().max()) for a, b in zip(got, ref)]
    ranges = [float(b.max() - b.min()) for b in ref]
    parity.update(
        pytorch=pytorch,
        onnxruntime=onnxruntime,
        **{f"{k}_diff": onnxruntime[k] - pytorch[k] for k in pytorch},
        features={
            "images": len(images),
            "max_abs_diff": diffs,
            "range": ranges,
            "max_diff_over_range": max(d / r for d, r in zip(diffs, ranges)),
        },
    )
    report["post_softmax_switch"] = switch
    report["parity"] = parity
    report["runs_in"] = _detector_runs_in(model)
    return report


def _detector_runs_in(model: nn.Module) -> dict:
    """What of a detector the export holds, and what stays in PyTorch."""
    in_heads = [
        n
        for n, m in model.named_modules()
        if isinstance(m, QUANT_LAYERS) and not n.startswith(("backbone.", "neck."))
    ]
    return {
        "onnxruntime": "backbone and neck (image -> FPN levels)",
        "pytorch": "RPN head, RoI heads (RoIAlign, box and mask heads), NMS, box and mask "
        "post-processing",
        "pytorch_quantized_layers": in_heads,
    }


def mean_average_precisions(metrics: dict) -> dict:
    """The box and (for a detector with masks) mask mAP of a detector's metrics."""
    return {k: float(metrics[k]) for k in MAP_KEYS if k in metrics}
