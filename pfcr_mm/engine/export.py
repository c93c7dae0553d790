"""The MMEngine side of an ONNX export: a config and a saved ``quantized_model.pth`` turned into
the quantized model, the calibration images for ``--int8``, and the export report.

``tools/export.py`` and ``tools/benchmark_export.py`` both go through :func:`build_quantized`
and :func:`export_quantized`.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from mmengine.config import Config
from mmengine.runner import Runner

from ..atomic import atomic_path
from ..core import PTQConfig
from ..export import export_onnx, uniform_post_softmax
from ..export.runtime import cpu_session, run_session
from .ptq import (
    PreprocessedBatches,
    calibration_loader,
    load_quantized_model,
    run_batch,
    unwrap_model,
)


def build_quantized(
    config: str | Path, quantized: str | Path, work_dir: str | Path, cfg_options: dict | None = None
) -> tuple[Runner, PTQConfig]:
    """A Runner of ``config`` whose model is the saved quantized model ``quantized``.

    Raises FileNotFoundError for a missing file and ValueError for a detector config (only
    classifiers are exported so far) or a quantized model of other settings."""
    for what, path in (("config file", config), ("quantized model", quantized)):
        if not Path(path).is_file():
            raise FileNotFoundError(f"{what} not found: {path}")
    cfg = Config.fromfile(str(config))
    cfg.merge_from_dict(cfg_options or {})
    if cfg.get("task") == "detection":
        raise ValueError("ONNX export covers timm classifiers; detectors are not exported yet")
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


def export_quantized(runner: Runner, ptq: PTQConfig, out: str | Path, int8: bool = False) -> dict:
    """Export the runner's quantized classifier to ``out`` and write the report next to it
    (``<out>`` with the suffix ``.json``).

    int8: the log post-softmax quantizers become 8-bit uniform ones, calibrated on the run's
    calibration images (the same ``ptq.calib`` seed and count as the quantization), and every
    point is written in 8-bit containers: the graph onnxruntime runs with integer kernels.
    The report holds :func:`pfcr_mm.export.export_onnx`'s, the post-softmax switch per
    attention (``int8``) and the parity of onnxruntime against the PyTorch fake-quant model on
    the first test batch (maximum logit difference, top-1 agreement; in ``int8`` mode also
    against the fake-quant model before the switch: what the switch costs there)."""
    model = unwrap_model(runner.model)
    net = model.net
    images = first_test_batch(runner)
    with torch.no_grad():
        before = net(images)
    switch = []
    if int8:
        loader, _ = calibration_loader(ptq, runner.cfg.test_dataloader, Path(runner.work_dir))
        batches = PreprocessedBatches(loader, model)
        switch = uniform_post_softmax(model, lambda m: [run_batch(m, d) for d in batches])
    with torch.no_grad():
        fake = net(images)
    report = export_onnx(net, images[:2], out, int8=int8)
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
    report.update(config=runner.cfg.filename, method=ptq.method, quant_config=ptq.quant.to_dict())
    with atomic_path(Path(out).with_suffix(".json")) as tmp:
        tmp.write_text(json.dumps(report, indent=1))
    return report
