"""timm ViT / DeiT: ``timm.layers.Attention`` inside ``vision_transformer.Block``."""

from __future__ import annotations

import torch
from timm.layers import Attention, PatchEmbed
from timm.layers.attention import maybe_add_mask, resolve_self_attn_mask
from timm.models.vision_transformer import Block

from .base import ArchAdapter


class QuantTimmAttention(Attention):
    """timm ``Attention`` with quantizers on q, k, v and the attention probabilities.

    Same computation as the non-fused branch of the original; the fused SDPA branch is never
    taken, since it would bypass the quantizers.
    """

    def forward(
        self, x: torch.Tensor, attn_mask: torch.Tensor | None = None, is_causal: bool = False
    ) -> torch.Tensor:
        B, N, _ = x.shape
        mq = self.matmul_quant
        gate = self.gate(x).sigmoid() if self.gate is not None else None
        qkv = self.qkv(x).reshape(B, N, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        q, k = self.q_norm(q), self.k_norm(k)
        attn = mq.q(q * self.scale) @ mq.k(k).transpose(-2, -1)
        attn = maybe_add_mask(attn, resolve_self_attn_mask(N, attn, attn_mask, is_causal))
        attn = self.attn_drop(attn.softmax(dim=-1))
        x = mq.attend(attn, v)
        x = self.norm(x.transpose(1, 2).reshape(B, N, self.attn_dim))
        if gate is not None:
            x = x * gate
        return self.proj_drop(self.proj(x))


def attn_unit(block: Block, x: torch.Tensor) -> torch.Tensor:
    return x + block.drop_path1(block.ls1(block.attn(block.norm1(x))))


def mlp_unit(block: Block, x: torch.Tensor) -> torch.Tensor:
    return x + block.drop_path2(block.ls2(block.mlp(block.norm2(x))))


ADAPTER = ArchAdapter(
    name="timm ViT/DeiT",
    block_classes=(Block,),
    attention_swaps={Attention: QuantTimmAttention},
    attn_unit=attn_unit,
    mlp_unit=mlp_unit,
    norms=lambda b: (b.norm1, b.norm2),
    linears=lambda b: dict(qkv=b.attn.qkv, proj=b.attn.proj, fc1=b.mlp.fc1, fc2=b.mlp.fc2),
    patch_embed={PatchEmbed: "proj"},
)
