"""Reconstruction units and the fine-to-coarse levels they form (``docs/method.md`` section 3).

The finest units come from the adapters (:class:`pfcr_mm.adapters.base.ReconUnit`): the MHSA
and the MLP of every transformer block, each with its shortcut, in forward order. Coarser units
are compositions of them:

* level 0: every ``u_attn`` and ``u_mlp``;
* level 1: the block, ``u_mlp . u_attn``;
* level k >= 2: ``2^(k-1)`` consecutive blocks of one stage (the last group of a stage is smaller
  when the count does not divide), up to ``max_level``; ``"top"`` is one group per stage (Swin)
  or the whole encoder (ViT/DeiT, a single stage).

Every level covers every block exactly once. All units of a level see the same extra arguments
as the blocks they hold (mmdet Swin: ``hw_shape``), which is why groups never cross a stage: the
token grid changes at a PatchMerging.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Hashable, Iterator, Sequence

import torch
from torch import nn

from ..adapters.base import ReconUnit
from ..settings import TOP, check_max_level
from ..tree import map_tensors


class ComposedUnit(nn.Module):
    """Consecutive units applied in order, all with the same extra arguments.

    ``forward(x, *args)`` computes ``parts[-1](... parts[0](x, *args) ..., *args)``; ``x`` keeps
    its shape through every part (timm ViT ``(B, N, C)``, timm Swin ``(B, H, W, C)``, mmdet Swin
    ``(B, H*W, C)``). Parameters and quantizers are shared with the model.
    """

    def __init__(self, name: str, level: int, parts: Sequence[nn.Module]):
        super().__init__()
        if not parts:
            raise ValueError(f"composed unit {name!r} needs at least one part")
        self.name = name
        self.level = level
        self.parts = nn.ModuleList(parts)

    def forward(self, x: torch.Tensor, *args) -> torch.Tensor:
        for part in self.parts:
            x = part(x, *args)
        return x

    def extra_repr(self) -> str:
        return f"name={self.name!r}, level={self.level}"


class LayerUnit(nn.Module):
    """A part of the model outside the transformer blocks, reconstructed on its own: one quantized
    layer (patch embedding, PatchMerging reduction, classifier head) or a module holding several
    (a detector's neck, RPN head, RoI box or mask head; see ``adapters.QuantPlan.parts``).

    ``forward(x)`` is ``layer(x)`` with every output channels last, as the loss expects; ``x``
    and the output may be tensors or (nested) tuples and lists of them (a neck takes and gives
    one map per level). channels_first: the 4-D outputs are ``(B, C, H, W)`` (a conv, the
    detector parts) and are returned as ``(B, H, W, C)``; default: whether ``layer`` is a conv.
    rows_per_step: how many rows of the cached inputs an optimizer step draws; ``None``:
    ``ReconSettings.batch_size`` (images or samples). A RoI head's rows are RoIs
    (``ReconSettings.roi_batch_size`` of them).
    task_loss: ``loss(out, target)`` the unit is reconstructed against in place of the squared
    error (``ReconSettings.part_loss="task"``: the divergence of a detector head's predictions).
    """

    level = -1

    def __init__(
        self,
        name: str,
        layer: nn.Module,
        channels_first: bool | None = None,
        rows_per_step: int | None = None,
        task_loss: Callable | None = None,
    ):
        super().__init__()
        self.name = name
        self.layer = layer
        self.task_loss = task_loss
        self.channels_first = (
            isinstance(layer, nn.Conv2d) if channels_first is None else channels_first
        )
        self.rows_per_step = rows_per_step

    def forward(self, x):
        y = self.layer(x)
        if not self.channels_first:
            return y
        return map_tensors(lambda t: t.movedim(1, -1) if t.dim() == 4 else t, y)

    def extra_repr(self) -> str:
        return f"name={self.name!r}"


def unit_level(unit: nn.Module) -> int:
    """The level of a unit: a finest :class:`ReconUnit` is level 0, a :class:`LayerUnit` -1."""
    return getattr(unit, "level", 0)


def leaves(unit: nn.Module) -> list[ReconUnit]:
    """The finest units inside ``unit``, in forward order (``[unit]`` for a finest unit)."""
    if isinstance(unit, ComposedUnit):
        return [leaf for part in unit.parts for leaf in leaves(part)]
    return [unit]


def block_name(unit: ReconUnit) -> str:
    """``"blocks.3.attn"`` -> ``"blocks.3"``: the block's module name."""
    return unit.name.rsplit(".", 1)[0] if "." in unit.name else unit.name


def stage_of_container(unit: ReconUnit) -> str:
    """Default stage mapping: the container that holds the block.

    ``"blocks.3"`` -> ``"blocks"`` (ViT: one stage), ``"layers.1.blocks.0"`` ->
    ``"layers.1.blocks"`` (timm Swin), ``"stages.2.blocks.5"`` -> ``"stages.2.blocks"`` (mmdet).
    """
    return stage_of_block(block_name(unit))


def stage_of_block(name: str) -> str:
    """The container of the block named ``name`` (see :func:`stage_of_container`)."""
    head, _, tail = name.rpartition(".")
    return head if tail.isdigit() else name


def _group_name(blocks: Sequence[ComposedUnit]) -> str:
    return blocks[0].name if len(blocks) == 1 else f"{blocks[0].name}..{blocks[-1].name}"


def top_level(stage_sizes: Sequence[int]) -> int:
    """The first level whose groups hold a whole stage: ``1 + ceil(log2(largest stage))``."""
    return 1 + math.ceil(math.log2(max(stage_sizes)))


def coarsest_level(max_level: int | str, stage_sizes: Sequence[int]) -> int:
    """The coarsest level a run with ``max_level`` builds on stages of ``stage_sizes`` blocks:
    the top level for ``"top"``; a level above the top is refused (it would repeat the top)."""
    top = top_level(stage_sizes)
    if max_level == TOP:
        return top
    if check_max_level(max_level) > top:
        raise ValueError(
            f"max_level={max_level} is above this model's top level {top} (stages of "
            f"{list(stage_sizes)} blocks): use 'top' or a level <= {top}"
        )
    return max_level


class FineToCoarseSchedule:
    """The levels of a PFCR run, finest first.

    units: the finest units of a :class:`~pfcr_mm.adapters.QuantPlan` (``plan.units``): the
        units of one block are consecutive and share ``unit.block``.
    stage_of: ``f(finest unit) -> stage key``; blocks of one stage must be consecutive. Default
        :func:`stage_of_container` (ViT: one stage; Swin: one per ``layers.i`` / ``stages.i``).
    min_level / max_level: the levels to build; ``max_level="top"`` stops at one group per stage;
        an integer above that is refused (coarser levels would repeat the top).
    skip_repeated: iterating the schedule leaves out a unit that holds exactly the blocks of a
        unit of the level run just before (a stage of 2 blocks is one group at levels 2, 3, ...),
        so that no block gets extra iterations by accident. :attr:`levels` keeps them.

    ``levels[k]`` lists the units of level ``k``; iterating yields ``(k, units to reconstruct)``.
    """

    def __init__(
        self,
        units: Sequence[ReconUnit],
        stage_of: Callable[[ReconUnit], Hashable] | None = None,
        max_level: int | str = TOP,
        min_level: int = 0,
        skip_repeated: bool = True,
    ):
        if not units:
            raise ValueError("a schedule needs at least one unit")
        stage_of = stage_of or stage_of_container
        self.blocks = self._blocks(units)
        self.stages = self._stages(self.blocks, stage_of)
        max_level = coarsest_level(max_level, [len(s) for s in self.stages])
        if not 0 <= min_level <= max_level:
            raise ValueError(f"min_level must be in [0, {max_level}], got {min_level}")
        self.skip_repeated = skip_repeated
        self.levels: dict[int, list[nn.Module]] = {}
        for k in range(min_level, max_level + 1):
            self.levels[k] = self._level(k, units)

    @classmethod
    def block(
        cls, units: Sequence[ReconUnit], stage_of: Callable[[ReconUnit], Hashable] | None = None
    ) -> FineToCoarseSchedule:
        """The single-granularity baseline (QDrop/BRECQ-like): level 1, the blocks, only."""
        return cls(units, stage_of, max_level=1, min_level=1)

    @staticmethod
    def _blocks(units: Sequence[ReconUnit]) -> list[ComposedUnit]:
        blocks: list[list[ReconUnit]] = []
        for u in units:
            if blocks and blocks[-1][0].block is u.block:
                blocks[-1].append(u)
            else:
                if any(b[0].block is u.block for b in blocks):
                    raise ValueError(f"the units of block {block_name(u)!r} are not consecutive")
                blocks.append([u])
        return [ComposedUnit(block_name(parts[0]), 1, parts) for parts in blocks]

    @staticmethod
    def _stages(
        blocks: list[ComposedUnit], stage_of: Callable[[ReconUnit], Hashable]
    ) -> list[list[ComposedUnit]]:
        stages: list[list[ComposedUnit]] = []
        keys: list[Hashable] = []
        for b in blocks:
            parts = leaves(b)
            key = stage_of(parts[0])
            if any(stage_of(p) != key for p in parts[1:]):
                raise ValueError(f"the units of block {b.name!r} map to different stages")
            if keys and keys[-1] == key:
                stages[-1].append(b)
            else:
                if key in keys:
                    raise ValueError(f"the blocks of stage {key!r} are not consecutive")
                keys.append(key)
                stages.append([b])
        return stages

    def _level(self, k: int, units: Sequence[ReconUnit]) -> list[nn.Module]:
        if k == 0:
            return list(units)
        if k == 1:
            return [b for stage in self.stages for b in stage]
        size = 2 ** (k - 1)
        return [
            ComposedUnit(_group_name(stage[i : i + size]), k, stage[i : i + size])
            for stage in self.stages
            for i in range(0, len(stage), size)
        ]

    @staticmethod
    def _covered(unit: nn.Module) -> tuple[int, ...]:
        """Identity of the blocks a unit holds (a finest unit holds part of a block: ``()``)."""
        if not isinstance(unit, ComposedUnit):
            return ()
        return tuple(dict.fromkeys(id(leaf.block) for leaf in leaves(unit)))

    def __iter__(self) -> Iterator[tuple[int, list[nn.Module]]]:
        previous: set[tuple[int, ...]] = set()
        for k, units in self.levels.items():
            todo = units
            if self.skip_repeated:
                todo = [u for u in units if self._covered(u) not in previous]
            previous = {self._covered(u) for u in units}
            if todo:
                yield k, todo

    def __len__(self) -> int:
        """The number of units a run reconstructs (repeats skipped if ``skip_repeated``)."""
        return sum(len(units) for _, units in self)

    def describe(self) -> dict:
        """The level structure by unit name (for the result JSON)."""
        run = {k: [u.name for u in units] for k, units in self}
        return {
            "stages": [[b.name for b in s] for s in self.stages],
            "levels": {
                str(k): {"units": [u.name for u in units], "run": run.get(k, [])}
                for k, units in self.levels.items()
            },
        }
