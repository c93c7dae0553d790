"""One unit's reconstruction (``docs/method.md`` section 4), and hardening at the end of a run.

For a unit ``u`` with cached FP inputs ``x``, quantized-path inputs ``x_q`` and FP targets
``y = u_fp(x)`` (:class:`~pfcr_mm.recon.sampling.UnitCaches`), :func:`reconstruct_unit` learns
the AdaRound variables ``V`` of the unit's weight quantizers and the step sizes ``s`` of its
activation quantizers (LSQ) with Adam, minimizing :class:`~pfcr_mm.recon.loss.ReconLoss` on
``x_mix``, which takes each element from ``x`` with probability ``drop_prob`` and from ``x_q``
otherwise (QDrop). Everything else in the model stays frozen.

A unit is a finest or composed unit, ``unit(x, *args) -> y`` with ``x`` and ``y`` of the same
shape ``(B, ..., C)``, channels last, or a :class:`~pfcr_mm.recon.units.LayerUnit` (``x`` and
``y`` may then be nested tuples of tensors). With output weights in its caches, the output-aware
term is on when ``settings.downstream_weight > 0``; the record's losses are the plain term.
"""

from __future__ import annotations

import math
import time
import zlib
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
from torch import nn

from ..quant.calibrate import hard_rounding, is_weight_quantizer, learned_rounding
from ..quant.quantizers import AdaRoundWeightQuantizer, BaseQuantizer, UniformQuantizer
from ..settings import ReconSettings
from ..tree import map_tensors
from .loss import ReconLoss, reconstruction_loss
from .pos import UnitRecipe
from .sampling import UnitCaches
from .units import unit_level


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


def unit_seed(name: str, seed: int) -> int:
    """A per-unit seed: stable across runs and independent of which units ran before."""
    return (seed * 1_000_003 + zlib.crc32(name.encode())) % (2**63)


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


def check_finite(loss: float, name: str, level: int, it: int) -> None:
    """The NaN guard: raise ``FloatingPointError`` naming the unit when the loss is not finite."""
    if not math.isfinite(loss):
        raise FloatingPointError(
            f"reconstruction of unit {name!r} (level {level}): the loss became {loss} at "
            f"iteration {it}; the unit was left unchanged. Check the cached inputs/targets "
            "(fp16 overflow?) and the learning rates."
        )


HARD_EVAL_BATCHES = 4


def hard_error(unit: nn.Module, caches: UnitCaches, weights: list, device: torch.device) -> float:
    """The unit's error with integer weights on the quantized-path inputs of the first cached
    batches: what the deployed unit does, as opposed to the soft rounding being trained."""
    with hard_rounding([q for q, _ in weights]), torch.no_grad(), eval_mode(unit):
        errors = [
            reconstruction_loss(unit(b.q_input, *b.args), b.target).item()
            for b in caches.first(HARD_EVAL_BATCHES, device)
        ]
    return sum(errors) / len(errors)


# ---------------------------------------------------------------------------------------------
# Learning: what may change, the optimizer, and the way back


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


def step_size_groups(scales: list[torch.Tensor], settings: ReconSettings) -> list[dict]:
    """Adam's parameter groups of the learned step sizes: one rate ``a_lr`` for all
    (``a_lr_mode="absolute"``), or each its own, ``a_lr`` times its mean size now
    (``"relative"``)."""
    if settings.a_lr_mode == "absolute":
        return [{"params": scales, "lr": settings.a_lr}]
    return [{"params": [s], "lr": settings.a_lr * float(s.detach().abs().mean())} for s in scales]


