"""The loss of one unit's reconstruction (``docs/method.md`` section 4).

For a unit ``u`` with FP targets ``y = u_fp(x)``, at iteration ``t``::

    L = rec(u_q(x_mix), y)                                         reconstruction
      + downstream_weight * b * sum(w * (u_q(x_mix) - y)^2)        output-aware term (optional)
      + round_weight * sum_layers sum(1 - |2 h(V) - 1|^beta(t))    AdaRound regularizer

``rec`` is the squared error summed over channels (last axis) and averaged over images and
tokens (the scale the regularizer weight 0.01 was chosen against); ``w`` are per-element output
weights and ``b`` balances the two error terms at the first iteration; the regularizer is off
during the warm-up, then its temperature ``beta`` follows the unit's share of the decay.

A unit with a task loss ``D`` (a detector head under ``part_loss="task"``) has ``c * D`` in
place of ``rec``, ``c = rec / D`` at the first iteration, so that the regularizer keeps the
balance it has against the squared error.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from ..settings import ReconSettings
from ..tree import flat_tensors
from .pos import UnitRecipe


def reconstruction_loss(out, target) -> torch.Tensor:
    """Squared error summed over channels (last axis), averaged over images and tokens; for
    nested outputs (a neck's maps per level, a head's scores and box deltas), the sum of that
    over the tensors."""
    return sum(
        (o - t).pow(2).sum(-1).mean()
        for o, t in zip(flat_tensors(out), flat_tensors(target), strict=True)
    )


def beta_at(progress: float, settings: ReconSettings) -> float:
    """The temperature at ``progress`` in [0, 1] of the decay: linear ``beta_start -> beta_end``."""
    progress = min(max(progress, 0.0), 1.0)
    return settings.beta_end + (settings.beta_start - settings.beta_end) * (1.0 - progress)


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


class ReconLoss:
    """``L`` above for one unit, built once from the settings and the unit's recipe.

    weight_quantizers: the unit's AdaRound quantizers (the regularizer; none: no regularizer).
    weighted: whether output weights are cached (the output-aware term is on when they are
        and ``settings.downstream_weight > 0``).
    task_loss: ``D(out, target)`` in place of the squared error (scaled to it), or ``None``.
    """

    def __init__(
        self,
        settings: ReconSettings,
        recipe: UnitRecipe,
        weight_quantizers: list,
        weighted: bool,
        task_loss: Callable | None = None,
    ):
        self.settings, self.recipe, self.task_loss = settings, recipe, task_loss
        self.task_scale: float | None = None  # rec / D at the first iteration
        self.quantizers = weight_quantizers
        self.regularized = bool(weight_quantizers) and settings.round_weight != 0
        self.weighted = weighted and settings.downstream_weight > 0
        self.balance: float | None = None  # rec / weighted term at the first iteration

    def __call__(self, out, target, weights, it: int) -> tuple[torch.Tensor, torch.Tensor]:
        """``(L, rec)`` at iteration ``it``; ``weights``: the output weights of the batch."""
        rec = reconstruction_loss(out, target)
        loss = rec
        if self.task_loss is not None:
            task = self.task_loss(out, target)
            if self.task_scale is None:
                self.task_scale = float(rec.detach()) / max(float(task.detach()), 1e-30)
            loss = self.task_scale * task
        if self.weighted:
            term = ((out - target).pow(2) * weights).sum(-1).mean()
            if self.balance is None:
                self.balance = float(rec.detach()) / max(float(term.detach()), 1e-30)
            loss = rec + self.settings.downstream_weight * self.balance * term
        beta = temperature(it, self.recipe, self.settings) if self.regularized else None
        if beta is not None:
            loss = loss + self.settings.round_weight * sum(
                q.rounding_loss(beta) for q in self.quantizers
            )
        return loss, rec
