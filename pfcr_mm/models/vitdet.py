"""ViTDet (Li, Mao, Girshick, He: "Exploring plain vision transformer backbones for object
detection", arXiv 2203.16527): a plain ViT whose blocks attend within windows except a few global
ones, with decomposed relative positions (MViTv2), the simple feature pyramid built from its
single stride-16 map, and the channel LayerNorm of ``(B, C, H, W)`` maps. Pure torch.

Parameter names are those of MMDetection's ``projects/ViTDet`` (``ViT``, ``SimpleFPN``,
``LN2d``), so its released checkpoints load strictly: backbone ``patch_embed.proj``,
``pos_embed`` (pretraining size, with the class token's row), ``blocks.N.{norm1, attn.qkv,
attn.proj, attn.rel_pos_h, attn.rel_pos_w, norm2, mlp.fc1, mlp.fc2}``; neck ``fpn1.{0, 1, 3}``,
``fpn2.0``, ``lateral_convs.N.{conv, norm_layer}``, ``fpn_convs.N.{conv, norm_layer}``.
``pfcr_mm.engine.registry`` registers them as ``pfcr.ViTDet``, ``pfcr.SimpleFPN`` and
``pfcr.LN2d``.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


class LN2d(nn.Module):
    """LayerNorm over the channels of a ``(B, C, H, W)`` map, at every position."""

    def __init__(self, num_channels: int, eps: float = 1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(num_channels))
        self.bias = nn.Parameter(torch.zeros(num_channels))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.layer_norm(x.permute(0, 2, 3, 1), self.weight.shape, self.weight, self.bias, self.eps)
        # contiguous NCHW: mmcv's CPU RoIAlign reads its input's memory as such, whatever the
        # strides (a channels-last map made the RoI heads of a detector untrainable)
        return y.permute(0, 3, 1, 2).contiguous()


class DropPath(nn.Module):
    """Stochastic depth: in training, zero a sample's residual branch with probability ``p``
    and scale the kept ones by ``1 / (1 - p)``; the identity in evaluation."""

    def __init__(self, p: float):
        super().__init__()
        self.p = p

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.p == 0.0:
            return x
        keep = torch.rand((x.shape[0],) + (1,) * (x.dim() - 1), device=x.device) >= self.p
        return x * keep.to(x.dtype) / (1.0 - self.p)


def rel_pos_table(rel_pos: torch.Tensor, size: int) -> torch.Tensor:
    """``(size, size, d)``: along one axis of a ``size``-token map, the embedding of the offset
    ``i - j`` of query ``i`` and key ``j``, from the learned ``(2 L - 1, d)`` table, linearly
    interpolated to ``2 size - 1`` offsets when ``L != size`` (a global block at another input
    size than its pretraining's)."""
    length = 2 * size - 1
    if rel_pos.shape[0] != length:
        rel_pos = F.interpolate(rel_pos.t()[None], size=length, mode="linear")[0].t()
    idx = torch.arange(size, device=rel_pos.device)
    return rel_pos[idx[:, None] - idx[None, :] + size - 1]


def decomposed_rel_pos(
    q: torch.Tensor, rel_pos_h: torch.Tensor, rel_pos_w: torch.Tensor, hw: tuple[int, int]
) -> torch.Tensor:
    """The decomposed relative position term of the attention logits: for query ``(h, w)`` and
    key ``(h', w')``, ``q . R_h[h - h'] + q . R_w[w - w']``. ``q``: ``(N, H * W, d)`` (unscaled),
    returns ``(N, H * W, H * W)``."""
    H, W = hw
    r_q = q.reshape(-1, H, W, q.shape[-1])
    rel_h = torch.einsum("nhwc,hkc->nhwk", r_q, rel_pos_table(rel_pos_h, H))
    rel_w = torch.einsum("nhwc,wkc->nhwk", r_q, rel_pos_table(rel_pos_w, W))
    return (rel_h[..., :, None] + rel_w[..., None, :]).reshape(-1, H * W, H * W)


class Attention(nn.Module):
    """Multi-head self-attention over a ``(B, H, W, C)`` token map (a window or the whole map),
    with the decomposed relative positions of a ``input_size`` map when ``use_rel_pos``.

    The two matmuls are :meth:`logits` and :meth:`attend`, so that a quantized subclass
    replaces them alone (``pfcr_mm.adapters.vitdet``)."""

    def __init__(
        self,
        dim: int,
        num_heads: int,
        qkv_bias: bool = True,
        use_rel_pos: bool = False,
        input_size: tuple[int, int] = (14, 14),
    ):
        super().__init__()
        self.num_heads = num_heads
        head_dim = dim // num_heads
        self.scale = head_dim**-0.5
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)
        self.use_rel_pos = use_rel_pos
        if use_rel_pos:
            self.rel_pos_h = nn.Parameter(torch.zeros(2 * input_size[0] - 1, head_dim))
            self.rel_pos_w = nn.Parameter(torch.zeros(2 * input_size[1] - 1, head_dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, H, W, C = x.shape
        qkv = self.qkv(x).reshape(B, H * W, 3, self.num_heads, -1).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.reshape(3, B * self.num_heads, H * W, -1).unbind(0)
        attn = self.logits(q, k)
        if self.use_rel_pos:  # in floating point, before the softmax
            attn = attn + decomposed_rel_pos(q, self.rel_pos_h, self.rel_pos_w, (H, W))
        x = self.attend(attn.softmax(dim=-1), v)
        x = x.view(B, self.num_heads, H, W, -1).permute(0, 2, 3, 1, 4).reshape(B, H, W, C)
        return self.proj(x)

    def logits(self, q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
        return (q * self.scale) @ k.transpose(-2, -1)

    def attend(self, probs: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        return probs @ v


def window_partition(x: torch.Tensor, size: int) -> tuple[torch.Tensor, tuple[int, int]]:
    """``(B, H, W, C)`` -> ``(B * nW, size, size, C)`` windows, the map padded with zeros at the
    bottom and right to whole windows first; also the padded ``(Hp, Wp)``."""
    B, H, W, C = x.shape
    pad_h, pad_w = (-H) % size, (-W) % size
    x = F.pad(x, (0, 0, 0, pad_w, 0, pad_h))
    Hp, Wp = H + pad_h, W + pad_w
    x = x.view(B, Hp // size, size, Wp // size, size, C).permute(0, 1, 3, 2, 4, 5)
    return x.reshape(-1, size, size, C), (Hp, Wp)


def window_unpartition(
    windows: torch.Tensor, size: int, padded: tuple[int, int], hw: tuple[int, int]
) -> torch.Tensor:
    """The inverse of :func:`window_partition`, the padding cut off: ``(B, H, W, C)``."""
    (Hp, Wp), (H, W) = padded, hw
    x = windows.view(-1, Hp // size, Wp // size, size, size, windows.shape[-1])
    x = x.permute(0, 1, 3, 2, 4, 5).reshape(-1, Hp, Wp, windows.shape[-1])
    return x[:, :H, :W].contiguous()


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class Block(nn.Module):
    """A pre-norm transformer block on a ``(B, H, W, C)`` map: attention within
    ``window_size`` windows (``0``: over the whole map, a global block), then the MLP, each
    with its shortcut (:meth:`attn_residual`, :meth:`mlp_residual`)."""

    def __init__(
        self,
        dim: int,
        num_heads: int,
        mlp_ratio: float = 4.0,
        qkv_bias: bool = True,
        drop_path: float = 0.0,
        norm_eps: float = 1e-6,
        use_rel_pos: bool = False,
        window_size: int = 0,
        input_size: tuple[int, int] = (14, 14),
    ):
        super().__init__()
        self.window_size = window_size
        self.norm1 = nn.LayerNorm(dim, eps=norm_eps)
        attn_size = (window_size, window_size) if window_size else input_size
        self.attn = Attention(dim, num_heads, qkv_bias, use_rel_pos, attn_size)
        self.drop_path = DropPath(drop_path)
        self.norm2 = nn.LayerNorm(dim, eps=norm_eps)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.mlp_residual(self.attn_residual(x))

    def attn_residual(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.drop_path(self.mhsa(self.norm1(x)))

    def mlp_residual(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.drop_path(self.mlp(self.norm2(x)))

    def mhsa(self, x: torch.Tensor) -> torch.Tensor:
        """Windowed or global attention of the normalized map ``(B, H, W, C)``."""
        if not self.window_size:
            return self.attn(x)
        windows, padded = window_partition(x, self.window_size)
        return window_unpartition(self.attn(windows), self.window_size, padded, x.shape[1:3])


class PatchEmbed(nn.Module):
    """``(B, 3, H, W)`` image -> ``(B, H / p, W / p, C)`` tokens by a ``p x p`` stride-``p``
    convolution."""

    def __init__(self, patch_size: int, in_channels: int, embed_dim: int):
        super().__init__()
        self.proj = nn.Conv2d(in_channels, embed_dim, patch_size, patch_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x).permute(0, 2, 3, 1)


def abs_pos(pos_embed: torch.Tensor, has_cls_token: bool, hw: tuple[int, int]) -> torch.Tensor:
    """The absolute position embedding of the square pretraining grid (its class token's row
    dropped), bicubically resized to the ``hw`` token map: ``(1, H, W, C)``."""
    grid = pos_embed[:, 1:] if has_cls_token else pos_embed
    size = math.isqrt(grid.shape[1])
    grid = grid.reshape(1, size, size, -1)
    if (size, size) == tuple(hw):
        return grid
    grid = F.interpolate(grid.permute(0, 3, 1, 2), size=hw, mode="bicubic", align_corners=False)
    return grid.permute(0, 2, 3, 1)


class ViTDet(nn.Module):
    """The ViTDet backbone: ``(B, 3, H, W)`` images -> the ``(B, C, H / p, W / p)`` map.

    Blocks ``window_block_indexes`` attend within ``window_size`` windows, the others over
    the whole map (ViT-B: windows of 14 except the global blocks 2, 5, 8, 11). ``img_size``
    sets the global blocks' relative position tables (``2 img_size / p - 1`` offsets),
    ``pretrain_img_size`` the absolute position grid (with a class token's row when
    ``pretrain_use_cls_token``), both resized to the input's map."""

    def __init__(
        self,
        img_size: int = 1024,
        patch_size: int = 16,
        in_channels: int = 3,
        embed_dim: int = 768,
        depth: int = 12,
        num_heads: int = 12,
        mlp_ratio: float = 4.0,
        qkv_bias: bool = True,
        drop_path_rate: float = 0.0,
        norm_eps: float = 1e-6,
        use_abs_pos: bool = True,
        use_rel_pos: bool = True,
        window_size: int = 14,
        window_block_indexes: tuple[int, ...] = (0, 1, 3, 4, 6, 7, 9, 10),
        pretrain_img_size: int = 224,
        pretrain_use_cls_token: bool = True,
    ):
        super().__init__()
        self.pretrain_use_cls_token = pretrain_use_cls_token
        self.patch_embed = PatchEmbed(patch_size, in_channels, embed_dim)
        self.pos_embed = None
        if use_abs_pos:
            positions = (pretrain_img_size // patch_size) ** 2 + int(pretrain_use_cls_token)
            self.pos_embed = nn.Parameter(torch.zeros(1, positions, embed_dim))
            nn.init.trunc_normal_(self.pos_embed, std=0.02)
        size = (img_size // patch_size, img_size // patch_size)
        rates = torch.linspace(0, drop_path_rate, depth).tolist()
        self.blocks = nn.ModuleList(
            Block(
                embed_dim,
                num_heads,
                mlp_ratio,
                qkv_bias,
                rates[i],
                norm_eps,
                use_rel_pos,
                window_size if i in window_block_indexes else 0,
                size,
            )
            for i in range(depth)
        )
        self.blocks.apply(_init_weights)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.patch_embed(x)
        if self.pos_embed is not None:
            x = x + abs_pos(self.pos_embed, self.pretrain_use_cls_token, x.shape[1:3])
        for block in self.blocks:
            x = block(x)
        return x.permute(0, 3, 1, 2)


def _init_weights(m: nn.Module) -> None:
    if isinstance(m, nn.Linear):
        nn.init.trunc_normal_(m.weight, std=0.02)
        if m.bias is not None:
            nn.init.zeros_(m.bias)


class ConvNorm(nn.Module):
    """A bias-free convolution (``k x k``, size kept) and an :class:`LN2d`: the layout of mmcv's
    ``ConvModule`` with an ``LN2d`` norm (``conv``, ``norm_layer``)."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, eps: float):
        super().__init__()
        self.conv = nn.Conv2d(
            in_channels, out_channels, kernel_size, padding=kernel_size // 2, bias=False
        )
        self.norm_layer = LN2d(out_channels, eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm_layer(self.conv(x))


class SimpleFPN(nn.Module):
    """The simple feature pyramid from the backbone's stride-16 map of ``C`` channels:
    stride 4 by two 2x2 transposed convolutions (``C/2``, LN2d and GELU between, ``C/4``),
    stride 8 by one (``C/2``), stride 16 as is, stride 32 by 2x2 max pooling; each level then a
    1x1 and a 3x3 :class:`ConvNorm` to ``out_channels``, and levels beyond the fourth by
    stride-2 subsampling of the last (``num_outs``). ``(B, C, H, W)`` -> tuple of
    ``(B, out_channels, H_i, W_i)``."""

    def __init__(
        self,
        backbone_channel: int,
        in_channels: list[int],
        out_channels: int,
        num_outs: int,
        norm_eps: float = 1e-6,
    ):
        super().__init__()
        c = backbone_channel
        if list(in_channels) != [c // 4, c // 2, c, c]:
            raise ValueError(f"in_channels must be {[c // 4, c // 2, c, c]}, got {in_channels}")
        self.num_outs = num_outs
        self.fpn1 = nn.Sequential(
            nn.ConvTranspose2d(c, c // 2, 2, 2),
            LN2d(c // 2, norm_eps),
            nn.GELU(),
            nn.ConvTranspose2d(c // 2, c // 4, 2, 2),
        )
        self.fpn2 = nn.Sequential(nn.ConvTranspose2d(c, c // 2, 2, 2))
        self.fpn3 = nn.Sequential(nn.Identity())
        self.fpn4 = nn.Sequential(nn.MaxPool2d(kernel_size=2, stride=2))
        self.lateral_convs = nn.ModuleList(
            ConvNorm(n, out_channels, 1, norm_eps) for n in in_channels
        )
        self.fpn_convs = nn.ModuleList(
            ConvNorm(out_channels, out_channels, 3, norm_eps) for _ in in_channels
        )

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        levels = [self.fpn1(x), self.fpn2(x), self.fpn3(x), self.fpn4(x)]
        outs = [
            fpn(lateral(level))
            for level, lateral, fpn in zip(levels, self.lateral_convs, self.fpn_convs)
        ]
        while len(outs) < self.num_outs:
            outs.append(F.max_pool2d(outs[-1], 1, stride=2))
        return tuple(outs)
