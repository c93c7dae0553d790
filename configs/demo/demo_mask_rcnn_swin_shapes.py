# The embedded detection demo: a tiny Swin Mask R-CNN on the synthetic COCO shapes set
# (tools/make_demo_data.py writes it to data/demo_coco_shapes), trained from scratch on CPU by
# tools/train/train_demo_detector.py (checkpoint committed:
# checkpoints/demo_mask_rcnn_swin_shapes.pth).
# mmdet's Swin-T Mask R-CNN, shrunk: 3 Swin stages of widths 32/64/128 (2 blocks each, window 7)
# at strides 4/8/16. 160x160 inputs give 40/20/10 token maps, which the window attention pads to
# 42/21/14: every stage exercises the padding path.
_base_ = ["mmdet::swin/mask-rcnn_swin-t-p4-w7_fpn_1x_coco.py"]

classes = ("ellipse", "rectangle", "triangle", "star")  # pfcr_mm.demo.coco_shapes.CATEGORIES
num_classes = len(classes)
image_size = 160
data_root = "data/demo_coco_shapes/"

model = dict(
    backbone=dict(
        embed_dims=32,
        depths=[2, 2, 2],
        num_heads=[1, 2, 4],
        window_size=7,
        out_indices=(0, 1, 2),
        drop_path_rate=0.1,
        convert_weights=False,
        init_cfg=None,  # trained from scratch: nothing to download
    ),
    neck=dict(in_channels=[32, 64, 128], out_channels=64, num_outs=5),
    rpn_head=dict(
        in_channels=64,
        feat_channels=64,
        # Objects are 15-60 px: anchors of 16-256 px (scale 4) instead of 32-512 (scale 8).
        anchor_generator=dict(scales=[4]),
    ),
    roi_head=dict(
        # sampling_ratio 2 instead of adaptive (0): large RoIs on the stride-4 map otherwise take
        # many samples per bin, and mmcv's CPU RoIAlign backward dominated the iteration time.
        bbox_roi_extractor=dict(
            roi_layer=dict(sampling_ratio=2), out_channels=64, featmap_strides=[4, 8, 16]
        ),
        bbox_head=dict(in_channels=64, fc_out_channels=256, num_classes=num_classes),
        mask_roi_extractor=dict(
            roi_layer=dict(sampling_ratio=2), out_channels=64, featmap_strides=[4, 8, 16]
        ),
        mask_head=dict(num_convs=2, in_channels=64, conv_out_channels=64, num_classes=num_classes),
    ),
    # At most 5 objects per image: 64 sampled RoIs (up to a quarter positive) instead of 512.
    train_cfg=dict(
        rpn_proposal=dict(nms_pre=500, max_per_img=300),
        rcnn=dict(sampler=dict(num=64)),
    ),
    test_cfg=dict(rpn=dict(nms_pre=500, max_per_img=300)),
)

train_pipeline = [
    dict(type="LoadImageFromFile"),
    dict(type="LoadAnnotations", with_bbox=True, with_mask=True),
    dict(type="Resize", scale=(image_size, image_size), keep_ratio=True),
    dict(type="RandomFlip", prob=0.5),
    dict(type="PackDetInputs"),
]
test_pipeline = [
    dict(type="LoadImageFromFile"),
    dict(type="Resize", scale=(image_size, image_size), keep_ratio=True),
    dict(type="LoadAnnotations", with_bbox=True, with_mask=True),
    dict(
        type="PackDetInputs",
        meta_keys=("img_id", "img_path", "ori_shape", "img_shape", "scale_factor"),
    ),
]
train_dataloader = dict(
    batch_size=4,
    num_workers=0,
    persistent_workers=False,
    dataset=dict(
        data_root=data_root,
        metainfo=dict(classes=classes),
        ann_file="annotations/instances_train.json",
        data_prefix=dict(img="train/"),
        pipeline=train_pipeline,
    ),
)
val_dataloader = dict(
    batch_size=4,
    num_workers=0,
    persistent_workers=False,
    dataset=dict(
        data_root=data_root,
        metainfo=dict(classes=classes),
        ann_file="annotations/instances_val.json",
        data_prefix=dict(img="val/"),
        pipeline=test_pipeline,
    ),
)
test_dataloader = val_dataloader
val_evaluator = dict(ann_file=data_root + "annotations/instances_val.json", metric=["bbox", "segm"])
test_evaluator = val_evaluator

# From scratch on 600 images: AdamW at a higher rate than the fine-tuning 1e-4 of the base, linear
# warm-up, cosine decay per iteration; evaluation once, at the end.
max_epochs = 20
train_cfg = dict(max_epochs=max_epochs, val_interval=max_epochs)
optim_wrapper = dict(
    optimizer=dict(lr=1e-3, weight_decay=0.05), clip_grad=dict(max_norm=10.0, norm_type=2)
)
param_scheduler = [
    dict(type="LinearLR", start_factor=0.01, by_epoch=False, begin=0, end=300),
    dict(
        type="CosineAnnealingLR",
        by_epoch=True,
        begin=0,
        end=max_epochs,
        T_max=max_epochs,
        eta_min=1e-5,
        convert_to_iter_based=True,
    ),
]
default_hooks = dict(
    logger=dict(interval=25),
    checkpoint=dict(interval=max_epochs, max_keep_ckpts=1),
)
randomness = dict(seed=0, deterministic=True)
