# Cascade Mask R-CNN Swin-S (FP box/mask AP 51.9/45.0 with the Swin-Transformer-Object-Detection
# 3x checkpoint), the whole detector at W4A4; see pfcr_cascade_mask_rcnn_swin_t_w4a4.py. Convert
# cascade_mask_rcnn_swin_small_patch4_window7.pth with tools/convert_swin_det_checkpoint.py.
_base_ = ["./pfcr_cascade_mask_rcnn_swin_t_w4a4.py"]

load_from = "checkpoints/cascade_mask_rcnn_swin_s_3x_coco_mmdet3.pth"
model = dict(backbone=dict(depths=[2, 2, 18, 2], drop_path_rate=0.3))
