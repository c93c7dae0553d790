# Cascade Mask R-CNN Swin-T (FP box/mask AP 50.4/43.7 with the Swin-Transformer-Object-Detection
# 3x checkpoint), the whole detector at W4A4. mmdet 3.x ships no Cascade + Swin config: this one is mmdet's
# cascade-mask-rcnn 3x config with the Swin-T backbone and the 4conv1fc GIoU box heads of the
# original Swin release. Needs COCO in data/coco (see _base_/ptq_coco.py) and the original
# checkpoint cascade_mask_rcnn_swin_tiny_patch4_window7.pth converted to mmdet 3.x keys by
#   python tools/convert_swin_det_checkpoint.py cascade_mask_rcnn_swin_tiny_patch4_window7.pth \
#       checkpoints/cascade_mask_rcnn_swin_t_3x_coco_mmdet3.pth --config THIS_CONFIG
_base_ = ["mmdet::cascade_rcnn/cascade-mask-rcnn_r50_fpn_ms-3x_coco.py", "./_base_/ptq_coco.py"]

load_from = "checkpoints/cascade_mask_rcnn_swin_t_3x_coco_mmdet3.pth"


def _box_head(stds):
    return dict(
        type="ConvFCBBoxHead",
        num_shared_convs=4,
        num_shared_fcs=1,
        in_channels=256,
        conv_out_channels=256,
        fc_out_channels=1024,
        roi_feat_size=7,
        num_classes=80,
        bbox_coder=dict(type="DeltaXYWHBBoxCoder", target_means=[0.0] * 4, target_stds=stds),
        reg_class_agnostic=False,
        reg_decoded_bbox=True,
        norm_cfg=dict(type="BN", requires_grad=True),
        loss_cls=dict(type="CrossEntropyLoss", use_sigmoid=False, loss_weight=1.0),
        loss_bbox=dict(type="GIoULoss", loss_weight=10.0),
    )


model = dict(
    backbone=dict(
        _delete_=True,
        type="SwinTransformer",
        embed_dims=96,
        depths=[2, 2, 6, 2],
        num_heads=[3, 6, 12, 24],
        window_size=7,
        mlp_ratio=4,
        qkv_bias=True,
        qk_scale=None,
        drop_rate=0.0,
        attn_drop_rate=0.0,
        drop_path_rate=0.2,
        patch_norm=True,
        out_indices=(0, 1, 2, 3),
        with_cp=False,
        convert_weights=False,
        init_cfg=None,
    ),
    neck=dict(in_channels=[96, 192, 384, 768]),
    roi_head=dict(
        bbox_head=[
            _box_head([0.1, 0.1, 0.2, 0.2]),
            _box_head([0.05, 0.05, 0.1, 0.1]),
            _box_head([0.033, 0.033, 0.067, 0.067]),
        ]
    ),
)
