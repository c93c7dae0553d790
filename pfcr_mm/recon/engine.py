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

from ..quant.calibrate import flat_tensors, hard_rounding, is_weight_quantizer, learned_rounding
from ..quant.config import dataclass_from_dict
from ..quant.quantizers import AdaRoundWeightQuantizer, BaseQuantizer, UniformQuantizer
from .pos import BUDGET_UNITS, POS_STRATEGIES, UnitRecipe
from .units import TOP, check_max_level, map_tensors, unit_level

NON_BLOCK = ("calib", "layerwise", "parts")
CACHE_DTYPES = {"float32": torch.float32, "float16": torch.float16}


@dataclass
class ReconSettings:
    """How each unit is reconstructed; small and serializable like ``QuantConfig``.

    iters: optimizer steps per unit (peers: 20k for paper-grade runs).
    batch_size: samples per step, drawn from the cached calibration batches.
    roi_batch_size: RoIs per step of a detector's RoI box or mask head unit (its cached rows
        are RoIs: the FP model's proposals of the calibration images). 128, as the positive RoIs
        mmdet's mask head trains on per image. On the demo detector a mask-head step on 128
        RoIs still costs 5.5x a first-stage block step (0.51 s against 0.09 s), and its unit a
        third of a ``block`` run's reconstruction time; at 512 it took 13 of 20 minutes.
    w_lr: Adam learning rate of the AdaRound variables.
    a_lr: Adam learning rate of the activation step sizes, cosine-annealed to 0 over a unit.
        The defaults are the peers' for 20k steps per unit; Adam moves a variable by about the
        learning rate per step, so at tens of steps they barely move. The demo's fast config
        uses 1e-2 / 4e-4 (chosen on held-out calibration images, ``benchmarks/demo_recon_fast``).
    round_weight: weight of the AdaRound regularizer.
    beta_start / beta_end / warmup: the regularizer temperature decays linearly from beta_start
        to beta_end after the first ``warmup`` fraction of a unit's iterations (regularizer off).
    budget_unit: how the budget of a ``pfcr`` run (``iters`` x blocks) is counted:
        ``"block_passes"`` (a step of a unit costs the blocks it holds, an MHSA or MLP half a
        block; ``pfcr`` then costs what ``block`` costs at the same ``iters``) or ``"steps"``
        (optimizer steps, whatever the unit; the equal-steps mode of earlier versions). See
        :mod:`pfcr_mm.recon.pos`.
    pos: the progressive optimization strategy of a fine-to-coarse run (``none``,
        ``two_stage``, ``shrink``, ``anneal``: see :mod:`pfcr_mm.recon.pos`). The default,
        ``"anneal"``: on the demo benchmark at equal compute (``benchmarks/demo_recon``,
        README) no option separated from the others in the output error on held-out
        calibration images beyond the spread over seeds (``"none"`` had the best W4A4 top-1
        but the worst held-out error; defaults are not chosen on evaluation images);
        ``"two_stage"`` is the cheapest per block-pass. With the block method (one level)
        ``"anneal"`` equals ``"none"``.
    max_level: the coarsest level of a ``pfcr`` run: ``"top"`` (one group per stage, or the
        whole ViT encoder) or an integer (0: MHSA and MLP only, 1: up to blocks, ...). At a
        short budget the coarse levels' units get too few steps to help: on the demo ViT at
        100 block-passes per block, ``"top"`` had a higher held-out error than ``1``.
    non_block: layers outside the blocks (patch embedding, PatchMerging reductions, head, neck):
        ``"calib"`` keeps them calibrated only, ``"layerwise"`` reconstructs each on its own,
        ``"parts"`` reconstructs each part a model adapter declares (a detector's neck, RPN
        head, RoI box and mask heads) as one unit and the other layers on their own. ``iters``
        iterations per unit, outside the block budget; in forward order (a PatchMerging within
        the first level, before the next stage; the neck and heads after the last level).
    drop_prob: probability that an input element comes from the FP input instead of the
        quantized path (QDrop); 0 uses the quantized-path input only.
    cache_dtype: dtype of the cached inputs and targets (``float32`` or ``float16``).
    cache_limit_gb: the most GB (10^9 bytes) the unit caches hold in host memory; cached tensors
        beyond it are written to memory-mapped files (bit-identical steps; on COCO, 256 images
        at 800x1333, the caches of one unit reach tens of GB: README "Memory on COCO").
        ``None``: no limit, all in memory. Neither it nor ``cache_dir`` changes the quantized
        model: a run may be resumed with another limit.
    cache_dir: the folder the spill files go in (a temporary folder inside it, removed at the
        end); ``None``: the run's reconstruction log folder, or the system's temporary folder.
    seed: seeds the sampling of batches and QDrop masks (per unit, combined with its name).
    log_every: report progress every this many iterations (0: only at the end of a unit).
    downstream_weight: the detection-aware objective (0: off). A block unit's loss adds this
        weight times its squared error weighted, element by element, by how much the model's
        downstream outputs (``pfcr_mm.quantize(downstream=...)``: a detector's FPN outputs, a
        classifier's logits) move with that element of the unit's output: the diagonal of
        ``J^T J`` of the FP model from the unit's output to those outputs, estimated with
        ``downstream_probes`` random projections when the unit's caches are built. The weighted
        term is scaled to the plain term's value at the first iteration, so the weight is the
        mix between the two. Units outside the blocks keep the plain loss.
    """

    iters: int = 20000
    batch_size: int = 32
    w_lr: float = 1e-3
    a_lr: float = 4e-5
    round_weight: float = 0.01
    beta_start: float = 20.0
    beta_end: float = 2.0
    warmup: float = 0.2
    budget_unit: str = "block_passes"
    pos: str = "anneal"
    max_level: int | str = TOP
    non_block: str = "calib"
    drop_prob: float = 0.5
    cache_dtype: str = "float32"
    cache_limit_gb: float | None = None
    cache_dir: str | None = None
    seed: int = 0
    log_every: int = 1000
    downstream_weight: float = 0.0
    downstream_probes: int = 8
    roi_batch_size: int = 128

    def __post_init__(self) -> None:
        if self.iters < 1 or self.batch_size < 1 or self.roi_batch_size < 1:
            raise ValueError("ReconSettings.iters, batch_size and roi_batch_size must be >= 1")
        if not 0.0 <= self.warmup < 1.0:
            raise ValueError(f"ReconSettings.warmup must be in [0, 1), got {self.warmup}")
        if not 0.0 <= self.drop_prob <= 1.0:
            raise ValueError(f"ReconSettings.drop_prob must be in [0, 1], got {self.drop_prob}")
        if self.pos not in POS_STRATEGIES:
            raise ValueError(f"ReconSettings.pos must be one of {POS_STRATEGIES}, got {self.pos!r}")
        if self.budget_unit not in BUDGET_UNITS:
            raise ValueError(
                f"ReconSettings.budget_unit must be one of {BUDGET_UNITS}, "
                f"got {self.budget_unit!r}"
            )
        if self.non_block not in NON_BLOCK:
            raise ValueError(
                f"ReconSettings.non_block must be one of {NON_BLOCK}, got {self.non_block!r}"
            )
        check_max_level(self.max_level)
        if not self.downstream_weight >= 0 or not self.downstream_probes >= 1:
            raise ValueError(
                "ReconSettings.downstream_weight must be >= 0 and downstream_probes >= 1, got "
                f"{self.downstream_weight!r} and {self.downstream_probes!r}"
            )
        if self.cache_dtype not in CACHE_DTYPES:
            raise ValueError(
                f"ReconSettings.cache_dtype must be one of {tuple(CACHE_DTYPES)}, "
                f"got {self.cache_dtype!r}"
            )
        limit = self.cache_limit_gb
        if limit is not None and (
            isinstance(limit, bool) or not isinstance(limit, (int, float)) or not limit >= 0
        ):
            raise ValueError(
                f"ReconSettings.cache_limit_gb must be a number >= 0 or None, got {limit!r}"
            )
        if self.cache_dir is not None and not isinstance(self.cache_dir, str):
            raise ValueError(
                f"ReconSettings.cache_dir must be a path or None, got {self.cache_dir!r}"
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
    # what the unit cost: block forward+backward passes of its steps (pfcr_mm.recon.pos), and
    # the seconds spent getting its caches (``seconds`` is its optimization)
    block_passes: float = 0.0
    cache_seconds: float = 0.0
    # the bytes of the unit's caches in memory and on disk (pfcr_mm.recon.cache.CacheStore)
    cache_bytes: dict | None = None


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


class CacheSampler:
    """Draws training batches from cached lists of ``(B_i, ...)`` tensors (or of tuples of
    them nested alike: a detector part's maps, a target with its weights; every tensor of an
    entry has the batch's rows).

    When all cached batches have the same per-sample shapes and the same extra arguments (a
    classifier at one resolution), samples are drawn from the pooled cache, as BRECQ/QDrop do;
    otherwise (detection images of different sizes) one cached batch is drawn, then
    ``batch_size`` rows within it. Extra arguments are shared by a whole batch (``hw_shape``),
    never per sample.
    """

    def __init__(
        self,
        q_inputs: Sequence,
        fp_inputs: Sequence,
        fp_targets: Sequence,
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
            q_shapes = [t.shape for t in flat_tensors(q)]
            x_shapes = [t.shape for t in flat_tensors(x)]
            rows = {t.shape[0] for t in flat_tensors(x) + flat_tensors(y)}
            if q_shapes != x_shapes or len(rows) != 1:
                raise ValueError(
                    f"cached batch {i}: quantized input {q_shapes}, FP input {x_shapes} and "
                    f"target {[t.shape for t in flat_tensors(y)]} do not match"
                )
        self.q, self.x, self.y, self.args = q_inputs, fp_inputs, fp_targets, extra_args
        self.batch_size, self.device, self.dtype = batch_size, device, dtype
        self.sizes = [flat_tensors(x)[0].shape[0] for x in fp_inputs]

        def sample_shapes(i: int) -> list:
            return [t.shape[1:] for t in flat_tensors(fp_inputs[i]) + flat_tensors(fp_targets[i])]

        self.pooled = all(
            sample_shapes(i) == sample_shapes(0) and _args_equal(extra_args[i], extra_args[0])
            for i in range(n)
        )
        self.offsets = torch.tensor([0] + self.sizes).cumsum(0)

    def _move(self, t):
        return map_tensors(lambda u: u.to(self.device, self.dtype, non_blocking=True), t)

    def _rows(self, entry, rows: torch.Tensor):
        return self._move(map_tensors(lambda u: u.index_select(0, rows), entry))

    def draw(self, generator: torch.Generator) -> tuple:
        """One training batch ``(x_q, x_fp, y_fp, extra_args)`` on the unit's device."""
        if self.pooled:
            total = int(self.offsets[-1])
            idx = torch.randperm(total, generator=generator)[: self.batch_size].sort().values
            which = torch.searchsorted(self.offsets, idx, right=True) - 1
            parts = []
            for b in which.unique().tolist():
                rows = idx[which == b] - self.offsets[b]
                parts.append([self._rows(c[b], rows) for c in (self.q, self.x, self.y)])
            q, x, y = (map_tensors(lambda *ts: torch.cat(ts), *p) for p in zip(*parts))
            return q, x, y, self.args[0]
        b = int(torch.randint(len(self.sizes), (1,), generator=generator))
        if self.sizes[b] > self.batch_size:
            rows = torch.randperm(self.sizes[b], generator=generator)[: self.batch_size]
            return (*(self._rows(c[b], rows) for c in (self.q, self.x, self.y)), self.args[b])
        return (*(self._move(c[b]) for c in (self.q, self.x, self.y)), self.args[b])


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


def reconstruction_loss(out, target) -> torch.Tensor:
    """Squared error summed over channels (last axis), averaged over images and tokens; for
    nested outputs (a neck's maps per level, a head's scores and box deltas), the sum of that
    over the tensors."""
    return sum(
        (o - t).pow(2).sum(-1).mean()
        for o, t in zip(flat_tensors(out), flat_tensors(target), strict=True)
    )


HARD_EVAL_BATCHES = 4


def _hard_error(unit: nn.Module, batches: CacheSampler, weights: list, weighted: bool) -> float:
    """The unit's error with integer weights on the quantized-path inputs of the first cached
    batches: what the deployed unit does, as opposed to the soft rounding being trained
    (``weighted``: the cached targets are ``(target, output weights)``; the plain error)."""
    n = min(HARD_EVAL_BATCHES, len(batches.sizes))
    with hard_rounding([q for q, _ in weights]), torch.no_grad(), eval_mode(unit):
        errors = []
        for i in range(n):
            target = batches._move(batches.y[i])
            out = unit(batches._move(batches.q[i]), *batches.args[i])
            errors.append(reconstruction_loss(out, target[0] if weighted else target).item())
    return sum(errors) / n


def qdrop_input(q_in, fp_in, drop_prob: float, generator: torch.Generator):
    """QDrop's input mix: each element from the FP input with probability ``drop_prob``, from the
    quantized-path input otherwise (``drop_prob=0``: the quantized-path input itself); tensors,
    or nested tuples of them mixed tensor by tensor."""
    if drop_prob <= 0:
        return q_in

    def mix(q: torch.Tensor, fp: torch.Tensor) -> torch.Tensor:
        keep_fp = torch.rand(fp.shape, generator=generator, device=fp.device) < drop_prob
        return torch.where(keep_fp, fp, q)

    return map_tensors(mix, q_in, fp_in)


def temperature(it: int, recipe: UnitRecipe, settings: ReconSettings) -> float | None:
    """The AdaRound temperature ``beta`` at iteration ``it`` of a unit; ``None`` during the
    warm-up (the first ``settings.warmup`` of its iterations), when the regularizer is off.
    After it, beta follows the unit's share ``recipe.beta_span`` of the decay."""
    warm = int(settings.warmup * recipe.iters)
    if it < warm:
        return None
    lo, hi = recipe.beta_span
    t = (it - warm) / max(recipe.iters - warm, 1)
    return beta_at(lo + (hi - lo) * t, settings)


def check_finite(loss: float, name: str, level: int, it: int) -> None:
    """The NaN guard: raise ``FloatingPointError`` naming the unit when the loss is not finite."""
    if not math.isfinite(loss):
        raise FloatingPointError(
            f"reconstruction of unit {name!r} (level {level}): the loss became {loss} at "
            f"iteration {it}; the unit was left unchanged. Check the cached inputs/targets "
            "(fp16 overflow?) and the learning rates."
        )


class _Rollback:
    """What a unit's reconstruction may change (AdaRound variables, rounding modes, step sizes,
    activation states), saved so that a failure leaves the model as it was found."""

    def __init__(self, weights: list, act_quantizers: list[BaseQuantizer], acts: list):
        self.weights = [(q, q.alpha, q.rounding) for q, _ in weights]
        self.scales = [(q, q.scale.detach().clone()) for q in acts]
        self.act_quantizers = act_quantizers

    def restore(self) -> None:
        for q in self.act_quantizers:
            q.state = "quant"
        for q, alpha, rounding in self.weights:
            q.alpha, q.rounding = alpha, rounding
        with torch.no_grad():
            for q, scale in self.scales:
                q.scale.copy_(scale)


class _Optimizer:
    """Adam on the AdaRound variables (``w_lr``) and on the step sizes (``a_lr``, cosine-annealed
    to 0 over the unit, kept positive)."""

    def __init__(self, alphas: list, scales: list, settings: ReconSettings, iters: int):
        self.opts = []
        if alphas:
            self.opts.append(torch.optim.Adam(alphas, lr=settings.w_lr))
        self.scales, self.sched = scales, None
        if scales:
            opt_a = torch.optim.Adam(scales, lr=settings.a_lr)
            self.opts.append(opt_a)
            self.sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt_a, T_max=iters, eta_min=0)

    def step(self, loss: torch.Tensor) -> None:
        for opt in self.opts:
            opt.zero_grad(set_to_none=True)
        loss.backward()
        for opt in self.opts:
            opt.step()
        if self.sched is not None:
            self.sched.step()
            with torch.no_grad():
                for p in self.scales:
                    p.clamp_(min=1e-8)  # a step size must stay positive


def _start_learning(unit: nn.Module, weights: list, acts: list) -> tuple[list, list]:
    """Make the AdaRound variables and step sizes the only trainable tensors of ``unit``;
    returns them. A layer's V is initialized on its first reconstruction; afterwards a copy of
    the V the previous level learned is trained (the original is put back on failure)."""
    for q, layer in weights:
        if q.alpha is None:
            q.init_adaround(layer.weight)
        else:
            q.alpha = nn.Parameter(q.alpha.detach().clone())
        q.rounding = "soft"  # a level learns from the soft state the previous one left
    for p in unit.parameters():
        p.requires_grad_(False)
    alphas = [q.alpha for q, _ in weights]
    scales = [q.scale for q in acts]
    for p in alphas + scales:
        p.requires_grad_(True)
    return alphas, scales


def reconstruct_unit(
    unit: nn.Module,
    q_inputs: Sequence[torch.Tensor],
    fp_inputs: Sequence[torch.Tensor],
    fp_targets: Sequence[torch.Tensor],
    extra_args: Sequence[tuple] | None,
    settings: ReconSettings,
    recipe: UnitRecipe | None = None,
    progress: Callable[[int, float], None] | None = None,
    output_weights: Sequence[torch.Tensor] | None = None,
) -> UnitRecord:
    """Learn the rounding and step sizes of ``unit`` so that it reproduces its FP targets.

    unit: a finest or composed unit, ``unit(x, *args) -> y`` with ``x`` and ``y`` of the same
        shape ``(B, ..., C)``, channels last, or a :class:`~pfcr_mm.recon.units.LayerUnit`
        (``x`` and ``y`` may then be nested tuples of tensors); its quantizers must be in the
        quantized state.
    q_inputs / fp_inputs / fp_targets: cached batches (any dtype and device; moved to the unit's
        device and float32 per batch), one tensor per batch, batch first; ``q_inputs[i]`` and
        ``fp_inputs[i]`` have the same shape.
    extra_args: per batch, the arguments after ``x`` (mmdet Swin ``(hw_shape,)``); ``None``: none.
    recipe: iterations, temperature span and FP-activation stage of this unit, as POS decided
        (:mod:`pfcr_mm.recon.pos`); ``None``: ``settings.iters`` iterations, the whole decay.
    progress: called as ``progress(iteration, loss)`` every ``settings.log_every`` iterations.
    output_weights: per batch, the weight of each element of the unit's output in the
        detection-aware term (shaped like ``fp_targets``; ``settings.downstream_weight``);
        ``None``: the plain loss only. The record's losses are the plain term.

    If the loss becomes NaN or infinite, everything the call changed (AdaRound variables,
    rounding modes, step sizes) is restored and ``FloatingPointError`` is raised, naming the
    unit. Returns a :class:`UnitRecord`.
    """
    name = getattr(unit, "name", type(unit).__name__)
    level = unit_level(unit)
    recipe = recipe or UnitRecipe(settings.iters)
    if extra_args is None:
        extra_args = [()] * len(fp_inputs)
    device = next(unit.parameters()).device
    batch_size = getattr(unit, "rows_per_step", None) or settings.batch_size
    weighted = output_weights is not None and settings.downstream_weight > 0
    if weighted:  # drawn with the same rows as the targets
        fp_targets = [(y, w) for y, w in zip(fp_targets, output_weights, strict=True)]
    batches = CacheSampler(
        q_inputs, fp_inputs, fp_targets, extra_args, batch_size, device, torch.float32
    )
    balance = None  # plain / weighted term at the first iteration
    probe = map_tensors(lambda t: t[:1].to(device, torch.float32), q_inputs[0])
    weights, act_quantizers = _active_quantizers(unit, probe, tuple(extra_args[0]))
    # learned step sizes: the uniform quantizers (a log2 quantizer has no learned step)
    acts = [q for q in act_quantizers if isinstance(q, UniformQuantizer)]
    if not weights and not acts:
        raise RuntimeError(
            f"unit {name!r} calls no enabled quantizer in the quantized state: nothing to learn "
            "(switch the model to quantized with set_quant_state first)"
        )
    rollback = _Rollback(weights, act_quantizers, acts)
    saved_grad = [(p, p.requires_grad) for p in unit.parameters()]
    hard_before = _hard_error(unit, batches, weights, weighted)
    seed = unit_seed(name, settings.seed)
    sampler = torch.Generator().manual_seed(seed)
    masker = torch.Generator(device=device).manual_seed(seed)
    # rounding learned alone first only where there is rounding to learn
    fp_acts_until = recipe.fp_act_iters if weights else 0
    regularized = bool(weights) and settings.round_weight != 0
    losses: list[float] = []
    start = time.perf_counter()
    try:
        alphas, scales = _start_learning(unit, weights, acts)
        optimizer = _Optimizer(alphas, scales, settings, recipe.iters)
        with torch.enable_grad(), eval_mode(unit):
            for it in range(recipe.iters):
                if it == 0 and fp_acts_until:
                    for q in act_quantizers:
                        q.state = "fp"
                if it == fp_acts_until:
                    for q in act_quantizers:
                        q.state = "quant"
                q_in, fp_in, target, args = batches.draw(sampler)
                x = qdrop_input(q_in, fp_in, settings.drop_prob, masker)
                out = unit(x, *args)
                if weighted:
                    target, w = target
                rec = reconstruction_loss(out, target)
                loss = rec
                if weighted:
                    term = ((out - target).pow(2) * w).sum(-1).mean()
                    if balance is None:
                        balance = float(rec.detach()) / max(float(term.detach()), 1e-30)
                    loss = rec + settings.downstream_weight * balance * term
                beta = temperature(it, recipe, settings) if regularized else None
                if beta is not None:
                    loss = loss + settings.round_weight * sum(
                        q.rounding_loss(beta) for q, _ in weights
                    )
                check_finite(float(loss.detach()), name, level, it)
                losses.append(float(rec.detach()))
                optimizer.step(loss)
                if progress and settings.log_every and (it + 1) % settings.log_every == 0:
                    progress(it + 1, losses[-1])
    except BaseException:
        rollback.restore()
        raise
    finally:
        for p, flag in saved_grad:
            p.requires_grad_(flag)
        for q in acts:
            q.scale.requires_grad_(False)  # LSQ gradient scaling only while learning
        for q, _ in weights:
            if q.alpha is not None:
                q.alpha.requires_grad_(False)
    return UnitRecord(
        name=name,
        level=level,
        iters=recipe.iters,
        first_loss=losses[0],
        last_loss=losses[-1],
        seconds=time.perf_counter() - start,
        losses=losses,
        n_weight_quantizers=len(weights),
        n_act_quantizers=len(acts),
        hard_before=hard_before,
        hard_after=_hard_error(unit, batches, weights, weighted),
    )


def harden(modules: nn.Module | Iterable[nn.Module]) -> int:
    """Fix every learned rounding in ``modules`` (a model, or units) to integers: ``h = [V >= 0]``.

    Returns how many quantizers were hardened (each counted once, however many units share it).
    Quantizers never reconstructed (no AdaRound variables) keep rounding to nearest.
    """
    found = learned_rounding(modules)
    for m in found:
        m.harden()
    return len(found)
