"""``pfcr.PTQLoop``: a test loop that evaluates the FP model, quantizes it with
:func:`pfcr_mm.quantize`, evaluates the quantized model and writes the results.

``tools/ptq.py`` sets it as the config's ``test_cfg`` and calls ``runner.test()``; in a config of
your own::

    test_cfg = dict(type="pfcr.PTQLoop")   # the ``ptq`` section of the config is used

Distributed (``tools/ptq.py --launcher pytorch``, one process per device or CPU share): the
calibration images are split over the processes and their range statistics pooled, so every
process ends with the quantizers of a single-process run; reconstruction runs on rank 0 and is
broadcast (see :func:`pfcr_mm.quantize`); the evaluations are split as MMEngine's test loop
splits them, and the main process writes the files. The model is wrapped in
:class:`PTQModelWrapper`, not DistributedDataParallel: nothing is trained.

Files, in the run's own folder ``<work_dir>/<YYYYmmdd_HHMMSS>/`` (MMEngine's log folder of the
run), each written under a temporary name and renamed when complete: ``ptq_results.json``,
``quantized_model.pth``, ``quant_summary.{json,txt}``, ``calib_indices.json``,
``ptq_config.py`` and, for ``block``/``pfcr``, ``recon/recon_log.json`` and ``recon_loss.png``.
``<work_dir>/last_run`` names the folder of the last run that wrote its results; an earlier
run's files are never touched, except by ``tools/ptq.py --resume``, which continues a run that
stopped in its own folder: a ``block``/``pfcr`` run rewrites ``recon/resume.pth`` after every
unit (:mod:`pfcr_mm.engine.resume`).
"""

from __future__ import annotations

import time
from collections import Counter
from pathlib import Path

from mmengine.dist import is_main_process
from mmengine.runner import TestLoop
from torch import nn

from ..adapters import find_blocks
from ..recon.units import coarsest_level, stage_of_block
from ..settings import PTQConfig
from .calib_split import check_calibration_split
from .checkpoint import check_is_file, load_weights_strict
from .registry import LOOPS, MODEL_WRAPPERS
from .results import quantize_and_save, record_results
from .resume import load_resume_state, run_fingerprint, save_resume_state
from .run_dir import run_dir
from .runner_io import unwrap_model
from .saved_model import load_quantized_model, read_quantized_model


