"""The input point of an MLP's second linear, after GELU (``QuantConfig.post_gelu``).

GELU's outputs are one-sided and heavy-tailed: on the demo ViT half or more of them lie in
GELU's small negative lobe (its minimum is about -0.17), a few reach several units. A uniform
quantizer spends its levels evenly over that range; a log quantizer above the minimum
(:class:`~pfcr_mm.quant.quantizers.ShiftedLogQuantizer`) puts fine steps where the bulk is. With
``post_gelu="auto"`` each such linear chooses among :data:`POST_GELU_CANDIDATES` as
:mod:`pfcr_mm.quant.choice` chooses: scored by the squared error each causes in the linear's own
output, the close calls tried alone at the model's outputs. The tensor error alone would choose
wrong (``docs/method.md``: clipping the rare large values lowers it and raises the model's).
"""

from __future__ import annotations

from functools import partial

import torch
import torch.nn.functional as F
from torch import nn

from ..settings import QuantConfig
from .choice import PendingChoice, QuantizerChoice, build_candidates, build_quantizer
from .modules import QuantLinear

# (kind, k): a log quantizer of base 2^(1/k) above the minimum, or the uniform one
POST_GELU_CANDIDATES = (
    ("uniform", None),
    ("shift_log", 1.0),
    ("shift_log", 2**0.5),
    ("shift_log", 2.0),
)
# the fixed choices of QuantConfig.post_gelu other than "auto" and "uniform" (a plain QuantLinear)
FIXED_POST_GELU = {"shift_log2": ("shift_log", 1.0), "shift_log_sqrt2": ("shift_log", 2.0)}


class PostGeluLinear(QuantizerChoice, QuantLinear):
    """A :class:`QuantLinear` whose input quantizer is chosen at calibration (``"auto"``) or a
    fixed log quantizer above the minimum; the choice is saved with the model."""

    choice_slot = "input_quantizer"
    consumer = "linear output"
    state_key = "input"

    def __init__(self, linear: nn.Linear, cfg: QuantConfig, w_bits: int, a_bits: int):
        super().__init__(linear, w_bits, a_bits, False, cfg.act_range, cfg.weight_range)
        self.cfg = cfg
        if cfg.post_gelu == "auto":
            candidates = partial(build_candidates, POST_GELU_CANDIDATES, a_bits, cfg)
            self.input_quantizer = PendingChoice(a_bits, candidates)
        else:
            self.input_quantizer = build_quantizer(*FIXED_POST_GELU[cfg.post_gelu], a_bits, cfg)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.scores is None:
            return super().forward(x)
        return self.scored(x, lambda z: F.linear(z, self.weight, self.bias))
