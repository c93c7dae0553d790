# ViTDet Mask R-CNN ViT-B (MMDetection projects/ViTDet: MAE-pretrained, LSJ 100 epochs; FP box/mask
# AP 51.6/45.7 as released), the whole detector at W4A4: MMDetection's
# vitdet_mask-rcnn_vit-b-mae_lsj-100e.py with our ViTDet modules (_base_/vitdet_b.py), so that its
# released checkpoint vitdet_mask-rcnn_vit-b-mae_lsj-100e_20230328_153519-e15fe294.pth (from the
# ViTDet project of MMDetection) loads strictly. Needs COCO in data/coco (see _base_/ptq_coco.py).
_base_ = [
    "mmdet::_base_/models/mask-rcnn_r50_fpn.py",
    "mmdet::common/lsj-100e_coco-instance.py",
    "./_base_/ptq_coco.py",
    "./_base_/vitdet_b.py",
]

load_from = "checkpoints/vitdet_mask-rcnn_vit-b-mae_lsj-100e_20230328_153519-e15fe294.pth"
model = dict(
    data_preprocessor=dict(pad_size_divisor=32),
    backbone={{_base_.vitdet_b_backbone}},
    neck={{_base_.vitdet_b_neck}},
    rpn_head=dict(num_convs=2),
    roi_head=dict(
        bbox_head=dict(
            type="Shared4Conv1FCBBoxHead", conv_out_channels=256, norm_cfg={{_base_.ln2d}}
        ),
        mask_head=dict(norm_cfg={{_base_.ln2d}}),
    ),
)
val_dataloader = dict(dataset=dict(pipeline={{_base_.vitdet_test_pipeline}}))
test_dataloader = val_dataloader
