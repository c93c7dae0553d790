"""ViTDet (``pfcr_mm.models.vitdet``): windowed and global ``Attention`` inside ``Block``; the
simple FPN as a reconstruction part, its transposed convolutions quantized.

The windowed blocks pad their normalized map with zeros to whole windows before the qkv linear
(exact under the post-LayerNorm re-parameterization, whose shift is added after the padding);
the decomposed relative position term is computed from the unquantized ``q`` and added to the
logits in floating point before the softmax.
"""

from __future__ import annotations

import torch

from ..models.vitdet import Attention, Block, PatchEmbed, SimpleFPN
from .base import ArchAdapter, PartsAdapter


class QuantViTDetAttention(Attention):
    """ViTDet ``Attention`` with quantizers on q, k, v and the attention probabilities: its two
    matmuls, the rest of its forward unchanged."""

    def logits(self, q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
        mq = self.matmul_quant
        return mq.q(q * self.scale) @ mq.k(k).transpose(-2, -1)

    def attend(self, probs: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        return self.matmul_quant.attend(probs, v)


ADAPTER = ArchAdapter(
    name="ViTDet",
    block_classes=(Block,),
    attention_swaps={Attention: QuantViTDetAttention},
    attn_unit=Block.attn_residual,  # x: (B, H, W, C)
    mlp_unit=Block.mlp_residual,
    norms=lambda b: (b.norm1, b.norm2),
    linears=lambda b: dict(qkv=b.attn.qkv, proj=b.attn.proj, fc1=b.mlp.fc1, fc2=b.mlp.fc2),
    patch_embed={PatchEmbed: "proj"},
)

PARTS = PartsAdapter(name="ViTDet simple FPN", parts=(SimpleFPN,), deconv_parts=(SimpleFPN,))
