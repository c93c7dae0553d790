"""timm Swin: ``WindowAttention`` inside ``SwinTransformerBlock``; ``PatchMerging``."""

from __future__ import annotations

import torch
from timm.layers import PatchEmbed
from timm.models.swin_transformer import PatchMerging, SwinTransformerBlock, WindowAttention

from .base import ArchAdapter


class QuantTimmWindowAttention(WindowAttention):
    """timm ``WindowAttention`` with quantizers on q, k, v and the attention probabilities."""

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        B_, N, _ = x.shape
        mq = self.matmul_quant
        qkv = self.qkv(x).reshape(B_, N, 3, self.num_heads, -1).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        attn = mq.q(q * self.scale) @ mq.k(k).transpose(-2, -1)
        attn = attn + self._get_rel_pos_bias()
        if mask is not None:
            num_win = mask.shape[0]
            attn = attn.view(-1, num_win, self.num_heads, N, N) + mask.unsqueeze(1).unsqueeze(0)
            attn = attn.view(-1, self.num_heads, N, N)
        attn = self.attn_drop(self.softmax(attn))
        x = mq.attend(attn, v).transpose(1, 2).reshape(B_, N, -1)
        return self.proj_drop(self.proj(x))


def attn_unit(block: SwinTransformerBlock, x: torch.Tensor) -> torch.Tensor:
    """``x``: (B, H, W, C)."""
    return x + block.drop_path1(block._attn(block.norm1(x)))


def mlp_unit(block: SwinTransformerBlock, x: torch.Tensor) -> torch.Tensor:
    """``x``: (B, H, W, C)."""
    B, H, W, C = x.shape
    x = x.reshape(B, -1, C)
    x = x + block.drop_path2(block.mlp(block.norm2(x)))
    return x.reshape(B, H, W, C)


def stage_link(root, last_block: str, next_block: str):
    """A ``SwinTransformerStage`` starts with its ``downsample`` (PatchMerging), NHWC to NHWC."""
    down = root.get_submodule(next_block.rsplit(".blocks.", 1)[0]).downsample

    def link(x: torch.Tensor):
        return down(x), ()

    return link


ADAPTER = ArchAdapter(
    name="timm Swin",
    block_classes=(SwinTransformerBlock,),
    attention_swaps={WindowAttention: QuantTimmWindowAttention},
    attn_unit=attn_unit,
    mlp_unit=mlp_unit,
    norms=lambda b: (b.norm1, b.norm2),
    linears=lambda b: dict(qkv=b.attn.qkv, proj=b.attn.proj, fc1=b.mlp.fc1, fc2=b.mlp.fc2),
    patch_merging={PatchMerging: ("norm", "reduction")},
    patch_embed={PatchEmbed: "proj"},
    stage_link=stage_link,
)
