# The embedded ViTDet demo: a tiny ViTDet Mask R-CNN on the synthetic COCO shapes set, trained
# from scratch on CPU by tools/train/train_demo_detector.py --config THIS_CONFIG --epochs 12
# (checkpoint: checkpoints/demo_mask_rcnn_vitdet_shapes.pth). The Swin demo's detector, data and
# schedule (demo_mask_rcnn_swin_shapes.py) with ViTDet's backbone and simple FPN: 4 blocks of
# width 96 at stride 16, blocks 0 and 2 attending within 4x4 windows, 1 and 3 globally. 160x160
# inputs give 10x10 token maps, which the windowed blocks pad to 12x12; the simple FPN makes
# strides 4/8/16/32 of them (and 64 by subsampling). The pfcr.* types need pfcr_mm.engine
# imported (the training script does; the PTQ configs inherit custom_imports from ptq_coco.py).
_base_ = ["./demo_mask_rcnn_swin_shapes.py"]

image_size = 160
model = dict(
    backbone=dict(
        _delete_=True,
        type="pfcr.ViTDet",
        img_size=image_size,
        patch_size=16,
        embed_dim=96,
        depth=4,
        num_heads=3,
        drop_path_rate=0.1,
        window_size=4,
        window_block_indexes=(0, 2),
        pretrain_img_size=image_size,  # no pretraining: the grid of the training images
        pretrain_use_cls_token=False,
    ),
    neck=dict(
        _delete_=True,
        type="pfcr.SimpleFPN",
        backbone_channel=96,
        in_channels=[24, 48, 96, 96],
        out_channels=64,
        num_outs=5,
    ),
    roi_head=dict(
        bbox_roi_extractor=dict(featmap_strides=[4, 8, 16, 32]),
        mask_roi_extractor=dict(featmap_strides=[4, 8, 16, 32]),
    ),
)
