"""A run's quantization through the Runner, and its results: ``quantized_model.pth``,
``quant_summary.{json,txt}``, ``ptq_results.json`` and the resolved ``ptq_config.py`` in the
run's folder, then the work dir's ``last_run`` pointer.

:class:`pfcr_mm.engine.loop.PTQLoop` (``tools/ptq.py``) and :class:`pfcr_mm.engine.hooks.PFCRHook`
(stock test scripts) both go through :func:`quantize_and_save` and :func:`record_results`.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import torch
from mmengine.dist import is_main_process
from mmengine.logging import print_log
from torch.utils.data import DataLoader

from ..atomic import atomic_path
from ..core import QuantResult, ResumeState, quantize
from ..provenance import package_versions
from ..quant.calibrate import write_quant_summary
from ..recon import peak_memory_mb
from ..settings import PTQConfig
from .calib_split import calibration_loader, heldout_loader
from .run_dir import LAST_RUN, QUANTIZED_NAME, RESULTS_NAME, run_dir
from .runner_io import (
    PreprocessedBatches,
    features,
    model_and_head,
    output_error,
    run_batch,
    unwrap_model,
)
from .saved_model import save_quantized_model


def quantize_runner_model(
    runner,
    config: PTQConfig,
    resume: ResumeState | None = None,
    on_unit_done: Callable[[ResumeState], None] | None = None,
) -> tuple[QuantResult, list[int]]:
    """Quantize ``runner.model`` in place with :func:`pfcr_mm.quantize` on the calibration
    images and write the summary; returns the result and the calibration indices.
    ``resume`` / ``on_unit_done``: those of :func:`pfcr_mm.quantize`."""
    model, head = model_and_head(runner)
    out_dir = run_dir(runner)
    loader, indices = calibration_loader(config, runner.cfg.test_dataloader, out_dir)
    result = quantize(
        model,
        config,
        PreprocessedBatches(loader, model),
        run_batch,
        downstream=features,
        head=head,
        log_dir=out_dir / "recon",
        print_fn=lambda s: print_log(s, logger="current"),
        resume=resume,
        on_unit_done=on_unit_done,
    )
    if result.plan.folded:
        print_log(
            f"folded the BatchNorm of {len(result.plan.folded)} modules into their convolutions "
            f"before quantization: {', '.join(result.plan.folded)}",
            logger="current",
        )
    fp_parts = list(result.plan.fp_parts)
    if runner.cfg.get("task") == "detection":  # functional ops, invisible as modules
        fp_parts += ["NMS", "box and mask post-processing"]
    if is_main_process():
        write_quant_summary(model, out_dir / "quant_summary.json", fp_parts)
    print_log(
        f"quantized {len(result.plan.quantized_modules)} modules, {len(result.plan.units)} "
        f"units; summary in {out_dir / 'quant_summary.txt'}",
        logger="current",
    )
    return result, indices


def quantize_and_save(
    runner,
    config: PTQConfig,
    resume: ResumeState | None = None,
    on_unit_done: Callable[[ResumeState], None] | None = None,
) -> tuple[list[int], dict, Path]:
    """Quantize ``runner.model`` (:func:`quantize_runner_model`) and save it to
    ``quantized_model.pth``; returns the calibration indices, the reconstruction summary and
    the path."""
    result, indices = quantize_runner_model(runner, config, resume, on_unit_done)
    path = run_dir(runner) / QUANTIZED_NAME
    save_quantized_model(runner, config, indices, result.recon, path)
    return indices, result.recon, path


def record_results(
    runner,
    config: PTQConfig,
    loader: DataLoader,
    fp: dict | None,
    quant: dict,
    indices: list[int],
    recon: dict,
    times: dict,
    quantized_model: str,
    eval_images: int | None = None,
) -> tuple[dict, Path]:
    """Measure the output error on ``loader``'s first images and on the held-out calibration
    images (:func:`heldout_loader`), write ``ptq_results.json`` and the resolved config
    ``ptq_config.py`` into the run's folder (:func:`run_dir`), then point ``last_run`` in the
    work dir at it; returns the results and the path. ``eval_images``: the N of
    ``--eval-images`` (``None``: every evaluation image)."""
    cfg = runner.cfg
    heldout = heldout_loader(config, cfg.test_dataloader)
    results = {
        "task": cfg.get("task", "classification"),
        "method": config.method,
        "w_bits": config.quant.w_bits,
        "a_bits": config.quant.a_bits,
        "scope": config.scope,
        "quant_config": config.quant.to_dict(),
        "recon": recon,
        "fp": fp,
        "quant": quant,
        "eval_images": eval_images,
        "output_error": output_error(unwrap_model(runner.model), loader),
        # where defaults are chosen: calibration-split images that calibration did not see
        "heldout_error": None
        if heldout is None
        else {
            **output_error(unwrap_model(runner.model), heldout, len(heldout.dataset)),
            "indices": list(heldout.dataset.indices),
        },
        "calib_indices": indices,
        "time_s": times,
        "peak_mem_mb": peak_memory_mb(),
        "versions": package_versions(),
        "threads": torch.get_num_threads(),  # the tensors depend on it (tools/ptq.py --threads)
        "config": cfg.filename,
        "quantized_model": quantized_model,
    }
    out_dir = run_dir(runner)
    path = out_dir / RESULTS_NAME
    if is_main_process():
        with atomic_path(path) as tmp:
            tmp.write_text(json.dumps(results, indent=1))
        with atomic_path(out_dir / "ptq_config.py") as tmp:
            cfg.dump(str(tmp))
        # the pointer moves only once the run's files are complete
        with atomic_path(Path(runner.work_dir) / LAST_RUN) as tmp:
            tmp.write_text(out_dir.name + "\n")
    return results, path
