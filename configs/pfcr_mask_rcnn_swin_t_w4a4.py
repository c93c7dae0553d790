# Mask R-CNN Swin-T (mmdet model zoo, 3x ms-crop; FP box/mask AP 46.0/41.6), the whole detector at W4A4.
# Needs COCO in data/coco (see _base_/ptq_coco.py) and the mmdet checkpoint
# checkpoints/mask_rcnn_swin-t-p4-w7_fpn_ms-crop-3x_coco_20210906_131725-bacf6f7b.pth
# (from the mmdet Swin model zoo; pass another one as the CHECKPOINT argument of tools/ptq.py).
_base_ = ["mmdet::swin/mask-rcnn_swin-t-p4-w7_fpn_ms-crop-3x_coco.py", "./_base_/ptq_coco.py"]

load_from = "checkpoints/mask_rcnn_swin-t-p4-w7_fpn_ms-crop-3x_coco_20210906_131725-bacf6f7b.pth"
model = dict(backbone=dict(init_cfg=None))  # weights come from load_from, never downloaded
