"""Reconstruction of one unit (method.md section 4), and hardening at the end of a run.

For a unit ``u`` with cached FP inputs ``x``, quantized-path inputs ``x_q`` (the output of the
already-quantized preceding units) and FP targets ``y = u_fp(x)``, :func:`reconstruct_unit`
learns the AdaRound variables ``V`` of the unit's weight quantizers and the step sizes ``s`` of
its activation quantizers (LSQ) by minimizing, with Adam,

    L = || u_q(x_mix) - y ||^2  +  round_weight * sum_layers sum(1 - |2 h(V) - 1|^beta)

where ``x_mix`` takes each element from ``x`` with probability ``drop_prob`` and from ``x_q``
otherwise (QDrop), the squared error is summed over channels and averaged over tokens and images
(the AdaRound/BRECQ scale the regularizer weight 0.01 was chosen against), the regularizer is off
during the first ``warmup`` fraction of the iterations, and ``beta`` decays linearly from
``beta_start`` to ``beta_end`` after it. Everything else in the model stays frozen.
"""

from __future__ import annotations

import math
import time
import zlib
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field

import torch
from torch import nn

from ..quant.calibrate import is_weight_quantizer
from ..quant.config import dataclass_from_dict
from ..quant.quantizers import AdaRoundWeightQuantizer, BaseQuantizer, UniformQuantizer
from .units import unit_level

# Progressive Optimization Strategy (method.md section 4; the paper names it without details)
POS_STRATEGIES = ("none", "two_stage", "shrink", "anneal")
CACHE_DTYPES = {"float32": torch.float32, "float16": torch.float16}


@dataclass
class ReconSettings:
    """How each unit is reconstructed; small and serializable like ``QuantConfig``.

    iters: optimizer steps per unit (peers: 20k for paper-grade runs).
    batch_size: samples per step, drawn from the cached calibration batches.
    w_lr: Adam learning rate of the AdaRound variables.
    a_lr: Adam learning rate of the activation step sizes, cosine-annealed to 0 over a unit.
    round_weight: weight of the AdaRound regularizer.
    beta_start / beta_end / warmup: the regularizer temperature decays linearly from beta_start
        to beta_end after the first ``warmup`` fraction of a unit's iterations (regularizer off).
    pos: the progressive optimization strategy of a fine-to-coarse run:

        * ``"none"``: every unit runs the same recipe (warm-up, then its own decay of beta);
        * ``"two_stage"`` (POS option (a)): in the first half of a unit's iterations its
          activation quantizers compute in floating point and only the weight rounding is
          learned; in the second half everything is quantized and learned;
        * ``"shrink"`` (option (b)): the iteration budget of the run is split equally among its
          units, so the fine levels (many small units) get most of it and each coarser unit
          fewer iterations than a block-per-level split would give (see
          :func:`pfcr_mm.recon.driver.unit_iterations`);
        * ``"anneal"`` (option (c), the default): one decay of beta spread over the whole run,
          level after level, instead of restarting in every unit.

        The default was chosen on the demo benchmark (``tools/benchmark_recon.py``, README):
        no option separated from the others in accuracy beyond the spread over seeds, and
        ``"anneal"`` gave the lowest output error on held-out images in three of the four
        model/bit-width cells and tied in the fourth. With the block method (one level) it
        equals ``"none"``.
    drop_prob: probability that an input element comes from the FP input instead of the
        quantized path (QDrop); 0 uses the quantized-path input only.
    cache_dtype: dtype of the cached inputs and targets (``float32`` or ``float16``).
    seed: seeds the sampling of batches and QDrop masks (per unit, combined with its name).
    log_every: report progress every this many iterations (0: only at the end of a unit).
    """

    iters: int = 20000
    batch_size: int = 32
    w_lr: float = 1e-3
    a_lr: float = 4e-5
    round_weight: float = 0.01
    beta_start: float = 20.0
    beta_end: float = 2.0
    warmup: float = 0.2
    pos: str = "anneal"
    drop_prob: float = 0.5
    cache_dtype: str = "float32"
    seed: int = 0
    log_every: int = 1000

    def __post_init__(self) -> None:
        if self.iters < 1 or self.batch_size < 1:
            raise ValueError("ReconSettings.iters and batch_size must be >= 1")
        if not 0.0 <= self.warmup < 1.0:
            raise ValueError(f"ReconSettings.warmup must be in [0, 1), got {self.warmup}")
        if not 0.0 <= self.drop_prob <= 1.0:
            raise ValueError(f"ReconSettings.drop_prob must be in [0, 1], got {self.drop_prob}")
        if self.pos not in POS_STRATEGIES:
            raise ValueError(f"ReconSettings.pos must be one of {POS_STRATEGIES}, got {self.pos!r}")
        if self.cache_dtype not in CACHE_DTYPES:
            raise ValueError(
                f"ReconSettings.cache_dtype must be one of {tuple(CACHE_DTYPES)}, "
                f"got {self.cache_dtype!r}"
            )

    @property
    def torch_cache_dtype(self) -> torch.dtype:
        return CACHE_DTYPES[self.cache_dtype]

    @classmethod
    def from_dict(cls, d: dict) -> ReconSettings:
        return dataclass_from_dict(cls, d, "reconstruction")

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class UnitRecord:
    """What one unit's reconstruction did. ``losses``: the reconstruction (MSE) term per
    iteration; ``first_loss`` / ``last_loss`` are its first and last entries."""

    name: str
    level: int
    iters: int
    first_loss: float
    last_loss: float
    seconds: float
    losses: list[float] = field(default_factory=list, repr=False)
    n_weight_quantizers: int = 0
    n_act_quantizers: int = 0
    # the error with integer weights (learned rounding hard, or to nearest before any learning)
    # on the quantized-path inputs of the first cached batches, before and after the unit
    hard_before: float = math.nan
    hard_after: float = math.nan
    peak_mem_mb: dict = field(default_factory=dict)  # process peaks when the unit was done


