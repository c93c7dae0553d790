"""mmdet 3.x detectors outside the backbone: the neck and heads as reconstruction parts, the RoIs
pinned between the FP and the quantized runs, BatchNorm folded into the convolutions before them.

Imported only when mmdet's RoI heads are already loaded (see ``adapters.available_parts``), so
the core never imports mmdet itself.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
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


def bernoulli_kl(out: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """``KL(sigmoid(target) || sigmoid(out))`` elementwise, from the logits."""
    p = torch.sigmoid(target)
    # log sigmoid(x) = -softplus(-x), log(1 - sigmoid(x)) = -softplus(x)
    return p * (F.softplus(-out) - F.softplus(-target)) + (1 - p) * (
        F.softplus(out) - F.softplus(target)
    )


def _weighted_deltas(out: torch.Tensor, target: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
    """Squared error of box deltas ``(..., K * 4)`` summed per box, weighted by the probability
    ``(..., K)`` of the object (class) each box belongs to."""
    diff = (out - target).unflatten(-1, (-1, 4)).pow(2).sum(-1)
    return p * diff


def rpn_task_loss(head: RPNHead):
    """The RPN's predictions: per anchor, the KL divergence of its objectness and its box
    deltas' squared error weighted by the FP objectness (a background anchor's box is never
    used); summed over anchors, averaged over images. Outputs per level ``(B, H, W, A)`` and
    ``(B, H, W, 4 A)``; a softmax objectness (two logits per anchor) is compared as such."""
    sigmoid = getattr(head, "use_sigmoid_cls", True)

    def loss(out, target):
        (cls_q, reg_q), (cls_t, reg_t) = out, target
        total = 0.0
        for cq, rq, ct, rt in zip(cls_q, reg_q, cls_t, reg_t, strict=True):
            if sigmoid:
                kl, p = bernoulli_kl(cq, ct), torch.sigmoid(ct)
            else:  # (..., 2 A): object and background logits per anchor (mmdet's order)
                lq, lt = cq.unflatten(-1, (-1, 2)), ct.unflatten(-1, (-1, 2))
                kl = _softmax_kl(lq, lt)
                p = lt.softmax(-1)[..., 0]
            total = total + (kl.sum() + _weighted_deltas(rq, rt, p).sum()) / ct.shape[0]
        return total

    return loss


def _softmax_kl(out: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """``KL(softmax(target) || softmax(out))`` over the last axis."""
    log_t = target.log_softmax(-1)
    return (log_t.exp() * (log_t - out.log_softmax(-1))).sum(-1)


def bbox_task_loss(head: BBoxHead):
    """A RoI box head's predictions: per RoI, the KL divergence of its class scores (softmax
    over the classes and the background, or a sigmoid per class) and its box deltas' squared
    error weighted by the FP probability of the class each box is for (class-agnostic: of any
    object); averaged over RoIs."""
    sigmoid = getattr(head.loss_cls, "use_sigmoid", False)

    def loss(out, target):
        (cls_q, reg_q), (cls_t, reg_t) = out, target
        if sigmoid:
            kl, p = bernoulli_kl(cls_q, cls_t).sum(-1), torch.sigmoid(cls_t)
        else:
            kl, p = _softmax_kl(cls_q, cls_t), cls_t.softmax(-1)[:, :-1]
        if reg_t.shape[-1] == 4:  # class-agnostic boxes
            p = p.sum(-1, keepdim=True)
        return (kl + _weighted_deltas(reg_q, reg_t, p).sum(-1)).mean()

    return loss


def mask_task_loss(head: FCNMaskHead):
    """A RoI mask head's predictions: the KL divergence of every mask pixel's sigmoid, summed
    over pixels and classes, averaged over RoIs."""

    def loss(out, target):
        return bernoulli_kl(out, target).sum() / target.shape[0]

    return loss


PARTS = PartsAdapter(
    name="mmdet neck and heads",
    parts=(FPN, RPNHead, BBoxHead, FCNMaskHead),
    roi_parts=(BBoxHead, FCNMaskHead),
    # forward(x, rpn_results_list, ...): the proposals, so the per-image RoI counts that the
    # heads split their outputs by are the FP run's; forward(feats, rois): the RoIs of each
    # stage (Cascade's later stages regress them from the quantized heads' outputs)
    pinned={BaseRoIHead: 1, BaseRoIExtractor: 1},
    fold_norms=fold_batchnorm,
    task_losses={RPNHead: rpn_task_loss, BBoxHead: bbox_task_loss, FCNMaskHead: mask_task_loss},
    output_layers={
        RPNHead: ("rpn_cls", "rpn_reg"),
        BBoxHead: ("fc_cls", "fc_reg"),
        FCNMaskHead: ("conv_logits", "fc_logits"),  # fc_logits: PointRend's coarse mask head
    },
)
