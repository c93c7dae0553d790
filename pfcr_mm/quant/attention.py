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
probability, by the error it causes in that attention's output ``probs @ v`` over the
calibration images (:func:`pfcr_mm.quant.calibrate.calibrate_activations` runs the scoring pass).
"""

from __future__ import annotations

import torch
from torch import nn

from .config import QuantConfig
from .quantizers import LOG_QUANTIZER_NAMES, BaseQuantizer, LogQuantizer, UniformQuantizer

# The bases 2^(1/k) of the log candidates: k = 1 is log2, k = 2 log-sqrt2, larger k finer
# steps over a narrower range; plus "uniform".
LOG_CANDIDATE_K = (1.0, 2**0.5, 2.0, 2 * 2**0.5, 4.0, 8.0)
POST_SOFTMAX_CANDIDATES = tuple(("log", k) for k in LOG_CANDIDATE_K) + (("uniform", None),)


def _probs_quantizer(kind: str, k: float | None, cfg: QuantConfig) -> BaseQuantizer:
    if kind == "uniform":
        return UniformQuantizer(cfg.a_bits, range_method=cfg.act_range)
    return LogQuantizer(cfg.a_bits, k=k)


class PendingChoice(BaseQuantizer):
    """The post-softmax point of ``post_softmax="auto"`` before the choice: it observes the
    probabilities like any quantizer; calibration then builds every candidate from those
    statistics, and :class:`AttentionQuantizers` scores them and keeps one in its place."""

    def __init__(self, cfg: QuantConfig):
        super().__init__(cfg.a_bits)
        self.cfg = cfg
        self.candidates: list[BaseQuantizer] = []  # a plain list: not part of the state

    def finish_calibration(self) -> None:
        stats = self.take_observed()
        self.candidates = [
            _probs_quantizer(kind, k, self.cfg) for kind, k in POST_SOFTMAX_CANDIDATES
        ]
        for c in self.candidates:
            c.calibrate_from_stats(stats)
        self.calibrated = True

    def fake_quant(self, x: torch.Tensor) -> torch.Tensor:
        raise RuntimeError("post_softmax='auto': the choice was not made (calibrate first)")


class AttentionQuantizers(nn.Module):
    """``q``, ``k``, ``v``: uniform per tensor; ``probs``: the post-softmax quantizer, chosen at
    calibration when ``cfg.post_softmax == "auto"``. The choice is saved with the model."""

    def __init__(self, cfg: QuantConfig):
        super().__init__()
        self.cfg = cfg
        self.q = UniformQuantizer(cfg.a_bits, range_method=cfg.act_range)
        self.k = UniformQuantizer(cfg.a_bits, range_method=cfg.act_range)
        self.v = UniformQuantizer(cfg.a_bits, range_method=cfg.act_range)
        fixed = {name: ("log", k) for k, name in LOG_QUANTIZER_NAMES.items()}
        fixed["uniform"] = ("uniform", None)
        if cfg.post_softmax == "auto":
            self.probs: BaseQuantizer = PendingChoice(cfg)
        else:
            self.probs = _probs_quantizer(*fixed[cfg.post_softmax], cfg)
        self.scores: list[float] | None = None  # output errors of the candidates while scoring

    def attend(self, probs: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """``probs @ v`` through the quantizers; while scoring, the FP product, and each
        candidate's squared error on it is added to :attr:`scores`."""
        if self.scores is None:
            return self.probs(probs) @ self.v(v)
        ref = probs @ v
        for i, c in enumerate(self.probs.candidates):
            self.scores[i] += float((c.fake_quant(probs) @ v - ref).pow(2).sum())
        return ref

    @property
    def choosing(self) -> bool:
        return isinstance(self.probs, PendingChoice) and self.probs.calibrated

    def start_scoring(self) -> None:
        device = self.q.scale.device
        self.probs.candidates = [c.to(device) for c in self.probs.candidates]
        self.scores = [0.0] * len(self.probs.candidates)

    def choose(self, scores: list[float]) -> None:
        """Keep the candidate of smallest output error (``scores``: summed over all
        processes); ends the scoring."""
        best = min(range(len(scores)), key=scores.__getitem__)
        self.probs = self.probs.candidates[best].train(self.training)
        self.scores = None

    def chosen(self) -> dict:
        """What the post-softmax point is: ``{"kind": "log", "k": k}`` or ``{"kind":
        "uniform"}``."""
        if isinstance(self.probs, LogQuantizer):
            return {"kind": "log", "k": self.probs.k}
        if isinstance(self.probs, UniformQuantizer):
            return {"kind": "uniform"}
        return {"kind": "pending"}

    # The choice travels with the state dict: loading rebuilds the chosen quantizer before its
    # own parameters load (a module's extra state is read before its children's).
    def get_extra_state(self) -> dict:
        return {"probs": self.chosen()}

    def set_extra_state(self, extra: dict) -> None:
        probs = extra["probs"]
        if probs["kind"] != "pending":
            rebuilt = _probs_quantizer(probs["kind"], probs.get("k"), self.cfg)
            self.probs = rebuilt.to(self.q.scale.device).train(self.training)