def beta_at(progress: float, settings: ReconSettings) -> float:
    """The temperature at ``progress`` in [0, 1] of the decay: linear ``beta_start -> beta_end``."""
    progress = min(max(progress, 0.0), 1.0)
    return settings.beta_end + (settings.beta_start - settings.beta_end) * (1.0 - progress)


@contextmanager
def eval_mode(module: nn.Module) -> Iterator[None]:
    """Evaluation mode (no dropout, no drop-path) inside; every sub-module's own flag restored
    after. A unit is not a child of the model, so ``unit.train(unit.training)`` would not do."""
    saved = [(m, m.training) for m in module.modules()]
    module.train(False)
    try:
        yield
    finally:
        for m, flag in saved:
            m.training = flag


# ---------------------------------------------------------------------------------------------
# Which quantizers a unit trains


def _quantizers_hit(unit: nn.Module, x: torch.Tensor, args: tuple) -> list[BaseQuantizer]:
    """The quantizers the unit's forward actually calls, in call order.

    A finest unit shares its block with the other unit of that block, so its quantizers are not
    simply ``unit.modules()``: the MHSA unit must not train the MLP's step sizes.
    """
    hit: dict[int, BaseQuantizer] = {}

    def record(module: nn.Module, args: tuple, output: torch.Tensor) -> None:
        hit.setdefault(id(module), module)  # returns None: the output is left as it is

    hooks = [
        m.register_forward_hook(record) for m in unit.modules() if isinstance(m, BaseQuantizer)
    ]
    try:
        with torch.no_grad():
            unit(x, *args)
    finally:
        for h in hooks:
            h.remove()
    return list(hit.values())


def _weight_owners(unit: nn.Module) -> dict[int, nn.Module]:
    """Weight quantizer id -> the layer whose ``weight`` it quantizes."""
    return {
        id(m.weight_quantizer): m
        for m in unit.modules()
        if isinstance(getattr(m, "weight_quantizer", None), AdaRoundWeightQuantizer)
    }


def _active_quantizers(
    unit: nn.Module, x: torch.Tensor, args: tuple
) -> tuple[list[tuple[AdaRoundWeightQuantizer, nn.Module]], list[BaseQuantizer]]:
    """(weight quantizer, its layer) pairs and activation quantizers: those the unit calls that
    are enabled and in the quantized state."""
    owners = _weight_owners(unit)
    weights, acts = [], []
    for q in _quantizers_hit(unit, x, args):
        if not q.enabled or q.state != "quant":
            continue
        if is_weight_quantizer(q):
            if id(q) not in owners:
                raise RuntimeError(
                    f"weight quantizer {q!r} of unit {getattr(unit, 'name', '?')!r} has no layer "
                    "with a matching weight_quantizer attribute"
                )
            weights.append((q, owners[id(q)]))
        else:
            acts.append(q)
    return weights, acts


