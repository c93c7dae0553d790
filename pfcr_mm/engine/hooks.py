"""``pfcr.PFCRHook``: quantize ``runner.model`` before the test loop of a stock test script.

For users of ``mmdet``'s ``tools/test.py`` or ``mim test``::

    custom_hooks = [dict(type="pfcr.PFCRHook", ptq=dict(quant=dict(w_bits=4, a_bits=4), ...))]

The model is quantized once, on the first test run, by the same code as ``pfcr.PTQLoop``
(:func:`pfcr_mm.engine.ptq.quantize_runner_model`), and the same files are written: the
quantized model and summary before the evaluation, ``ptq_results.json`` after it (without an FP
evaluation: ``fp`` is ``null``; ``tools/ptq.py`` adds it).
"""

from __future__ import annotations

import time
from pathlib import Path

from mmengine.hooks import Hook

from ..core import PTQConfig
from .ptq import (
    output_error,
    ptq_results,
    quantize_runner_model,
    save_quantized_model,
    unwrap_model,
    write_results,
)
from .registry import HOOKS


@HOOKS.register_module()
class PFCRHook(Hook):
    priority = "VERY_HIGH"

    def __init__(self, ptq: dict):
        self.config = PTQConfig.from_dict(ptq)
        self.done: dict | None = None  # what the quantization left for the results

    def before_test(self, runner) -> None:
        if self.done is not None:
            return
        work_dir = Path(runner.work_dir)
        t = time.time()
        result, indices = quantize_runner_model(runner, self.config)
        path = save_quantized_model(
            runner, self.config, indices, result.recon, work_dir / "quantized_model.pth"
        )
        self.done = {
            "indices": indices,
            "recon": result.recon,
            "path": str(path),
            "times": {"quantize": time.time() - t},
            "start": time.time(),
        }

    def after_test_epoch(self, runner, metrics: dict | None = None) -> None:
        done = self.done
        if done is None or "written" in done:
            return
        times = {**done["times"], "quant_eval": time.time() - done["start"]}
        results = ptq_results(
            runner,
            self.config,
            fp=None,
            quant=dict(metrics or {}),
            indices=done["indices"],
            recon=done["recon"],
            times=times,
            error=output_error(unwrap_model(runner.model), runner.test_loop.dataloader),
            quantized_model=done["path"],
        )
        write_results(Path(runner.work_dir) / "ptq_results.json", results)
        done["written"] = True
