"""mmdet 3.x Swin: ``WindowMSA`` inside ``ShiftWindowMSA`` inside ``SwinBlock``; ``PatchMerging``.

Imported only when mmdet's Swin is already loaded (see ``adapters.available_adapters``), so the
core never imports mmdet itself.
"""

from __future__ import annotations

import torch
from mmdet.models.backbones.swin import SwinBlock, WindowMSA
from mmdet.models.layers.transformer.utils import PatchEmbed, PatchMerging

from .base import ArchAdapter


class QuantWindowMSA(WindowMSA):
    """mmdet ``WindowMSA`` with quantizers on q, k, v and the attention probabilities."""

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        B, N, C = x.shape
        mq = self.matmul_quant
        qkv = self.qkv(x).reshape(B, N, 3, self.num_heads, C // self.num_heads)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)
        attn = mq.q(q * self.scale) @ mq.k(k).transpose(-2, -1)
        area = self.window_size[0] * self.window_size[1]
        bias = self.relative_position_bias_table[self.relative_position_index.view(-1)]
        attn = attn + bias.view(area, area, -1).permute(2, 0, 1).unsqueeze(0)
        if mask is not None:
            nW = mask.shape[0]
            attn = attn.view(B // nW, nW, self.num_heads, N, N) + mask.unsqueeze(1).unsqueeze(0)
            attn = attn.view(-1, self.num_heads, N, N)
        attn = self.attn_drop(self.softmax(attn))
        x = mq.attend(attn, v).transpose(1, 2).reshape(B, N, C)
        return self.proj_drop(self.proj(x))


def attn_unit(block: SwinBlock, x: torch.Tensor, hw_shape: tuple[int, int]) -> torch.Tensor:
    """``x``: (B, H*W, C)."""
    return x + block.attn(block.norm1(x), hw_shape)


def mlp_unit(block: SwinBlock, x: torch.Tensor, hw_shape: tuple[int, int]) -> torch.Tensor:
    """``x``: (B, H*W, C); ``hw_shape`` is unused but keeps both units' signatures alike."""
    return block.ffn(block.norm2(x), identity=x)


def stage_link(root, last_block: str, next_block: str):
    """``SwinBlockSequence`` ends with its ``downsample`` (PatchMerging): ``(x, hw) -> (x, hw)``."""
    down = root.get_submodule(last_block.rsplit(".blocks.", 1)[0]).downsample
    if down is None:
        raise ValueError(f"the stage of {last_block!r} has no downsample before {next_block!r}")

    def link(x: torch.Tensor, hw_shape: tuple[int, int]):
        x, hw_shape = down(x, hw_shape)
        return x, (hw_shape,)

    return link


ADAPTER = ArchAdapter(
    name="mmdet Swin",
    block_classes=(SwinBlock,),
    attention_swaps={WindowMSA: QuantWindowMSA},
    attn_unit=attn_unit,
    mlp_unit=mlp_unit,
    norms=lambda b: (b.norm1, b.norm2),
    linears=lambda b: dict(
        qkv=b.attn.w_msa.qkv, proj=b.attn.w_msa.proj, fc1=b.ffn.layers[0][0], fc2=b.ffn.layers[1]
    ),
    patch_merging={PatchMerging: ("norm", "reduction")},
    patch_embed={PatchEmbed: "projection"},
    stage_link=stage_link,
)
