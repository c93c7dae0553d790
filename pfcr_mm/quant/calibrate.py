"""Calibration over a forward loop, quantizer states, and the quantization summary."""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..atomic import atomic_path
from ..distributed import distributed_world, gathered, raise_if_any_failed
from ..tree import flat_tensors
from .choice import QuantizerChoice
from .quantizers import AdaRoundWeightQuantizer, BaseQuantizer


def named_quantizers(model: nn.Module) -> Iterator[tuple[str, BaseQuantizer]]:
    for name, m in model.named_modules():
        if isinstance(m, BaseQuantizer):
            yield name, m


def quantizer_state(model: nn.Module) -> dict[str, dict]:
    """Every quantizer's state dict by module name: ranges and step sizes, zero points,
    AdaRound variables, rounding modes and flags (all that reconstruction learns). The tensors
    are the quantizers' own: save or copy them before the model changes."""
    return {name: q.state_dict() for name, q in named_quantizers(model)}


def load_quantizer_state(model: nn.Module, state: dict[str, dict]) -> None:
    """Load :func:`quantizer_state` of a model of the same structure (AdaRound variables are
    created where ``state`` has them)."""
    found = dict(named_quantizers(model))
    if found.keys() != state.keys():
        raise ValueError(
            "the saved quantizer state does not match the model: missing "
            f"{sorted(found.keys() - state.keys())[:4]}, unexpected "
            f"{sorted(state.keys() - found.keys())[:4]}"
        )
    for name, q in found.items():
        q.load_state_dict(state[name])


def is_weight_quantizer(q: BaseQuantizer) -> bool:
    return isinstance(q, AdaRoundWeightQuantizer)


def set_quant_state(model: nn.Module, weights: bool, activations: bool) -> None:
    """Switch every quantizer of ``model`` to quantized (True) or floating point (False)."""
    for _, q in named_quantizers(model):
        on = weights if is_weight_quantizer(q) else activations
        q.set_state("quant" if on else "fp")


@contextmanager
def quantizer_states(model: nn.Module, weights: bool, activations: bool) -> Iterator[None]:
    """:func:`set_quant_state` inside the block; every quantizer's own state restored after."""
    saved = [(q, q.state) for _, q in named_quantizers(model)]
    try:
        set_quant_state(model, weights, activations)
        yield
    finally:
        for q, state in saved:
            q.state = state


def learned_rounding(modules: nn.Module | Iterable[nn.Module]) -> list[AdaRoundWeightQuantizer]:
    """The AdaRound quantizers in ``modules`` (a model, or units that may share layers) that have
    learned rounding variables, each once."""
    roots = [modules] if isinstance(modules, nn.Module) else list(modules)
    found = {
        id(m): m
        for root in roots
        for m in root.modules()
        if isinstance(m, AdaRoundWeightQuantizer) and m.alpha is not None
    }
    return list(found.values())


@contextmanager
def hard_rounding(modules: nn.Module | Iterable[nn.Module]) -> Iterator[None]:
    """Inside the block, every AdaRound quantizer in ``modules`` (a model, units or quantizers)
    that has learned variables rounds to ``[V >= 0]``: the integer weights the deployed model
    will have, whatever soft state reconstruction left; each rounding mode restored after."""
    saved = [(m, m.rounding) for m in learned_rounding(modules)]
    try:
        for m, _ in saved:
            m.rounding = "hard"
        yield
    finally:
        for m, rounding in saved:
            m.rounding = rounding


@dataclass
class DownstreamOutputs:
    """The model's outputs on the calibration batches, by which a quantizer choice (``"auto"``)
    is made where the scores of its first stage leave it close (:mod:`pfcr_mm.quant.choice`).

    batches: the calibration batches (this process's share), re-iterable.
    outputs: ``f(model, batch)``: a tensor or (nested) tuple of tensors, e.g. a classifier's
        logits or a detector's backbone and neck features.
    progress: called with a line after each batch.
    """

    batches: Iterable[Any]
    outputs: Callable[[nn.Module, Any], Any]
    progress: Callable[[str], None] = lambda line: None


@torch.no_grad()
def calibrate_activations(
    model: nn.Module,
    forward_loop: Callable[[nn.Module], None],
    downstream: DownstreamOutputs | None = None,
) -> None:
    """Run ``forward_loop(model)`` in floating point while every activation quantizer counts its
    inputs (:mod:`pfcr_mm.quant.histogram`), then choose every range. Where a point's quantizer
    is ``"auto"`` (an attention's probabilities, a post-GELU linear's input), a second pass of
    ``forward_loop`` scores the candidates by the error in the output of what consumes the point
    (``probs @ v``, the linear); where more than one come close and ``downstream`` is given, a
    third pass tries each of those alone and keeps the one of least error at ``downstream``'s
    outputs (:mod:`pfcr_mm.quant.choice`).

    Under ``torch.distributed`` each process runs its own share of the calibration batches; the
    histograms and scores are summed across processes (exact integer counts), so every process
    ends with the quantizers one process would have.

    Raises ``RuntimeError`` naming the enabled quantizers that saw no data: a point the forward
    loop never reached would otherwise be left with an arbitrary range.
    """
    quantizers = [(n, q) for n, q in named_quantizers(model) if not is_weight_quantizer(q)]
    _, world = distributed_world()
    for _, q in quantizers:
        q.observed = None

    def observe(m: nn.Module) -> None:
        set_quant_state(m, weights=False, activations=False)
        for _, q in quantizers:
            q.set_state("observe")
        forward_loop(m)

    _run_everywhere(model, observe, "calibration")
    if world > 1:
        for _, q in quantizers:  # the same order in every process
            q.pool_observed(gathered(q.observed))
    unseen = [n for n, q in quantizers if q.enabled and q.observed_count == 0]
    if unseen:
        raise RuntimeError(
            f"{len(unseen)} enabled quantizer(s) saw no data during calibration: "
            f"{', '.join(unseen[:20])}{' ...' if len(unseen) > 20 else ''}. The calibration "
            "forward loop must run the quantized part of the model; check the quantization scope "
            "and that the calibration set is not empty."
        )
    for _, q in quantizers:
        q.finish_calibration()
    _choose_quantizers(model, forward_loop, downstream)