class _Session:
    """The optimization of one unit: Adam on the AdaRound variables (``w_lr``) and on the step
    sizes (``a_lr`` and ``a_lr_mode``, cosine-annealed to 0 over the unit, kept positive); the
    two-stage regime of POS (activations in floating point during the first ``fp_act_iters``);
    and the hard tail (the weights rounded as they will be hardened, from ``hard_from``)."""

    def __init__(self, weight_quantizers: list, scales: list, act_quantizers: list,
                 fp_act_iters: int, settings: ReconSettings, iters: int):  # fmt: skip
        self.opts = []
        if weight_quantizers:
            alphas = [q.alpha for q in weight_quantizers]
            self.opts.append(torch.optim.Adam(alphas, lr=settings.w_lr))
        self.scales, self.sched = scales, None
        if scales:
            opt_a = torch.optim.Adam(step_size_groups(scales, settings))
            self.opts.append(opt_a)
            self.sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt_a, T_max=iters, eta_min=0)
        self.act_quantizers, self.fp_act_iters = act_quantizers, fp_act_iters
        self.weight_quantizers = weight_quantizers
        self.hard_from = iters - round(settings.hard_tail * iters) if settings.hard_tail else None

    def stage(self, it: int) -> None:
        """Activations in floating point from iteration 0 until ``fp_act_iters``; the weights'
        rounding hard in the forward (straight-through) from ``hard_from`` on."""
        if it == 0 and self.fp_act_iters:
            for q in self.act_quantizers:
                q.state = "fp"
        if it == self.fp_act_iters:
            for q in self.act_quantizers:
                q.state = "quant"
        if it == self.hard_from:
            for q in self.weight_quantizers:
                q.rounding = "hard_ste"

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
    returns the weight quantizers and the step sizes. A layer's V is initialized on its first
    reconstruction; afterwards a copy of the V the previous level learned is trained (the
    original is put back on failure)."""
    for q, layer in weights:
        if q.alpha is None:
            q.init_adaround(layer.corrected_weight())
        else:
            q.alpha = nn.Parameter(q.alpha.detach().clone())
        q.rounding = "soft"  # a level learns from the soft state the previous one left
    for p in unit.parameters():
        p.requires_grad_(False)
    scales = [q.scale for q in acts]
    for p in [q.alpha for q, _ in weights] + scales:
        p.requires_grad_(True)
    return [q for q, _ in weights], scales


@contextmanager
def learning(unit: nn.Module, weights: list, act_quantizers: list, acts: list,
             settings: ReconSettings, recipe: UnitRecipe) -> Iterator[_Session]:  # fmt: skip
    """Inside: ``unit`` in eval mode with gradients on its AdaRound variables and learned step
    sizes only, and the :class:`_Session` that steps them. On success the weights are left in
    the soft rounding (a hard tail ends there); a failure restores everything the session
    changed; the trainable flags are restored in any case."""
    rollback = _Rollback(weights, act_quantizers, acts)
    saved_grad = [(p, p.requires_grad) for p in unit.parameters()]
    # rounding learned alone first only where there is rounding to learn
    fp_act_iters = recipe.fp_act_iters if weights else 0
    try:
        quantizers, scales = _start_learning(unit, weights, acts)
        session = _Session(quantizers, scales, act_quantizers, fp_act_iters, settings, recipe.iters)
        with torch.enable_grad(), eval_mode(unit):
            yield session
        for q in quantizers:
            q.rounding = "soft"  # after a hard tail: the state the next level learns from
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


# ---------------------------------------------------------------------------------------------
# One unit


def reconstruct_unit(
    unit: nn.Module,
    caches: UnitCaches,
    settings: ReconSettings,
    recipe: UnitRecipe | None = None,
    progress: Callable[[int, float], None] | None = None,
) -> UnitRecord:
    """Learn the rounding and step sizes of ``unit`` (quantizers in the quantized state) so that
    ``unit(x, *args)`` reproduces the FP targets of ``caches``; the recipe (iterations,
    temperature span, FP-activation stage) is POS's, default ``settings.iters`` and the whole
    decay. ``progress(iteration, loss)`` is called every ``settings.log_every`` iterations.
    A non-finite loss restores everything the call changed and raises ``FloatingPointError``.
    """
    name, level = getattr(unit, "name", type(unit).__name__), unit_level(unit)
    recipe, device = recipe or UnitRecipe(settings.iters), next(unit.parameters()).device
    batch_size = getattr(unit, "rows_per_step", None) or settings.batch_size
    weights, act_quantizers, acts = _learned_quantizers(unit, caches, device)
    task = getattr(unit, "task_loss", None)  # a detector head's (part_loss="task")
    loss_fn = ReconLoss(settings, recipe, [q for q, _ in weights], caches.weights is not None, task)
    hard_before = hard_error(unit, caches, weights, device)
    seed = unit_seed(name, settings.seed)
    sampler = torch.Generator().manual_seed(seed)
    masker = torch.Generator(device=device).manual_seed(seed)
    losses, start = [], time.perf_counter()
    with learning(unit, weights, act_quantizers, acts, settings, recipe) as session:
        for it in range(recipe.iters):
            session.stage(it)
            batch = caches.draw(sampler, batch_size, device)
            x = qdrop_input(batch.q_input, batch.fp_input, settings.drop_prob, masker)
            loss, rec = loss_fn(unit(x, *batch.args), batch.target, batch.weights, it)
            check_finite(float(loss.detach()), name, level, it)
            losses.append(float(rec.detach()))
            session.step(loss)
            if progress and settings.log_every and (it + 1) % settings.log_every == 0:
                progress(it + 1, losses[-1])
    return UnitRecord(
        name, level, recipe.iters, losses[0], losses[-1], time.perf_counter() - start, losses,
        n_weight_quantizers=len(weights), n_act_quantizers=len(acts), hard_before=hard_before,
        hard_after=hard_error(unit, caches, weights, device),
    )  # fmt: skip


def _learned_quantizers(unit: nn.Module, caches: UnitCaches, device: torch.device) -> tuple:
    """``(weight quantizer, layer)`` pairs, the activation quantizers the unit calls, and those
    of them with a learned step size (the uniform ones; a log quantizer has none)."""
    x, args = caches.probe(device)
    weights, act_quantizers = _active_quantizers(unit, x, args)
    acts = [q for q in act_quantizers if isinstance(q, UniformQuantizer)]
    if not weights and not acts:
        raise RuntimeError(
            f"unit {getattr(unit, 'name', '?')!r} calls no enabled quantizer in the quantized "
            "state: nothing to learn (switch the model to quantized with set_quant_state first)"
        )
    return weights, act_quantizers, acts


def harden(modules: nn.Module | Iterable[nn.Module]) -> int:
    """Fix every learned rounding in ``modules`` (a model, or units) to integers: ``h = [V >= 0]``.

    Returns how many quantizers were hardened (each counted once, however many units share it).
    Quantizers never reconstructed (no AdaRound variables) keep rounding to nearest.
    """
    found = learned_rounding(modules)
    for m in found:
        m.harden()
    return len(found)
