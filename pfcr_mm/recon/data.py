"""Where a unit's inputs and targets come from.

The engine needs, per unit and per calibration batch: the FP input ``x`` of the unit (the FP
model's activation there), its FP target ``u_fp(x)``, the extra arguments the unit's blocks are
called with, and the quantized-path input ``x_q`` (the same activation computed by the model
with every preceding unit already quantized). :class:`UnitDataSource` is that contract;
:class:`ChainDataSource` fulfils it by propagating calibration batches along the model's
chain of units.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Protocol

import torch
from torch import nn

from ..adapters.base import ReconUnit
from ..quant.calibrate import hard_rounding, quantizer_states
from ..settings import CACHE_DTYPES
from ..tree import flat_tensors, map_tensors
from .cache import GB, CacheStore
from .unit import eval_mode, unit_seed
from .units import LayerUnit, leaves


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

    def output_weights(
        self,
        unit: nn.Module,
        fp_targets: list[torch.Tensor],
        probes: int,
        seed: int,
        metric: str = "mse",
        temperature: float = 1.0,
    ) -> list[torch.Tensor] | None:
        """Per batch, how much the model's downstream outputs move with each element of the
        unit's output (shaped like ``fp_targets``), or ``None`` where the source has none (see
        ``ReconSettings.downstream_weight``); ``metric`` / ``temperature``: how a move of the
        outputs counts (:func:`probe_vectors`). ``seed``: the run's; the random projections
        depend on it and on the unit's last finest unit only, not on which units ran before."""
        ...


def probe_vectors(
    outputs: list[torch.Tensor], generator: torch.Generator, metric: str, temperature: float
) -> list[torch.Tensor]:
    """One random vector ``r`` per downstream output with ``E[r r^T] = M``, the metric by which a
    move of the outputs counts, so that ``E[(J^T r)^2]`` is the diagonal of ``J^T M J``.

    ``mse``: ``r ~ N(0, I)`` (the squared error of the outputs; ``J^T J``, Gauss-Newton).
    ``kl``: per row of logits ``z`` (the model's only output, ``(B, classes)``), with
    ``p = softmax(z / T)`` of the FP model, ``r = (onehot(y) - p) / T`` for a class ``y ~ p``:
    ``E[r r^T] = (diag(p) - p p^T) / T^2``, the Fisher information of
    ``KL(softmax(z_fp / T) || softmax(z / T))`` at the FP model (``docs/method.md`` section 4).
    """
    if metric == "mse":
        return [torch.randn(o.shape, generator=generator).to(o) for o in outputs]
    if len(outputs) != 1 or outputs[0].dim() != 2:
        raise ValueError(
            "recon.downstream_metric='kl' needs the model's logits, one (batch, classes) tensor, "
            f"as downstream outputs; got shapes {[tuple(o.shape) for o in outputs]}: use 'mse' "
            "for a detector's features"
        )
    (z,) = outputs
    p = torch.softmax(z.detach().float() / temperature, dim=-1)
    y = torch.multinomial(p.cpu(), 1, generator=generator).to(z.device)
    onehot = torch.zeros_like(p).scatter_(-1, y, 1.0)
    return [((onehot - p) / temperature).to(z)]


_UNSET = object()  # a module without a ``forward`` of its own (the class's)


class _ReachedBlock(Exception):
    """Raised by the capture hook to stop a forward once a module's input is recorded."""


class UnreachedError(RuntimeError):
    """A calibration forward (``run_batch``) never called the unit's module."""


def default_run_batch(model: nn.Module, batch: Any) -> Any:
    return model(batch)