def _choose_quantizers(
    model: nn.Module,
    forward_loop: Callable[[nn.Module], None],
    downstream: DownstreamOutputs | None,
) -> None:
    """Every ``"auto"`` quantizer point (post-softmax, post-GELU) chosen: scored by the error in
    its consumer's output on a pass of ``forward_loop``, the close candidates then tried alone at
    ``downstream``'s outputs (:mod:`pfcr_mm.quant.choice`)."""
    choosing = [m for m in model.modules() if isinstance(m, QuantizerChoice) and m.choosing]
    if not choosing:
        return
    for m in choosing:
        m.start_scoring()
    _run_everywhere(model, forward_loop, "quantizer choice scoring")
    scores = {m: [sum(s) for s in zip(*gathered(m.scores))] for m in choosing}
    for m in choosing:
        m.scores = None  # the scoring pass is over
    trials = (
        []
        if downstream is None
        else [(m, i) for m in choosing if len(short := m.shortlist(scores[m])) > 1 for i in short]
    )
    errors = gathered(_downstream_errors(model, trials, downstream)) if trials else []
    for m in choosing:
        tried = {i: sum(e[t] for e in errors) for t, (n, i) in enumerate(trials) if n is m}
        m.choose(scores[m], tried or None)


def _downstream_errors(
    model: nn.Module, trials: list[tuple[QuantizerChoice, int]], downstream: DownstreamOutputs
) -> list[float]:
    """For each ``(point, candidate)`` of ``trials``, the squared error at ``downstream``'s
    outputs over this process's batches when only that candidate quantizes (all else FP)."""
    errors = [0.0] * len(trials)

    def loop(m: nn.Module) -> None:
        total = len(downstream.batches) if hasattr(downstream.batches, "__len__") else "?"
        for b, batch in enumerate(downstream.batches):
            ref = flat_tensors(downstream.outputs(m, batch))
            if not all(isinstance(r, torch.Tensor) and r.is_floating_point() for r in ref):
                raise TypeError(
                    "a quantizer choice ('auto') compares the model's outputs, but they are not "
                    f"float tensors ({type(ref[0]).__name__}): pass quantize(downstream=f) with "
                    "f(model, batch) returning tensors, or fix QuantConfig.post_softmax/post_gelu"
                )
            for t, (point, index) in enumerate(trials):
                with point.trying(index):
                    out = flat_tensors(downstream.outputs(m, batch))
                errors[t] += sum(float((o - r).pow(2).sum()) for o, r in zip(out, ref))
            downstream.progress(
                f"quantizer choice: batch {b + 1}/{total}, {len(trials)} candidates tried"
            )

    _run_everywhere(model, loop, "quantizer choice")
    return errors


def _run_everywhere(model: nn.Module, forward_loop: Callable[[nn.Module], None], what: str) -> None:
    """``forward_loop(model)`` in eval mode with every quantizer in floating point after it;
    in a distributed run, a failure in one process is raised in all of them."""
    _, world = distributed_world()
    was_training = model.training
    model.eval()
    failure = None
    try:
        forward_loop(model)
    except Exception as err:
        if world == 1:
            raise
        failure = err  # the other processes must hear of it, or they wait for this one
    finally:
        model.train(was_training)
        set_quant_state(model, weights=False, activations=False)
    if world > 1:
        raise_if_any_failed(failure, what)


def quant_summary(model: nn.Module) -> list[dict]:
    """One row per enabled quantizer: module, bits, granularity, scale and range."""
    choices = {
        f"{name}.{m.choice_slot}": m.choice_record
        for name, m in model.named_modules()
        if isinstance(m, QuantizerChoice) and m.choice_record is not None
    }
    rows = []
    for name, q in named_quantizers(model):
        if q.enabled and q.calibrated:
            rows.append(
                {
                    "module": name,
                    "kind": "weight" if is_weight_quantizer(q) else "input",
                    **q.describe(),
                    **({"choice": choices[name]} if name in choices else {}),
                }
            )
    return rows


def write_quant_summary(model: nn.Module, path: str | Path, fp_parts: list[str]) -> Path:
    """Write the summary as JSON (``path``) and as an aligned table (``path`` with .txt)."""
    path = Path(path)
    rows = quant_summary(model)
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps({"quantizers": rows, "floating_point": fp_parts}, indent=1))
    head = (
        f"{'module':60s} {'kind':6s} {'quantizer':10s} {'bits':>4s} {'granularity':12s} "
        f"{'scale_min':>10s} {'scale_max':>10s} {'range':>24s}"
    )
    lines = [head, "-" * len(head)]
    for r in rows:
        lines.append(
            f"{r['module']:60s} {r['kind']:6s} {r['quantizer']:10s} {r['bits']:4d} "
            f"{r['granularity']:12s} {r['scale_min']:10.3g} {r['scale_max']:10.3g} "
            f"[{r['range_min']:10.3g}, {r['range_max']:10.3g}]"
        )
    lines += ["", "Kept in floating point: " + ", ".join(fp_parts)]
    with atomic_path(path.with_suffix(".txt")) as tmp:
        tmp.write_text("\n".join(lines) + "\n")
    return path
