"""``pfcr.PFCRHook``: quantize ``runner.model`` before the test loop.

For users of a stock test script (``mmdet``'s ``tools/test.py``, ``mim test``)::

    custom_hooks = [dict(type="pfcr.PFCRHook", ptq=dict(quant=dict(w_bits=4, a_bits=4), ...))]

The model is quantized once, on the first test run; ``tools/ptq.py`` drives the same code and
adds the FP evaluation and the results file.
"""

from __future__ import annotations

from mmengine.hooks import Hook

from .ptq import PTQSettings, quantize_runner_model
from .registry import HOOKS


@HOOKS.register_module()
class PFCRHook(Hook):
    priority = "VERY_HIGH"

    def __init__(self, ptq: dict):
        self.settings = PTQSettings.from_cfg(ptq)
        self.plan = None

    def before_test(self, runner) -> None:
        if self.plan is None:
            self.plan, _, _ = quantize_runner_model(runner, self.settings)
