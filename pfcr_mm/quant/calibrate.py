"""Calibration over a forward loop, quantizer states, and the quantization summary."""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn

from ..atomic import atomic_path
from .attention import AttentionQuantizers
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


def distributed_world() -> tuple[int, int]:
    """``(rank, world size)`` of the initialized default process group, ``(0, 1)`` without."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def raise_if_any_failed(failure: BaseException | None, what: str) -> None:
    """Collective over all processes: raise in every one of them if ``failure`` is set in any,
    so that no process waits for one that stopped."""
    statuses = [None] * distributed_world()[1]
    dist.all_gather_object(statuses, None if failure is None else repr(failure))
    failed = [(rank, s) for rank, s in enumerate(statuses) if s is not None]
    if failure is not None:
        raise failure
    if failed:
        rank, message = failed[0]
        raise RuntimeError(f"{what} failed in process {rank}: {message}")


@torch.no_grad()
def calibrate_activations(model: nn.Module, forward_loop: Callable[[nn.Module], None]) -> None:
    """Run ``forward_loop(model)`` in floating point while every activation quantizer counts its
    inputs (:mod:`pfcr_mm.quant.histogram`), then choose every range. Where an attention's
    post-softmax quantizer is ``"auto"``, a second pass of ``forward_loop`` scores the
    candidates by the error of that attention's output and keeps the best
    (:mod:`pfcr_mm.quant.attention`).

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
            parts = [None] * world
            dist.all_gather_object(parts, q.observed)
            q.pool_observed(parts)
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
    choosing = [m for m in model.modules() if isinstance(m, AttentionQuantizers) and m.choosing]
    if not choosing:
        return
    for m in choosing:
        m.start_scoring()
    _run_everywhere(model, forward_loop, "post-softmax scoring")
    for m in choosing:
        scores = [m.scores]
        if world > 1:
            scores = [None] * world
            dist.all_gather_object(scores, m.scores)
        m.choose([sum(s) for s in zip(*scores)])


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
    rows = []
    for name, q in named_quantizers(model):
        if q.enabled and q.calibrated:
            rows.append(
                {
                    "module": name,
                    "kind": "weight" if is_weight_quantizer(q) else "input",
                    **q.describe(),
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
