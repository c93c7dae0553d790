"""Where a unit's inputs and targets come from.

The engine needs, per unit and per calibration batch: the FP input ``x`` of the unit (the FP
model's activation there), its FP target ``u_fp(x)``, the extra arguments the unit's blocks are
called with, and the quantized-path input ``x_q`` (the same activation computed by the model
with every preceding unit already quantized). :class:`UnitDataSource` is that contract;
:class:`ModelDataSource` fulfils it by running a model on calibration batches.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any, Protocol

import torch
from torch import nn

from ..adapters.base import ReconUnit
from ..quant.calibrate import is_weight_quantizer, named_quantizers
from ..quant.quantizers import AdaRoundWeightQuantizer
from .engine import CACHE_DTYPES, eval_mode
from .units import leaves


class UnitDataSource(Protocol):
    """The data a unit's reconstruction needs; lists hold one entry per calibration batch."""

    def fp_io(self, unit: nn.Module) -> tuple[list[torch.Tensor], list[torch.Tensor], list[tuple]]:
        """``(fp_inputs, fp_targets, extra_args)``: the FP input ``(B, ..., C)`` of the unit, the
        FP unit's output on it (same shape), and the arguments after ``x``."""
        ...

    def quant_input(self, unit: nn.Module) -> list[torch.Tensor]:
        """The unit's input computed by the model with the preceding units quantized, in the
        same batches and order as :meth:`fp_io`."""
        ...


@contextmanager
def quantizer_states(model: nn.Module, weights: bool, activations: bool) -> Iterator[None]:
    """Temporarily switch every quantizer to quantized (True) or FP (False); restores the states
    each quantizer had before."""
    saved = [(q, q.state) for _, q in named_quantizers(model)]
    try:
        for q, _ in saved:
            on = weights if is_weight_quantizer(q) else activations
            q.set_state("quant" if on else "fp")
        yield
    finally:
        for q, state in saved:
            q.state = state


@contextmanager
def hard_rounding(model: nn.Module) -> Iterator[None]:
    """Temporarily round every AdaRound quantizer that has learned variables to ``[V >= 0]``.

    The quantized-path input of a unit is computed this way: it is what the deployed model will
    feed the unit, whatever the soft state the preceding units were left in.
    """
    saved = [
        (m, m.rounding)
        for m in model.modules()
        if isinstance(m, AdaRoundWeightQuantizer) and m.alpha is not None
    ]
    try:
        for m, _ in saved:
            m.rounding = "hard"
        yield
    finally:
        for m, rounding in saved:
            m.rounding = rounding


class _ReachedBlock(Exception):
    """Raised by the capture hook to stop a forward once the unit's input is recorded."""


def default_run_batch(model: nn.Module, batch: Any) -> Any:
    return model(batch)


class ModelDataSource:
    """Obtains a unit's caches by running ``run_batch(model, batch)`` for each calibration batch.

    model: the quantized model (quantizers calibrated, in the state reconstruction should use).
    units: the finest units of the model (``plan.units``), to know what precedes a unit that
        starts inside a block (an MLP unit starts after its block's MHSA unit).
    batches: the calibration batches, iterated once per capture (a list, or a re-iterable
        loader with a fixed order, so that FP and quantized-path caches line up).
    run_batch: ``f(model, batch)`` runs the model on one batch (default ``model(batch)``); a
        detector passes its data preprocessor and mode here.
    cache_dtype / cache_device: where the caches are kept (``ReconSettings.cache_dtype``).

    A forward pre-hook on the unit's first block records the block's input and positional
    arguments and stops the forward there, so a capture costs the model up to that block.
    Block keyword arguments are not supported (the unit functions take positional ones).
    """

    def __init__(
        self,
        model: nn.Module,
        units: Sequence[ReconUnit],
        batches: Iterable[Any],
        run_batch: Callable[[nn.Module, Any], Any] = default_run_batch,
        cache_dtype: str | torch.dtype = "float32",
        cache_device: str | torch.device = "cpu",
    ):
        self.model = model
        self.batches = batches
        self.run_batch = run_batch
        if isinstance(cache_dtype, str):
            cache_dtype = CACHE_DTYPES[cache_dtype]
        self.cache_dtype = cache_dtype
        self.cache_device = torch.device(cache_device)
        self._block_parts: dict[int, list[ReconUnit]] = {}
        for u in units:
            self._block_parts.setdefault(id(u.block), []).append(u)

    def _store(self, t: torch.Tensor) -> torch.Tensor:
        return t.detach().to(self.cache_device, self.cache_dtype)

    def _block_input(self, block: nn.Module, batch: Any, name: str) -> tuple[torch.Tensor, tuple]:
        """Run one batch up to ``block``; its input and extra positional arguments."""
        seen: list[tuple[torch.Tensor, tuple]] = []

        def hook(module: nn.Module, args: tuple, kwargs: dict) -> None:
            if any(v is not None and v is not False for v in kwargs.values()):
                raise NotImplementedError(
                    f"the block of unit {name!r} was called with keyword arguments "
                    f"{sorted(kwargs)}; the units take positional arguments only"
                )
            seen.append((args[0], tuple(args[1:])))
            raise _ReachedBlock

        handle = block.register_forward_pre_hook(hook, with_kwargs=True)
        try:
            self.run_batch(self.model, batch)
        except _ReachedBlock:
            pass
        finally:
            handle.remove()
        if not seen:
            raise RuntimeError(f"running a calibration batch did not reach the unit {name!r}")
        return seen[0]

    def _unit_inputs(self, unit: nn.Module) -> Iterator[tuple[torch.Tensor, tuple]]:
        """Per batch, the unit's input ``(B, ..., C)`` on the model's device and its extra
        arguments, in the model's current quantizer states."""
        first = leaves(unit)[0]
        parts = self._block_parts.get(id(first.block), [])
        if not any(p is first for p in parts):
            raise KeyError(f"unit {unit.name!r} holds a finest unit this data source does not know")
        before = parts[: [id(p) for p in parts].index(id(first))]  # MHSA before an MLP unit
        n = 0
        with eval_mode(self.model), torch.no_grad():
            for batch in self.batches:
                x, args = self._block_input(first.block, batch, unit.name)
                for part in before:
                    x = part(x, *args)
                n += 1
                yield x, args
        if n == 0:
            raise RuntimeError(f"no calibration batch for unit {unit.name!r}: none given")

    def fp_io(self, unit: nn.Module) -> tuple[list[torch.Tensor], list[torch.Tensor], list[tuple]]:
        inputs, targets, extra = [], [], []
        with quantizer_states(self.model, weights=False, activations=False), torch.no_grad():
            for x, args in self._unit_inputs(unit):
                # the target from the full-precision input, before it is cast for the cache
                targets.append(self._store(unit(x, *args)))
                inputs.append(self._store(x))
                extra.append(args)
        return inputs, targets, extra

    def quant_input(self, unit: nn.Module) -> list[torch.Tensor]:
        with hard_rounding(self.model):
            return [self._store(x) for x, _ in self._unit_inputs(unit)]
