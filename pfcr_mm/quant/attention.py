"""The quantizer points of an attention: both matmul operands and the probabilities.

Attention modules write ``q @ k^T`` and ``attn @ v`` inline (or call fused SDPA), so swapping
``nn.Linear`` modules misses them. Each supported attention gets an explicit forward (in
``pfcr_mm.adapters``) that routes the four tensors through an :class:`AttentionQuantizers`.
"""

from __future__ import annotations

from torch import nn

from .config import QuantConfig
from .quantizers import Log2Quantizer, UniformQuantizer


class AttentionQuantizers(nn.Module):
    """``q``, ``k``, ``v``: uniform per tensor; ``probs``: the post-softmax quantizer."""

    def __init__(self, cfg: QuantConfig):
        super().__init__()
        self.q = UniformQuantizer(cfg.a_bits, range_method=cfg.act_range)
        self.k = UniformQuantizer(cfg.a_bits, range_method=cfg.act_range)
        self.v = UniformQuantizer(cfg.a_bits, range_method=cfg.act_range)
        if cfg.post_softmax == "uniform":
            self.probs = UniformQuantizer(cfg.a_bits, range_method=cfg.act_range)
        else:
            self.probs = Log2Quantizer(cfg.a_bits, sqrt2=cfg.post_softmax == "log_sqrt2")
