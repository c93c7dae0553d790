# Cascade Mask R-CNN ViT-B (ViTDet's cascade variant), the whole detector at W4A4: mmdet's
# cascade Mask R-CNN model with the ViTDet backbone and simple FPN of _base_/vitdet_b.py and, as
# ViTDet's cascade detectors have, 4conv1fc box heads with LN2d. MMDetection releases no cascade
# ViTDet checkpoint: pass one of this model (MMDetection's parameter names) as the CHECKPOINT
# argument of tools/ptq.py. Needs COCO in data/coco (see _base_/ptq_coco.py).
_base_ = [
    "mmdet::_base_/models/cascade-mask-rcnn_r50_fpn.py",
    "mmdet::common/lsj-100e_coco-instance.py",
    "./_base_/ptq_coco.py",
    "./_base_/vitdet_b.py",
]

load_from = None


def _box_head(stds):
    return dict(
        type="Shared4Conv1FCBBoxHead",
        in_channels=256,
        conv_out_channels=256,
        fc_out_channels=1024,
        roi_feat_size=7,
        num_classes=80,
        norm_cfg={{_base_.ln2d}},
        bbox_coder=dict(type="DeltaXYWHBBoxCoder", target_means=[0.0] * 4, target_stds=stds),
        reg_class_agnostic=True,
        loss_cls=dict(type="CrossEntropyLoss", use_sigmoid=False, loss_weight=1.0),
        loss_bbox=dict(type="SmoothL1Loss", beta=1.0, loss_weight=1.0),
    )


model = dict(
    data_preprocessor=dict(pad_size_divisor=32),
    backbone={{_base_.vitdet_b_backbone}},
    neck={{_base_.vitdet_b_neck}},
    rpn_head=dict(num_convs=2),
    roi_head=dict(
        bbox_head=[
            _box_head([0.1, 0.1, 0.2, 0.2]),
            _box_head([0.05, 0.05, 0.1, 0.1]),
            _box_head([0.033, 0.033, 0.067, 0.067]),
        ],
        mask_head=dict(norm_cfg={{_base_.ln2d}}),
    ),
)
val_dataloader = dict(dataset=dict(pipeline={{_base_.vitdet_test_pipeline}}))
test_dataloader = val_dataloader
