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
probability, in two stages over the calibration images
(:func:`pfcr_mm.quant.calibrate.calibrate_activations` runs them):

1. every candidate is scored by the squared error it causes in that attention's output
   ``probs @ v`` (one pass, all candidates at once); those within :data:`SHORTLIST_RATIO` of
   the best score make the shortlist;
2. where the shortlist holds more than one and the caller gives the model's outputs (a
   classifier's logits, a detector's backbone and neck features), each shortlisted candidate is
   tried alone (everything else in floating point) and the one of least error at those outputs
   is kept; otherwise the best of stage 1.

Stage 1 alone weighs every head and channel of ``probs @ v`` alike, but the projection and the
layers after it do not: on the demo ViT at W4A4 it chose, in one attention of one seed, a
candidate that scored 2 % better there and caused 1.7x the logit error of the runner-up
(``benchmarks/demo_calib_heldout512``). Stage 2 measures what the model's outputs feel; stage 1
keeps its cost to the close calls (on the demo ViT the downstream choice was always within 1.32x
of the best stage-1 score).
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn

from ..settings import QuantConfig
from .quantizers import LOG_QUANTIZER_NAMES, BaseQuantizer, LogQuantizer, UniformQuantizer

# The bases 2^(1/k) of the log candidates: k = 1 is log2, k = 2 log-sqrt2, larger k finer
# steps over a narrower range; plus "uniform".
LOG_CANDIDATE_K = (1.0, 2**0.5, 2.0, 2 * 2**0.5, 4.0, 8.0)
POST_SOFTMAX_CANDIDATES = tuple(("log", k) for k in LOG_CANDIDATE_K) + (("uniform", None),)
# the candidates whose probs @ v error is within this factor of the best are tried downstream
SHORTLIST_RATIO = 2.0


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
        # how this run's choice was made (not saved with the model): the candidates' errors
        self.choice_record: dict | None = None

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

    @staticmethod
    def shortlist(scores: list[float]) -> list[int]:
        """The candidates whose ``probs @ v`` error is within :data:`SHORTLIST_RATIO` of the
        best."""
        best = min(scores)
        return [i for i, s in enumerate(scores) if s <= SHORTLIST_RATIO * best]

    @contextmanager
    def trying(self, index: int) -> Iterator[None]:
        """Inside the block the probabilities go through candidate ``index``, quantized
        whatever the model's other quantizers do (the downstream stage of the choice)."""
        pending, candidate = self.probs, self.probs.candidates[index]
        candidate.set_state("quant")
        self.probs = candidate
        try:
            yield
        finally:
            candidate.set_state("fp")
            self.probs = pending

    def choose(self, scores: list[float], downstream: dict[int, float] | None = None) -> None:
        """Keep a candidate. ``scores``: every candidate's ``probs @ v`` error; ``downstream``:
        the error at the model's outputs of the shortlisted ones, which then decides (both
        summed over all processes)."""
        by = downstream or dict(enumerate(scores))
        best = min(by, key=by.__getitem__)
        self.choice_record = {
            "candidates": [c.describe()["quantizer"] for c in self.probs.candidates],
            "probs_v_error": list(scores),
            "downstream_error": None
            if downstream is None
            else [downstream.get(i, math.nan) for i in range(len(scores))],
            "chosen_by": "probs @ v" if downstream is None else "downstream outputs",
        }
        self.probs = self.probs.candidates[best].train(self.training)

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