@LOOPS.register_module()
class PTQLoop(TestLoop):
    """FP evaluation (``ptq.eval_fp``), quantization, quantized evaluation, results.

    ptq: the :class:`~pfcr_mm.PTQConfig` dict (default: the config's ``ptq`` section).
    checkpoint: weights loaded strictly into the model before anything runs (a checkpoint of
        another model fails with the differing keys).
    quantized: a ``quantized_model.pth`` of an earlier run, evaluated instead of quantizing.
    eval_images: the N of ``tools/ptq.py --eval-images`` (the dataloader already holds only
        those images), recorded in the results.
    resume: the folder of a run that stopped, continued from its ``recon/resume.pth``
        (``tools/ptq.py --resume``); refused, before the FP evaluation, when the run's
        fingerprint (:func:`~pfcr_mm.engine.resume.run_fingerprint`) differs.

    ``run()`` returns the quantized model's metrics, as a test loop does.
    """

    def __init__(
        self,
        runner,
        dataloader,
        evaluator,
        ptq: dict | None = None,
        checkpoint: str | None = None,
        quantized: str | None = None,
        eval_images: int | None = None,
        resume: str | None = None,
        fp16: bool = False,
    ):
        if ptq is None and "ptq" not in runner.cfg:
            raise KeyError("pfcr.PTQLoop needs a 'ptq' section in the config (or its ptq=...)")
        self.config = PTQConfig.from_dict(ptq if ptq is not None else runner.cfg.ptq)
        # an unsupported model or scope, or a level it does not have, fails now, before the FP
        # evaluation
        _, blocks = find_blocks(unwrap_model(runner.model), self.config.scope_modules)
        if self.config.method == "pfcr":
            stages = Counter(stage_of_block(name) for _, name, _, _ in blocks)
            coarsest_level(self.config.recon.max_level, list(stages.values()))
        for path, what in ((checkpoint, "checkpoint"), (quantized, "quantized model")):
            if path is not None:
                check_is_file(path, what)
        super().__init__(runner, dataloader, evaluator, fp16)
        # checked before the FP evaluation, which takes hours on COCO
        if quantized is not None:
            model = unwrap_model(runner.model)
            self.saved = read_quantized_model(self.config, quantized, model)
        else:
            self.saved = None
        if quantized is None:
            check_calibration_split(
                self.config, runner.cfg.test_dataloader, self.dataloader.dataset
            )
        self.checkpoint, self.quantized, self.eval_images = checkpoint, quantized, eval_images
        # a reconstruction run checkpoints after every unit, under its fingerprint
        self.fingerprint = self.resumed = None
        if resume is not None or (quantized is None and self.config.method != "calib"):
            weights = checkpoint or runner.cfg.model.get("checkpoint")
            self.fingerprint = run_fingerprint(runner.cfg, self.config, weights)
        if resume is not None:
            self.resumed = load_resume_state(Path(resume), self.fingerprint)

    def run(self) -> dict:
        runner, config = self.runner, self.config
        if self.checkpoint:
            load_weights_strict(unwrap_model(runner.model), self.checkpoint)
        times, fp = {}, None
        if config.eval_fp:
            t = time.time()
            fp = super().run()
            times["fp_eval"] = time.time() - t
        t = time.time()
        if self.quantized:
            _, saved = load_quantized_model(runner, config, self.quantized, self.saved)
            indices, recon, model_path = saved["calib_indices"], saved.get("recon", {}), None
        else:
            out, fingerprint = run_dir(runner), self.fingerprint
            indices, recon, model_path = quantize_and_save(
                runner,
                config,
                self.resumed,
                lambda state: save_resume_state(out, fingerprint, state),
            )
        times["quantize"] = time.time() - t
        t = time.time()
        quant = super().run()
        times["quant_eval"] = time.time() - t
        results, path = record_results(
            runner,
            config,
            self.dataloader,
            fp=fp,
            quant=quant,
            indices=indices,
            recon=recon,
            times=times,
            quantized_model=str(self.quantized or model_path),
            eval_images=self.eval_images,
        )
        if is_main_process():
            print(format_results(results))
            print(f"results: {path}")
        return quant


def format_results(results: dict) -> str:
    """The FP and quantized metrics side by side, the output error, method, scope and times;
    a mixed-precision setting (``quant.linear_a_bits``) marked and spelled out."""
    named = results["quant_config"].get("linear_a_bits") or {}
    mixed = {kind: bits for kind, bits in named.items() if bits != results["a_bits"]}
    setting = f"W{results['w_bits']}A{results['a_bits']}{'*' if mixed else ''}"
    lines = [f"\n{'metric':28s} {'FP':>10s} {setting:>10s}"]
    for name, value in results["quant"].items():
        if isinstance(value, (int, float)):
            fp = results["fp"][name] if results["fp"] else float("nan")
            lines.append(f"{name:28s} {fp:10.4g} {value:10.4g}")
    times = ", ".join(f"{k} {v:.1f} s" for k, v in results["time_s"].items())
    for key, images in (("output_error", "evaluation"), ("heldout_error", "held-out calibration")):
        error = results.get(key)
        if error:
            lines.append(
                f"output error on {error['images']} {images} images ({error['outputs']}): "
                f"relative MSE {error['relative_mse']:.4g}"
            )
    lines.append(
        f"method {results['method']}, scope {results['scope']}; {times}; "
        f"peak host memory {results['peak_mem_mb']['host_rss']:.0f} MiB"
    )
    if mixed:
        inputs = ", ".join(f"{kind} at {bits} bits" for kind, bits in mixed.items())
        lines.append(f"* mixed precision (quant.linear_a_bits): the inputs of {inputs}")
    return "\n".join(lines)


@MODEL_WRAPPERS.register_module()
class PTQModelWrapper(nn.Module):
    """The model wrapper of a distributed PTQ run: the model runs as it is in every process.

    Nothing is trained, so there are no gradients to synchronize; DistributedDataParallel would
    also refuse a CPU model with the device ids MMEngine gives it. ``module`` is the model, as
    in MMEngine's own wrappers.
    """

    def __init__(self, module: nn.Module):
        super().__init__()
        self.module = module

    def test_step(self, data):
        return self.module.test_step(data)

    def val_step(self, data):
        return self.module.val_step(data)

    def forward(self, *args, **kwargs):
        return self.module(*args, **kwargs)
