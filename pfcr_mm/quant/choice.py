"""A quantizer point chosen at calibration among candidates: the attention probabilities
(``QuantConfig.post_softmax="auto"``, :mod:`pfcr_mm.quant.attention`) and the inputs of an
MLP's second linear after GELU (``QuantConfig.post_gelu="auto"``, :mod:`pfcr_mm.quant.post_gelu`).

The point holds a :class:`PendingChoice` until calibration has seen its inputs; then every
candidate is built from those statistics, and the choice is made in two stages over the
calibration images (:func:`pfcr_mm.quant.calibrate.calibrate_activations` runs them):

1. every candidate is scored by the squared error it causes in the output of the operation that
   consumes the point (``probs @ v``; the linear's output), one pass for all candidates; those
   within :data:`SHORTLIST_RATIO` of the best score make the shortlist;
2. where the shortlist holds more than one and the caller gives the model's outputs, each
   shortlisted candidate is tried alone (everything else in floating point) and the one of least
   error at those outputs is kept; otherwise the best of stage 1.

The module owning the point mixes in :class:`QuantizerChoice`; the choice is recorded for the
quantization summary and saved with the model as the owner's extra state.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import torch

from ..settings import QuantConfig
from .quantizers import BaseQuantizer, LogQuantizer, ShiftedLogQuantizer, UniformQuantizer

# the candidates whose stage-1 error is within this factor of the best are tried downstream
SHORTLIST_RATIO = 2.0


def build_quantizer(kind: str, k: float | None, bits: int, cfg: QuantConfig) -> BaseQuantizer:
    """A candidate of ``bits`` bits: ``"uniform"`` (range by ``cfg.act_range``), ``"log"`` or
    ``"shift_log"`` of base ``2^(1/k)``."""
    if kind == "uniform":
        return UniformQuantizer(bits, range_method=cfg.act_range)
    return {"log": LogQuantizer, "shift_log": ShiftedLogQuantizer}[kind](bits, k=k)


def build_candidates(specs: tuple, bits: int, cfg: QuantConfig) -> list[BaseQuantizer]:
    """The quantizers of ``specs``, ``(kind, k)`` pairs (:func:`build_quantizer`)."""
    return [build_quantizer(kind, k, bits, cfg) for kind, k in specs]


class PendingChoice(BaseQuantizer):
    """A point before the choice: it observes its inputs like any quantizer; calibration then
    builds every candidate (``build()``) from those statistics, and the owning
    :class:`QuantizerChoice` scores them and keeps one in its place."""

    def __init__(self, bits: int, build: Callable[[], list[BaseQuantizer]]):
        super().__init__(bits)
        self.build = build
        self.candidates: list[BaseQuantizer] = []  # a plain list: not part of the state

    def finish_calibration(self) -> None:
        stats = self.take_observed()
        self.candidates = self.build()
        for c in self.candidates:
            c.calibrate_from_stats(stats)
        self.calibrated = True

    def fake_quant(self, x: torch.Tensor) -> torch.Tensor:
        raise RuntimeError("quantizer 'auto': the choice was not made (calibrate first)")


class QuantizerChoice:
    """Mixin of a module whose quantizer attribute :attr:`choice_slot` may hold a
    :class:`PendingChoice`. :meth:`scored` is what the module's forward returns while scoring."""

    choice_slot: str
    consumer: str  # what consumes the point, whose error scores the candidates (stage 1)
    state_key: str  # the choice's key in the owner's extra state
    cfg: QuantConfig
    scores: list[float] | None = None  # the candidates' stage-1 errors while scoring
    # how this run's choice was made (not saved with the model): the candidates' errors
    choice_record: dict | None = None

    @property
    def pending(self) -> BaseQuantizer:
        return getattr(self, self.choice_slot)

    @property
    def choosing(self) -> bool:
        return isinstance(self.pending, PendingChoice) and self.pending.calibrated

    def start_scoring(self) -> None:
        device = next(self.parameters()).device
        self.pending.candidates = [c.to(device) for c in self.pending.candidates]
        self.scores = [0.0] * len(self.pending.candidates)

    def scored(self, x: torch.Tensor, consume: Callable[[torch.Tensor], torch.Tensor]):
        """``consume(x)``, the FP result; each candidate's squared error in it is added to
        :attr:`scores`."""
        ref = consume(x)
        for i, c in enumerate(self.pending.candidates):
            self.scores[i] += float((consume(c.fake_quant(x)) - ref).pow(2).sum())
        return ref

    @staticmethod
    def shortlist(scores: list[float]) -> list[int]:
        """The candidates whose stage-1 error is within :data:`SHORTLIST_RATIO` of the best."""
        best = min(scores)
        return [i for i, s in enumerate(scores) if s <= SHORTLIST_RATIO * best]

    @contextmanager
    def trying(self, index: int) -> Iterator[None]:
        """Inside the block the point goes through candidate ``index``, quantized whatever the
        model's other quantizers do (the downstream stage of the choice)."""
        pending = self.pending
        candidate = pending.candidates[index]
        candidate.set_state("quant")
        setattr(self, self.choice_slot, candidate)
        try:
            yield
        finally:
            candidate.set_state("fp")
            setattr(self, self.choice_slot, pending)

    def choose(self, scores: list[float], downstream: dict[int, float] | None = None) -> None:
        """Keep a candidate. ``scores``: every candidate's stage-1 error; ``downstream``: the
        error at the model's outputs of the shortlisted ones, which then decides (both summed
        over all processes)."""
        by = downstream or dict(enumerate(scores))
        best = min(by, key=by.__getitem__)
        candidates = self.pending.candidates
        self.choice_record = {
            "candidates": [c.describe()["quantizer"] for c in candidates],
            "consumer": self.consumer,
            "consumer_error": list(scores),
            "downstream_error": None
            if downstream is None
            else [downstream.get(i, math.nan) for i in range(len(scores))],
            "chosen_by": self.consumer if downstream is None else "downstream outputs",
        }
        setattr(self, self.choice_slot, candidates[best].train(self.training))

    def chosen(self) -> dict:
        """What the point is: ``{"kind": "log" | "shift_log", "k": k}``, ``{"kind": "uniform"}``
        or, before the choice, ``{"kind": "pending"}``."""
        q = self.pending
        if isinstance(q, LogQuantizer):
            return {"kind": "shift_log" if isinstance(q, ShiftedLogQuantizer) else "log", "k": q.k}
        return {"kind": "uniform" if isinstance(q, UniformQuantizer) else "pending"}

    # The choice travels with the state dict: loading rebuilds the chosen quantizer before its
    # own parameters load (a module's extra state is read before its children's).
    def get_extra_state(self) -> dict:
        return {self.state_key: self.chosen()}

    def set_extra_state(self, extra: dict) -> None:
        point = extra[self.state_key]
        if point["kind"] != "pending":
            rebuilt = build_quantizer(point["kind"], point.get("k"), self.pending.bits, self.cfg)
            device = next(self.parameters()).device
            setattr(self, self.choice_slot, rebuilt.to(device).train(self.training))
