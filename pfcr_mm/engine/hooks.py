"""``pfcr.PFCRHook``: quantize ``runner.model`` before the test loop of a stock test script.

For users of ``mmdet``'s ``tools/test.py`` or ``mim test``::

    custom_hooks = [dict(type="pfcr.PFCRHook", ptq=dict(quant=dict(w_bits=4, a_bits=4), ...))]

The model is quantized once, on the first test run, by the same code as ``pfcr.PTQLoop``
(:func:`pfcr_mm.engine.results.quantize_and_save`, :func:`~pfcr_mm.engine.results.record_results`),
and the same files are written into the run's folder: the quantized model and summary before
the evaluation, ``ptq_results.json`` and ``ptq_config.py`` after every test run (without an FP
evaluation: ``fp`` is ``null``; ``tools/ptq.py`` adds it). It sets the threads as ``tools/ptq.py``
does (:func:`~pfcr_mm.engine.command.set_threads`: ``OMP_NUM_THREADS``, else 1), so that the
two paths give the same tensors.
"""

from __future__ import annotations

import time

from mmengine.hooks import Hook

from ..settings import PTQConfig
from .command import set_threads
from .registry import HOOKS
from .results import quantize_and_save, record_results


@HOOKS.register_module()
class PFCRHook(Hook):
    priority = "VERY_HIGH"

    def __init__(self, ptq: dict):
        self.config = PTQConfig.from_dict(ptq)
        self.done: dict | None = None  # what the quantization left for the results

    def before_test(self, runner) -> None:
        if self.done is not None:
            return
        set_threads(None)
        t = time.time()
        indices, recon, path = quantize_and_save(runner, self.config)
        self.done = {
            "indices": indices,
            "recon": recon,
            "path": str(path),
            "times": {"quantize": time.time() - t},
        }

    def before_test_epoch(self, runner) -> None:
        if self.done is not None:
            self.done["start"] = time.time()

    def after_test_epoch(self, runner, metrics: dict | None = None) -> None:
        done = self.done
        if done is None:
            return
        times = {**done["times"], "quant_eval": time.time() - done["start"]}
        record_results(
            runner,
            self.config,
            runner.test_loop.dataloader,
            fp=None,
            quant=dict(metrics or {}),
            indices=done["indices"],
            recon=done["recon"],
            times=times,
            quantized_model=done["path"],
        )