# ---------------------------------------------------------------------------------------------
# Sampling from the caches


class _Batches:
    """Draws training batches from cached lists of ``(B_i, ...)`` tensors.

    When all cached batches have the same per-sample shape and the same extra arguments (a
    classifier at one resolution), samples are drawn from the pooled cache, as BRECQ/QDrop do;
    otherwise (detection images of different sizes) one cached batch is drawn, then samples
    within it. Extra arguments are shared by a whole batch (``hw_shape``), never per sample.
    """

    def __init__(
        self,
        q_inputs: Sequence[torch.Tensor],
        fp_inputs: Sequence[torch.Tensor],
        fp_targets: Sequence[torch.Tensor],
        extra_args: Sequence[tuple],
        batch_size: int,
        device: torch.device,
        dtype: torch.dtype,
    ):
        n = len(fp_inputs)
        if not (n and len(q_inputs) == n and len(fp_targets) == n and len(extra_args) == n):
            raise ValueError(
                "q_inputs, fp_inputs, fp_targets and extra_args must be non-empty lists of the "
                f"same length, got {len(q_inputs)}, {n}, {len(fp_targets)}, {len(extra_args)}"
            )
        for i, (q, x, y) in enumerate(zip(q_inputs, fp_inputs, fp_targets)):
            if q.shape != x.shape or y.shape[0] != x.shape[0]:
                raise ValueError(
                    f"cached batch {i}: quantized input {tuple(q.shape)}, FP input "
                    f"{tuple(x.shape)} and target {tuple(y.shape)} do not match"
                )
        self.q, self.x, self.y, self.args = q_inputs, fp_inputs, fp_targets, extra_args
        self.batch_size, self.device, self.dtype = batch_size, device, dtype
        self.sizes = [t.shape[0] for t in fp_inputs]
        self.pooled = all(
            t.shape[1:] == fp_inputs[0].shape[1:] and _args_equal(a, extra_args[0])
            for t, a in zip(fp_inputs, extra_args)
        ) and all(t.shape[1:] == fp_targets[0].shape[1:] for t in fp_targets)
        self.offsets = torch.tensor([0] + self.sizes).cumsum(0)

    def _move(self, t: torch.Tensor) -> torch.Tensor:
        return t.to(self.device, self.dtype, non_blocking=True)

    def draw(
        self, generator: torch.Generator
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, tuple]:
        """One training batch ``(x_q, x_fp, y_fp, extra_args)`` on the unit's device."""
        if self.pooled:
            total = int(self.offsets[-1])
            idx = torch.randperm(total, generator=generator)[: self.batch_size].sort().values
            which = torch.searchsorted(self.offsets, idx, right=True) - 1
            q, x, y = [], [], []
            for b in which.unique().tolist():
                rows = idx[which == b] - self.offsets[b]
                q.append(self._move(self.q[b].index_select(0, rows)))
                x.append(self._move(self.x[b].index_select(0, rows)))
                y.append(self._move(self.y[b].index_select(0, rows)))
            return torch.cat(q), torch.cat(x), torch.cat(y), self.args[0]
        b = int(torch.randint(len(self.sizes), (1,), generator=generator))
        if self.sizes[b] > self.batch_size:
            rows = torch.randperm(self.sizes[b], generator=generator)[: self.batch_size]
            pick = lambda t: t.index_select(0, rows)  # noqa: E731
        else:
            pick = lambda t: t  # noqa: E731
        return (
            self._move(pick(self.q[b])),
            self._move(pick(self.x[b])),
            self._move(pick(self.y[b])),
            self.args[b],
        )


def _args_equal(a: tuple, b: tuple) -> bool:
    if len(a) != len(b):
        return False
    for u, v in zip(a, b):
        if isinstance(u, torch.Tensor) or isinstance(v, torch.Tensor):
            if not (
                isinstance(u, torch.Tensor) and isinstance(v, torch.Tensor) and torch.equal(u, v)
            ):
                return False
        elif u != v:
            return False
    return True


def unit_seed(name: str, seed: int) -> int:
    """A per-unit seed: stable across runs and independent of which units ran before."""
    return (seed * 1_000_003 + zlib.crc32(name.encode())) % (2**63)


# ---------------------------------------------------------------------------------------------
# One unit


