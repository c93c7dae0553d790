"""What an architecture adapter declares, and the reconstruction unit it yields."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

from torch import nn

from ..quant.attention import AttentionQuantizers
from ..settings import QuantConfig


@dataclass(frozen=True)
class ArchAdapter:
    """How one family of transformer blocks is quantized and cut into units.

    block_classes: the transformer block classes (matched with ``isinstance``).
    attention_swaps: attention class -> its quantized subclass with an explicit forward.
    attn_unit / mlp_unit: ``f(block, x, *args) -> y``, the block's MHSA and MLP each with its
        shortcut; applied in order they compute ``block(x, *args)``.
    norms: ``f(block) -> (layer_norm, layer_norm)``, those before the MHSA and the MLP.
    linears: ``f(block) -> {kind: linear}`` for every kind of
        :data:`~pfcr_mm.settings.LINEAR_KINDS`: the MHSA's ``qkv`` and ``proj``, the MLP's
        ``fc1`` and ``fc2`` (``QuantConfig.linear_a_bits``).
    patch_merging: ``{class: (norm attribute, linear attribute)}`` of the downsampling layers.
    patch_embed: ``{class: conv attribute}`` of the layers whose conv sees the image.
    stage_link: ``f(root, last block name, next block name) -> link`` for blocks in different
        containers (stages), names relative to ``root``; ``link(x, *args) -> (x, args)`` maps
        the output of the last block of a stage to the input of the next stage's first block
        (Swin: the PatchMerging between them). ``None``: the family has a single stage.
    """

    name: str
    block_classes: tuple[type, ...]
    attention_swaps: dict[type, type]
    attn_unit: Callable
    mlp_unit: Callable
    norms: Callable[[nn.Module], tuple[nn.Module, nn.Module]]
    linears: Callable[[nn.Module], dict[str, nn.Linear]]
    patch_merging: dict[type, tuple[str, str]] = field(default_factory=dict)
    patch_embed: dict[type, str] = field(default_factory=dict)
    stage_link: Callable[[nn.Module, str, str], Callable] | None = None

    def post_ln(self, block: nn.Module) -> list[tuple[nn.Module, nn.Linear]]:
        """The linears fed by a LayerNorm, with it: ``qkv`` and ``fc1``."""
        (norm1, norm2), linears = self.norms(block), self.linears(block)
        return [(norm1, linears["qkv"]), (norm2, linears["fc1"])]

    def post_gelu(self, block: nn.Module) -> list[nn.Linear]:
        """The linears fed by a GELU (``QuantConfig.post_gelu``): ``fc2``."""
        return [self.linears(block)["fc2"]]


@dataclass(frozen=True)
class PartsAdapter:
    """How the parts of a model outside its transformer blocks are quantized and reconstructed
    (a detector's neck and heads).

    parts: module classes whose quantized layers are reconstructed together, as one unit per
        instance (``ReconSettings.non_block="parts"``); their inputs and outputs may be tuples
        of maps, 4-D ones ``(B, C, H, W)``.
    roi_parts: the parts whose inputs hold one row per RoI (a RoI box or mask head).
    pinned: ``{class: index}``: positional argument ``index`` of these modules is taken from
        the FP run when a quantized run captures a part's input (a detector's RoIs).
    fold_norms: ``f(root) -> names``, folds normalizations into the layers before them in
        place, before quantization.
    deconv_parts: the parts whose transposed convolutions are quantized (ViTDet's simple
        FPN); elsewhere they stay in floating point (a mask head's upsampling).
    task_losses: ``{class: f(part) -> loss(out, target)}``: for the parts whose outputs are the
        task's predictions (a detector's RPN and RoI heads), the divergence of the predictions
        made from the quantized outputs from the FP ones (``ReconSettings.part_loss="task"``);
        ``out`` and ``target`` are the part unit's outputs, 4-D maps channels last.
    output_layers: ``{class: attribute names}``: the layers that make the task's predictions
        (a detector's classification, box and mask logits), quantized with
        ``QuantConfig.head_bits`` as a classifier's head is.
    """

    name: str
    parts: tuple[type, ...]
    roi_parts: tuple[type, ...] = ()
    pinned: dict[type, int] = field(default_factory=dict)
    fold_norms: Callable[[nn.Module], list[str]] | None = None
    deconv_parts: tuple[type, ...] = ()
    task_losses: dict[type, Callable[[nn.Module], Callable]] = field(default_factory=dict)
    output_layers: dict[type, tuple[str, ...]] = field(default_factory=dict)


def swap_attention(module: nn.Module, quant_class: type, cfg: QuantConfig) -> None:
    """Give ``module`` the explicit quantized forward of ``quant_class`` (a subclass of its own
    class, so it keeps every attribute and ``isinstance`` check) and its matmul quantizers."""
    module.__class__ = quant_class
    module.matmul_quant = AttentionQuantizers(cfg)


class ReconUnit(nn.Module):
    """A finest reconstruction unit: the MHSA or the MLP of one block, with its shortcut.

    ``forward(x, *args)`` computes ``fn(block, x, *args)``; the block (and so every parameter
    and quantizer) is shared with the model. ``enter``: for the MHSA unit of the first block of
    a stage after the first, the adapter's stage link that produces this unit's input
    ``(x, args)`` from the previous unit's output (``None`` elsewhere).
    """

    def __init__(
        self, name: str, kind: str, block: nn.Module, fn: Callable, enter: Callable | None = None
    ):
        super().__init__()
        self.name = name
        self.kind = kind
        self.block = block
        self.fn = fn
        self.enter = enter

    def forward(self, x, *args, **kwargs):
        return self.fn(self.block, x, *args, **kwargs)

    def extra_repr(self) -> str:
        return f"name={self.name!r}, kind={self.kind!r}"
