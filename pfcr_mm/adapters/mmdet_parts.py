"""mmdet 3.x detectors outside the backbone: the neck and heads as reconstruction parts, the RoIs
pinned between the FP and the quantized runs, BatchNorm folded into the convolutions before them.

Imported only when mmdet's RoI heads are already loaded (see ``adapters.available_parts``), so
the core never imports mmdet itself.
"""

from __future__ import annotations

import torch
from mmcv.cnn import ConvModule
from mmdet.models.dense_heads import RPNHead
from mmdet.models.necks import FPN
from mmdet.models.roi_heads import BaseRoIHead
from mmdet.models.roi_heads.bbox_heads import BBoxHead
from mmdet.models.roi_heads.mask_heads import FCNMaskHead
from mmdet.models.roi_heads.roi_extractors import BaseRoIExtractor
from torch import nn

from .base import PartsAdapter


def fold_batchnorm(model: nn.Module) -> list[str]:
    """Fold every BatchNorm that follows the convolution of an mmcv ``ConvModule`` (Cascade's
    4conv1fc box heads, ResNet-style necks) into the convolution, in place, as it runs in
    evaluation mode: ``w' = w * g / sqrt(var + eps)``, ``b' = (b - mean) * g / sqrt(var + eps)
    + beta`` per output channel; the norm is removed. Returns the names of the folded modules.
    """
    folded = []
    for name, m in model.named_modules():
        if not (isinstance(m, ConvModule) and m.with_norm and isinstance(m.conv, nn.Conv2d)):
            continue
        norm = m.norm
        if not isinstance(norm, nn.modules.batchnorm._BatchNorm):
            continue
        if m.order.index("norm") < m.order.index("conv"):
            continue  # a norm before the conv does not fold into it
        conv = m.conv
        with torch.no_grad():
            scale = norm.weight if norm.affine else 1.0
            gain = scale / torch.sqrt(norm.running_var + norm.eps)
            conv.weight.mul_(gain.view(-1, 1, 1, 1))
            bias = conv.bias if conv.bias is not None else torch.zeros_like(norm.running_mean)
            new_bias = (bias - norm.running_mean) * gain + (norm.bias if norm.affine else 0.0)
            conv.bias = nn.Parameter(new_bias)
        delattr(m, m.norm_name)
        m.norm_name, m.with_norm = None, False
        folded.append(name)
    return folded


PARTS = PartsAdapter(
    name="mmdet neck and heads",
    parts=(FPN, RPNHead, BBoxHead, FCNMaskHead),
    roi_parts=(BBoxHead, FCNMaskHead),
    # forward(x, rpn_results_list, ...): the proposals, so the per-image RoI counts that the
    # heads split their outputs by are the FP run's; forward(feats, rois): the RoIs of each
    # stage (Cascade's later stages regress them from the quantized heads' outputs)
    pinned={BaseRoIHead: 1, BaseRoIExtractor: 1},
    fold_norms=fold_batchnorm,
)
