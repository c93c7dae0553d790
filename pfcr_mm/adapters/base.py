"""What an architecture adapter declares, and the reconstruction unit it yields."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

from torch import nn

from ..quant.attention import AttentionQuantizers
from ..quant.config import QuantConfig


@dataclass(frozen=True)
class ArchAdapter:
    """How one family of transformer blocks is quantized and cut into units.

    block_classes: the transformer block classes (matched with ``isinstance``).
    attention_swaps: attention class -> its quantized subclass with an explicit forward.
    attn_unit / mlp_unit: ``f(block, x, *args) -> y``, the block's MHSA and MLP each with its
        shortcut; applied in order they compute ``block(x, *args)``.
    post_ln: ``f(block) -> [(layer_norm, linear)]``, the linears fed by a LayerNorm.
    patch_merging: ``{class: (norm attribute, linear attribute)}`` of the downsampling layers.
    patch_embed: ``{class: conv attribute}`` of the layers whose conv sees the image.
    """

    name: str
    block_classes: tuple[type, ...]
    attention_swaps: dict[type, type]
    attn_unit: Callable
    mlp_unit: Callable
    post_ln: Callable[[nn.Module], list[tuple[nn.Module, nn.Linear]]]
    patch_merging: dict[type, tuple[str, str]] = field(default_factory=dict)
    patch_embed: dict[type, str] = field(default_factory=dict)


def swap_attention(module: nn.Module, quant_class: type, cfg: QuantConfig) -> None:
    """Give ``module`` the explicit quantized forward of ``quant_class`` (a subclass of its own
    class, so it keeps every attribute and ``isinstance`` check) and its matmul quantizers."""
    module.__class__ = quant_class
    module.matmul_quant = AttentionQuantizers(cfg)


class ReconUnit(nn.Module):
    """A finest reconstruction unit: the MHSA or the MLP of one block, with its shortcut.

    ``forward(x, *args)`` computes ``fn(block, x, *args)``; the block (and so every parameter
    and quantizer) is shared with the model.
    """

    def __init__(self, name: str, kind: str, block: nn.Module, fn: Callable):
        super().__init__()
        self.name = name
        self.kind = kind
        self.block = block
        self.fn = fn

    def forward(self, x, *args, **kwargs):
        return self.fn(self.block, x, *args, **kwargs)

    def extra_repr(self) -> str:
        return f"name={self.name!r}, kind={self.kind!r}"
