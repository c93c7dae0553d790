"""The quantizer points of an attention: both matmul operands and the probabilities.

Attention modules write ``q @ k^T`` and ``attn @ v`` inline (or call fused SDPA), so swapping
``nn.Linear`` modules misses them. Each supported attention gets an explicit forward (in
``pfcr_mm.adapters``) that routes ``q`` and ``k`` through an :class:`AttentionQuantizers` and
computes ``probs @ v`` with :meth:`AttentionQuantizers.attend`.

The post-softmax quantizer decides much of a calibrated model's error, and no fixed choice is
right at every bit width: log2 keeps the same coarse steps at 8 bits, log-sqrt2 covers too small
a range at 3 bits, uniform wastes its levels on the many tiny probabilities at low bits. With
``post_softmax="auto"`` each attention chooses its own among :data:`POST_SOFTMAX_CANDIDATES`
(log quantizers of bases ``2^(1/k)``, and a uniform one), each calibrated on every observed
probability, in the two stages of :mod:`pfcr_mm.quant.choice`: scored by the squared error each
causes in that attention's output ``probs @ v``, the close calls then tried alone at the model's
outputs (a classifier's logits, a detector's backbone and neck features) where the caller gives
them.

Stage 1 alone weighs every head and channel of ``probs @ v`` alike, but the projection and the
layers after it do not: on the demo ViT at W4A4 it chose, in one attention of one seed, a
candidate that scored 2 % better there and caused 1.7x the logit error of the runner-up
(``benchmarks/demo_calib_heldout512``). Stage 2 measures what the model's outputs feel; stage 1
keeps its cost to the close calls (on the demo ViT the downstream choice was always within 1.32x
of the best stage-1 score).
"""

from __future__ import annotations

from functools import partial

import torch
from torch import nn

from ..settings import QuantConfig
from .choice import PendingChoice, QuantizerChoice, build_candidates, build_quantizer
from .quantizers import LOG_QUANTIZER_NAMES, BaseQuantizer, UniformQuantizer

# The bases 2^(1/k) of the log candidates: k = 1 is log2, k = 2 log-sqrt2, larger k finer
# steps over a narrower range; plus "uniform".
LOG_CANDIDATE_K = (1.0, 2**0.5, 2.0, 2 * 2**0.5, 4.0, 8.0)
POST_SOFTMAX_CANDIDATES = tuple(("log", k) for k in LOG_CANDIDATE_K) + (("uniform", None),)


class AttentionQuantizers(QuantizerChoice, nn.Module):
    """``q``, ``k``, ``v``: uniform per tensor; ``probs``: the post-softmax quantizer, chosen at
    calibration when ``cfg.post_softmax == "auto"``. The choice is saved with the model."""

    choice_slot = state_key = "probs"
    consumer = "probs @ v"

    def __init__(self, cfg: QuantConfig):
        super().__init__()
        self.cfg = cfg
        self.q = UniformQuantizer(cfg.a_bits, range_method=cfg.act_range)
        self.k = UniformQuantizer(cfg.a_bits, range_method=cfg.act_range)
        self.v = UniformQuantizer(cfg.a_bits, range_method=cfg.act_range)
        fixed = {name: ("log", k) for k, name in LOG_QUANTIZER_NAMES.items()}
        fixed["uniform"] = ("uniform", None)
        if cfg.post_softmax == "auto":
            candidates = partial(build_candidates, POST_SOFTMAX_CANDIDATES, cfg.a_bits, cfg)
            self.probs: BaseQuantizer = PendingChoice(cfg.a_bits, candidates)
        else:
            self.probs = build_quantizer(*fixed[cfg.post_softmax], cfg.a_bits, cfg)

    def attend(self, probs: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """``probs @ v`` through the quantizers (each row divided by its quantized
        probabilities' sum with ``cfg.post_softmax_renorm``); while scoring, the FP product, and
        each candidate's squared error on it is added to :attr:`scores`."""
        if self.scores is None:
            quantized = self.probs(probs)
            # probabilities the quantizer passed through (floating point, observing) sum to 1:
            # the FP state stays the FP model exactly
            return self._product(quantized, self.v(v), renorm=quantized is not probs)
        return self.scored(probs, lambda p: self._product(p, v, renorm=True))

    def _product(self, probs: torch.Tensor, v: torch.Tensor, renorm: bool) -> torch.Tensor:
        """``probs @ v``, or with ``cfg.post_softmax_renorm`` and quantized ``probs``,
        ``(probs @ v) / rowsum(probs)``: the integer product stays, one scale per row on its
        output (``docs/method.md`` section 2). A row whose probabilities all quantize to 0 has
        nothing to rescale and stays 0."""
        out = probs @ v
        if not (renorm and self.cfg.post_softmax_renorm):
            return out
        total = probs.sum(-1, keepdim=True)
        return out / torch.where(total > 0, total, torch.ones_like(total))
