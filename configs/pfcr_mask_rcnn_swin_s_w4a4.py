# Mask R-CNN Swin-S (mmdet model zoo, 3x ms-crop; FP box/mask AP 48.2/43.2), the whole detector at W4A4.
# Needs COCO in data/coco (see _base_/ptq_coco.py) and the mmdet checkpoint
# checkpoints/mask_rcnn_swin-s-p4-w7_fpn_fp16_ms-crop-3x_coco_20210903_104808-b92c91f1.pth
_base_ = [
    "mmdet::swin/mask-rcnn_swin-s-p4-w7_fpn_amp-ms-crop-3x_coco.py",
    "./_base_/ptq_coco.py",
]

load_from = (
    "checkpoints/mask_rcnn_swin-s-p4-w7_fpn_fp16_ms-crop-3x_coco_20210903_104808-b92c91f1.pth"
)
model = dict(backbone=dict(init_cfg=None))