def _reconstruction_error(out: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Squared error summed over channels (last axis), averaged over images and tokens."""
    return (out - target).pow(2).sum(-1).mean()


HARD_EVAL_BATCHES = 4


def _hard_error(unit: nn.Module, batches: _Batches, weights: list) -> float:
    """The unit's error with integer weights on the quantized-path inputs of the first cached
    batches: what the deployed unit does, as opposed to the soft rounding being trained."""
    saved = [(q, q.rounding) for q, _ in weights]
    n = min(HARD_EVAL_BATCHES, len(batches.sizes))
    try:
        for q, _ in weights:
            if q.alpha is not None:
                q.rounding = "hard"
        with torch.no_grad(), eval_mode(unit):
            errors = [
                _reconstruction_error(
                    unit(batches._move(batches.q[i]), *batches.args[i]), batches._move(batches.y[i])
                ).item()
                for i in range(n)
            ]
    finally:
        for q, rounding in saved:
            q.rounding = rounding
    return sum(errors) / n


def reconstruct_unit(
    unit: nn.Module,
    q_inputs: Sequence[torch.Tensor],
    fp_inputs: Sequence[torch.Tensor],
    fp_targets: Sequence[torch.Tensor],
    extra_args: Sequence[tuple] | None,
    settings: ReconSettings,
    progress: Callable[[int, float], None] | None = None,
    beta_span: tuple[float, float] = (0.0, 1.0),
) -> UnitRecord:
    """Learn the rounding and step sizes of ``unit`` so that it reproduces its FP targets.

    unit: a finest or composed unit, ``unit(x, *args) -> y`` with ``x`` and ``y`` of the same
        shape ``(B, ..., C)``, channels last; its quantizers must be in the quantized state.
    q_inputs / fp_inputs / fp_targets: cached batches (any dtype and device; moved to the unit's
        device and float32 per batch), one tensor per batch, batch first; ``q_inputs[i]`` and
        ``fp_inputs[i]`` have the same shape.
    extra_args: per batch, the arguments after ``x`` (mmdet Swin ``(hw_shape,)``); ``None``: none.
    progress: called as ``progress(iteration, loss)`` every ``settings.log_every`` iterations.
    beta_span: the part of the temperature decay this unit covers (``(0, 1)``: the whole decay;
        the driver passes a level's share under ``pos="anneal"``).

    The AdaRound variables are initialized (``init_adaround``) on the first reconstruction of a
    layer and carried over afterwards. If the loss becomes NaN or infinite, everything the call
    changed (AdaRound variables, rounding modes, step sizes) is restored and
    ``FloatingPointError`` is raised, naming the unit. Returns a :class:`UnitRecord`.
    """
    name = getattr(unit, "name", type(unit).__name__)
    level = unit_level(unit)
    if extra_args is None:
        extra_args = [()] * len(fp_inputs)
    device = next(unit.parameters()).device
    batches = _Batches(
        q_inputs, fp_inputs, fp_targets, extra_args, settings.batch_size, device, torch.float32
    )
    probe = q_inputs[0][:1].to(device, torch.float32)
    weights, act_quantizers = _active_quantizers(unit, probe, tuple(extra_args[0]))
    # learned step sizes: the uniform quantizers (a log2 quantizer has no learned step)
    acts = [q for q in act_quantizers if isinstance(q, UniformQuantizer)]
    if not weights and not acts:
        raise RuntimeError(
            f"unit {name!r} calls no enabled quantizer in the quantized state: nothing to learn "
            "(switch the model to quantized with set_quant_state first)"
        )

    # Snapshot what this call may change, so a failure leaves the model as it found it.
    saved_w = [(q, q.alpha, q.rounding) for q, _ in weights]
    saved_a = [(q, q.scale.detach().clone()) for q in acts]
    saved_grad = {id(p): (p, p.requires_grad) for p in unit.parameters()}

    hard_before = _hard_error(unit, batches, weights)
    seed = unit_seed(name, settings.seed)
    sampler = torch.Generator().manual_seed(seed)
    masker = torch.Generator(device=device).manual_seed(seed)
    losses: list[float] = []
    start = time.perf_counter()
    try:
        for q, layer in weights:
            if q.alpha is None:
                q.init_adaround(layer.weight)
            else:
                # Train a copy of the V the previous level learned: the original stays intact
                # (and is put back) if this unit fails.
                q.alpha = nn.Parameter(q.alpha.detach().clone())
            q.rounding = "soft"  # a level learns from the soft state the previous one left
        for p in unit.parameters():
            p.requires_grad_(False)
        alphas = [q.alpha for q, _ in weights]
        scales = [q.scale for q in acts]
        for p in alphas + scales:
            p.requires_grad_(True)

        opt_w = torch.optim.Adam(alphas, lr=settings.w_lr) if alphas else None
        opt_a = torch.optim.Adam(scales, lr=settings.a_lr) if scales else None
        sched_a = (
            torch.optim.lr_scheduler.CosineAnnealingLR(opt_a, T_max=settings.iters, eta_min=0.0)
            if opt_a
            else None
        )
        warm = int(settings.warmup * settings.iters)
        # POS "two_stage": activations in floating point for the first half (weights only)
        fp_acts_until = settings.iters // 2 if settings.pos == "two_stage" and weights else 0
        lo, hi = beta_span
        with torch.enable_grad(), eval_mode(unit):
            for it in range(settings.iters):
                if it == 0 and fp_acts_until:
                    for q in act_quantizers:
                        q.state = "fp"
                if it == fp_acts_until:
                    for q in act_quantizers:
                        q.state = "quant"
                q_in, fp_in, target, args = batches.draw(sampler)
                if settings.drop_prob > 0:
                    keep_fp = (
                        torch.rand(fp_in.shape, generator=masker, device=device)
                        < settings.drop_prob
                    )
                    x = torch.where(keep_fp, fp_in, q_in)
                else:
                    x = q_in
                rec = _reconstruction_error(unit(x, *args), target)
                if it < warm or settings.round_weight == 0 or not weights:
                    loss = rec
                else:
                    t = (it - warm) / max(settings.iters - warm, 1)
                    beta = beta_at(lo + (hi - lo) * t, settings)
                    reg = sum(q.rounding_loss(beta) for q, _ in weights)
                    loss = rec + settings.round_weight * reg
                value = float(loss.detach())
                if not math.isfinite(value):
                    raise FloatingPointError(
                        f"reconstruction of unit {name!r} (level {level}): the loss became "
                        f"{value} at iteration {it}; the unit was left unchanged. Check the "
                        "cached inputs/targets (fp16 overflow?) and the learning rates."
                    )
                losses.append(float(rec.detach()))
                for opt in (opt_w, opt_a):
                    if opt is not None:
                        opt.zero_grad(set_to_none=True)
                loss.backward()
                for opt in (opt_w, opt_a):
                    if opt is not None:
                        opt.step()
                if sched_a is not None:
                    sched_a.step()
                    with torch.no_grad():
                        for p in scales:
                            p.clamp_(min=1e-8)  # a step size must stay positive
                if progress and settings.log_every and (it + 1) % settings.log_every == 0:
                    progress(it + 1, losses[-1])
    except BaseException:
        for q in act_quantizers:
            q.state = "quant"
        for q, alpha, rounding in saved_w:
            q.alpha, q.rounding = alpha, rounding
        with torch.no_grad():
            for q, scale in saved_a:
                q.scale.copy_(scale)
        raise
    finally:
        for p, flag in saved_grad.values():
            p.requires_grad_(flag)
        for q in acts:
            q.scale.requires_grad_(False)  # LSQ gradient scaling only while learning
        for q, _ in weights:
            if q.alpha is not None:
                q.alpha.requires_grad_(False)
    return UnitRecord(
        name=name,
        level=level,
        iters=settings.iters,
        first_loss=losses[0],
        last_loss=losses[-1],
        seconds=time.perf_counter() - start,
        losses=losses,
        n_weight_quantizers=len(weights),
        n_act_quantizers=len(acts),
        hard_before=hard_before,
        hard_after=_hard_error(unit, batches, weights),
    )


def harden(modules: nn.Module | Iterable[nn.Module]) -> int:
    """Fix every learned rounding in ``modules`` (a model, or units) to integers: ``h = [V >= 0]``.

    Returns how many quantizers were hardened (each counted once, however many units share it).
    Quantizers never reconstructed (no AdaRound variables) keep rounding to nearest.
    """
    roots = [modules] if isinstance(modules, nn.Module) else list(modules)
    found = {
        id(m): m
        for root in roots
        for m in root.modules()
        if isinstance(m, AdaRoundWeightQuantizer) and m.alpha is not None
    }
    for m in found.values():
        m.harden()
    return len(found)