class ChainDataSource:
    """A unit's caches, obtained by propagating calibration tensors along the chain of units.

    model: the quantized model (quantizers calibrated, in the state reconstruction should use).
    units: the finest units of the model (``plan.units``) in forward order; a unit's ``enter``
        link (the PatchMerging between two Swin stages) is applied before it.
    batches: the calibration batches (a list, or a re-iterable loader with a fixed order).
    run_batch: ``f(model, batch)`` runs the model on one batch (default ``model(batch)``); a
        detector passes its data preprocessor and mode here.
    pinned: ``(module, index)`` pairs: positional argument ``index`` of ``module`` that a
        quantized run takes from the FP run of the same batch when the inputs of a
        :class:`~pfcr_mm.recon.units.LayerUnit` are captured. A detector pins the RoIs of its
        RoI extractors: the quantized heads then see the FP model's boxes, so their inputs pair
        up with the FP targets (the quantized model's own proposals differ).
    downstream: ``f(model, batch) -> outputs`` (a tensor or nested tuples): the outputs whose
        sensitivity to a block's output weights the detection-aware term
        (:meth:`output_weights`; a detector's FPN outputs); ``None``: no weights.
    cache_dtype / cache_device: dtype and device of the propagated tensors and of the caches
        handed out (``ReconSettings.cache_dtype``). Each step computes in float32 on the model's
        device. A unit's FP and quantized-path inputs are the fronts themselves, so per image
        the source holds three tensors of a unit's input size (two fronts and the targets).
    cache_limit_gb / cache_dir: the most GB (10^9 bytes) of cached tensors held in memory, and
        where the tensors beyond go, as memory-mapped files (``CacheSettings.limit_gb``,
        ``dir``; :class:`~pfcr_mm.recon.cache.CacheStore`, ``self.cache``, counts them).
        :meth:`close` drops what the source still holds and removes the spill folder.

    Only the input of the first block is obtained by running the model: a forward pre-hook
    records it and its positional arguments and stops the forward there (for a detector, the
    cost of the patch embedding). From there two fronts move along the chain, one batch at a
    time: the FP front with every quantizer off, the quantized front with every quantizer on
    and the learned roundings hard (what the deployed model feeds the next unit). A front moves
    lazily, when a unit further on asks for its caches, so each unit it passes has already been
    learned. A unit before the fronts (the first unit of the next level) restarts them from the
    first block (recaptured, so a layer reconstructed before the blocks is taken into account).

    A :class:`~pfcr_mm.recon.units.LayerUnit` (a layer outside the blocks) is not on the chain:
    its inputs come from running each batch up to the layer, FP and quantized.
    Per level the model's blocks run about twice per batch, instead of once per unit as
    re-running the model to each unit would.
    """

    def __init__(
        self,
        model: nn.Module,
        units: Sequence[ReconUnit],
        batches: Iterable[Any],
        run_batch: Callable[[nn.Module, Any], Any] = default_run_batch,
        cache_dtype: str | torch.dtype = "float32",
        cache_device: str | torch.device = "cpu",
        pinned: Sequence[tuple[nn.Module, int]] = (),
        downstream: Callable[[nn.Module, Any], Any] | None = None,
        cache_limit_gb: float | None = None,
        cache_dir: str | Path | None = None,
    ):
        self.model = model
        self.downstream = downstream
        self._block_weights: dict[int, list[torch.Tensor]] = {}  # block output weights, by block
        self.pinned = list(pinned)
        self._pins: dict[int, list[tuple[nn.Module, Any]]] = {}  # batch -> FP values in call order
        self.units = list(units)
        self.batches = batches
        self.run_batch = run_batch
        if isinstance(cache_dtype, str):
            cache_dtype = CACHE_DTYPES[cache_dtype]
        self.cache_dtype = cache_dtype
        self.cache_device = torch.device(cache_device)
        limit = None if cache_limit_gb is None else int(cache_limit_gb * GB)
        self.cache = CacheStore(limit, cache_dir, self.cache_device, cache_dtype)
        self._index = {id(u): i for i, u in enumerate(self.units)}
        self._pos: int | None = None  # the fronts hold the inputs of units[_pos]
        self._fp: list[torch.Tensor] = []
        self._q: list[torch.Tensor] = []
        self._args: list[tuple] = []

    def _store(self, t):
        return map_tensors(self.cache.store, t)

    def close(self) -> None:
        """Drop the fronts, the kept output weights and the pinned RoIs, and remove the spill
        folder; the source can be used again afterwards (the fronts restart)."""
        self._fp, self._q, self._args, self._pos = [], [], [], None
        self._block_weights.clear()
        self._pins.clear()
        self.cache.close()

    @contextmanager
    def _pinning(self, batch_index: int, record: bool) -> Iterator[None]:
        """Inside, the pinned arguments of the batch's run are recorded (the FP run) or replaced
        by the recorded ones, call by call (a quantized run)."""
        if record:
            self._pins[batch_index] = []
        calls = iter(self._pins.get(batch_index, []))

        def hook(module: nn.Module, args: tuple, index: int):
            if record:
                self._pins[batch_index].append((module, args[index]))
                return None
            recorded = next(calls, None)
            if recorded is None or recorded[0] is not module:
                raise RuntimeError(
                    f"a quantized run called the pinned {type(module).__name__} where the FP run "
                    "of the same batch did not: the two runs must take the same path"
                )
            return (*args[:index], recorded[1], *args[index + 1 :])

        # A call through ``module(...)`` is pinned by a forward pre-hook (the module's other
        # hooks see the pinned arguments); ``forward`` is wrapped too, for the calls made to it
        # directly, which skip the hooks: mmdet's ``TwoStageDetector._forward`` calls
        # ``roi_head.forward`` (Cascade splits each stage's outputs by the proposal counts)
        hooked: set[int] = set()  # the modules whose next forward the pre-hook has pinned

        def pre_hook(module: nn.Module, args: tuple, index: int):
            hooked.add(id(module))
            return hook(module, args, index)

        def wrap(module: nn.Module, forward: Callable, index: int) -> Callable:
            def pinned_forward(*args: Any, **kwargs: Any) -> Any:
                if id(module) in hooked:
                    hooked.discard(id(module))
                else:
                    new = hook(module, args, index)
                    args = args if new is None else new
                return forward(*args, **kwargs)

            return pinned_forward

        handles, saved = [], []
        for m, i in self.pinned:
            handles.append(
                m.register_forward_pre_hook(lambda mod, args, i=i: pre_hook(mod, args, i))
            )
            saved.append((m, m.__dict__.get("forward", _UNSET)))
            m.forward = wrap(m, m.forward, i)
        try:
            yield
        finally:
            for h in handles:
                h.remove()
            for m, forward in reversed(saved):
                if forward is _UNSET:
                    del m.forward
                else:
                    m.forward = forward

    def _capture(self, module: nn.Module, batch: Any, name: str) -> tuple[torch.Tensor, tuple]:
        """Run one batch up to ``module``; its input and extra positional arguments."""
        seen: list[tuple[torch.Tensor, tuple]] = []

        def hook(mod: nn.Module, args: tuple, kwargs: dict) -> None:
            if any(v is not None and v is not False for v in kwargs.values()):
                raise NotImplementedError(
                    f"the module of unit {name!r} was called with keyword arguments "
                    f"{sorted(kwargs)}; the units take positional arguments only"
                )
            seen.append((args[0], tuple(args[1:])))
            raise _ReachedBlock

        handle = module.register_forward_pre_hook(hook, with_kwargs=True)
        try:
            self.run_batch(self.model, batch)
        except _ReachedBlock:
            pass
        finally:
            handle.remove()
        if not seen:
            raise UnreachedError(f"running a calibration batch did not reach the unit {name!r}")
        return seen[0]

    def _first_input(self, batch: Any) -> tuple[torch.Tensor, tuple]:
        return self._capture(self.units[0].block, batch, self.units[0].name)

    def _layer_io(self, unit: LayerUnit, fp: bool) -> list[torch.Tensor]:
        """A layer outside the chain: its input per batch, captured by running the model to it
        (FP: every quantizer off; otherwise quantized, learned roundings hard)."""
        states = (
            quantizer_states(self.model, weights=False, activations=False)
            if fp
            else hard_rounding(self.model)
        )
        out = []
        with eval_mode(self.model), torch.no_grad(), states:
            for i, batch in enumerate(self.batches):
                with self._pinning(i, record=fp):
                    out.append(self._store(self._capture(unit.layer, batch, unit.name)[0]))
        if not out:
            raise RuntimeError("no calibration batch: the data source was given none")
        return out

    def _restart(self) -> None:
        self._fp, self._q, self._args = [], [], []
        with eval_mode(self.model), torch.no_grad():
            for batch in self.batches:
                with quantizer_states(self.model, weights=False, activations=False):
                    x, args = self._first_input(batch)
                self._fp.append(self._store(x))
                self._args.append(args)
                with hard_rounding(self.model):
                    self._q.append(self._store(self._first_input(batch)[0]))
        if not self._fp:
            raise RuntimeError("no calibration batch: the data source was given none")
        self._pos = 0

    def _step(self, i: int, xs: list[torch.Tensor], args: list[tuple]) -> tuple[list, list]:
        """Move tensors from the input of unit ``i`` to the input of unit ``i + 1``."""
        out_x, out_args = [], []
        nxt = self.units[i + 1].enter if i + 1 < len(self.units) else None
        device = next(self.model.parameters()).device
        for x, a in zip(xs, args):
            y = self.units[i](x.to(device, torch.float32), *a)
            if nxt is not None:
                y, a = nxt(y, *a)
            out_x.append(self._store(y))
            out_args.append(a)
        return out_x, out_args

    def _advance(self, unit: nn.Module) -> int:
        """Move both fronts to the first finest unit of ``unit``; returns its position."""
        first = leaves(unit)[0]
        if id(first) not in self._index:
            raise KeyError(f"unit {unit.name!r} holds a finest unit this data source does not know")
        to = self._index[id(first)]
        if self._pos is None or to < self._pos:
            self._restart()
        with eval_mode(self.model), torch.no_grad():
            with quantizer_states(self.model, weights=False, activations=False):
                fp, args = self._fp, self._args
                for i in range(self._pos, to):
                    fp, args = self._step(i, fp, args)
            with hard_rounding(self.model):
                q, q_args = self._q, self._args
                for i in range(self._pos, to):
                    q, q_args = self._step(i, q, q_args)
        self._fp, self._q, self._args, self._pos = fp, q, args, to
        return to

    def fp_io(self, unit: nn.Module) -> tuple[list[torch.Tensor], list[torch.Tensor], list[tuple]]:
        if isinstance(unit, LayerUnit):
            self._pos = None  # the layer is about to change: the fronts restart after it
            inputs = self._layer_io(unit, fp=True)
            device = next(self.model.parameters()).device
            to_device = lambda t: t.to(device, torch.float32)  # noqa: E731
            off = quantizer_states(self.model, weights=False, activations=False)
            with eval_mode(self.model), torch.no_grad(), off:
                targets = [self._store(unit(map_tensors(to_device, x))) for x in inputs]
            return inputs, targets, [()] * len(inputs)
        self._advance(unit)
        device = next(self.model.parameters()).device
        targets = []
        with eval_mode(self.model), torch.no_grad():
            with quantizer_states(self.model, weights=False, activations=False):
                for x, args in zip(self._fp, self._args):
                    targets.append(self._store(unit(x.to(device, torch.float32), *args)))
        return list(self._fp), targets, list(self._args)

    def quant_input(self, unit: nn.Module) -> list[torch.Tensor]:
        if isinstance(unit, LayerUnit):
            return self._layer_io(unit, fp=False)
        self._advance(unit)
        return list(self._q)

    def _block_grads(
        self,
        blocks: Sequence[nn.Module],
        probes: int,
        seed: int,
        metric: str,
        temperature: float,
        consume: Callable[[int, int, list[torch.Tensor]], None],
    ) -> None:
        """Per batch ``i`` and each of ``probes`` projections ``r`` (:func:`probe_vectors`), the
        vector-Jacobian products ``J^T r`` at the outputs of ``blocks`` (in forward order), of
        the FP model (every quantizer off), handed to ``consume(i, p, [one per block])`` for
        projection ``p``: one downstream forward per batch and one backward per projection,
        whatever the number of blocks."""
        outs: dict[int, torch.Tensor] = {}  # block index -> its output in the current batch

        def enter(module: nn.Module, args: tuple) -> tuple:
            return (args[0].detach().requires_grad_(True), *args[1:])  # the graph starts here

        def record(index: int, output: torch.Tensor) -> None:
            if index in outs:
                raise RuntimeError(
                    "a block ran twice in one downstream forward: its output weights would "
                    "miss one of the calls"
                )
            outs[index] = output

        off = quantizer_states(self.model, weights=False, activations=False)
        with eval_mode(self.model), torch.enable_grad(), off:
            for i, batch in enumerate(self.batches):
                outs.clear()
                handles = [blocks[0].register_forward_pre_hook(enter)] + [
                    b.register_forward_hook(lambda m, a, o, k=k: record(k, o))
                    for k, b in enumerate(blocks)
                ]
                try:
                    outputs = flat_tensors(self.downstream(self.model, batch))
                finally:
                    for h in handles:
                        h.remove()
                if len(outs) < len(blocks):
                    raise UnreachedError("the downstream forward did not reach every block")
                if not all(isinstance(o, torch.Tensor) and o.is_floating_point() for o in outputs):
                    raise ValueError(
                        "the downstream outputs must be float tensors (or tuples of them): pass "
                        "quantize(downstream=...) returning them, e.g. a detector's features"
                    )
                gen = torch.Generator().manual_seed(seed * 1_000_003 + i)
                at = [outs[k] for k in range(len(blocks))]
                for p in range(probes):
                    rs = probe_vectors(outputs, gen, metric, temperature)
                    grads = torch.autograd.grad(
                        outputs, at, grad_outputs=rs, retain_graph=p < probes - 1, allow_unused=True
                    )
                    consume(
                        i, p, [torch.zeros_like(o) if g is None else g for g, o in zip(grads, at)]
                    )

    def output_weights(
        self,
        unit: nn.Module,
        fp_targets: list[torch.Tensor],
        probes: int,
        seed: int,
        metric: str = "mse",
        temperature: float = 1.0,
    ) -> list[torch.Tensor] | None:
        """The diagonal of ``J^T M J`` at the unit's output (``M``: the output metric,
        :func:`probe_vectors`), ``E[(J^T r)^2]`` over ``probes`` random projections, per batch.
        A unit that ends with a block (an MLP unit, a block, a group) takes the block's output
        weights (computed once per block and kept for the next levels); an MHSA unit pulls each
        projection back through its block's FP MLP unit, from its FP targets. ``None`` for a
        layer outside the blocks, or without ``downstream``.

        The projections are seeded with the run's seed for the blocks' weights, which are
        computed for every block at once when the first is asked for (one downstream forward
        per batch), and with the name of the MHSA unit's block's last finest unit for its
        pulled-back weights: the same whichever unit asks first (a resumed run asks at a later
        level)."""
        if self.downstream is None or isinstance(unit, LayerUnit):
            return None
        last = leaves(unit)[-1]
        block = last.block
        position = self._index[id(last)]
        ends_block = position + 1 == len(self.units) or self.units[position + 1].block is not block
        if ends_block:
            if not self._block_weights:
                self._all_block_weights(probes, seed, metric, temperature)
            return self._block_weights[id(block)]
        grads: list[list[torch.Tensor]] = [[] for _ in range(len(fp_targets))]
        self._block_grads(
            [block], probes, unit_seed(last.name, seed), metric, temperature,
            lambda i, p, g: grads[i].append(g[0]),
        )  # fmt: skip
        mlp = self.units[position + 1]
        device = next(self.model.parameters()).device
        weights = []
        off = quantizer_states(self.model, weights=False, activations=False)
        with eval_mode(self.model), torch.enable_grad(), off:
            for g_block, y, args in zip(grads, fp_targets, self._args):
                y = y.to(device, torch.float32).requires_grad_(True)
                z = mlp(y, *args)
                pulled = [
                    torch.autograd.grad(z, y, grad_outputs=g, retain_graph=True)[0] for g in g_block
                ]
                weights.append(self._store(torch.stack(pulled).pow(2).mean(0)))
        return weights

    def _all_block_weights(self, probes: int, seed: int, metric: str, temperature: float) -> None:
        """``E[(J^T r)^2]`` at the output of every block, per batch, into ``_block_weights``."""
        blocks = list({id(u.block): u.block for u in self.units}.values())  # forward order
        sums: list[torch.Tensor] = []  # the current batch's squares, summed over projections

        def consume(i: int, p: int, grads: list[torch.Tensor]) -> None:
            if p == 0:
                sums[:] = [g.pow(2) for g in grads]
            else:
                for acc, g in zip(sums, grads):
                    acc.add_(g.pow(2))
            if p == probes - 1:
                for b, acc in zip(blocks, sums):
                    self._block_weights.setdefault(id(b), []).append(self._store(acc / probes))

        self._block_grads(blocks, probes, seed, metric, temperature, consume)
