# ViTDet ViT-B as MMDetection's projects/ViTDet builds it (vitdet_mask-rcnn_vit-b-mae_lsj-100e.py),
# from our modules (pfcr_mm/models/vitdet.py, the same parameter names), for the configs that
# list this file after an mmdet model base: the backbone and simple FPN replace the base's, the
# heads take LN2d, and the test pipeline is the release's (longer side 1024, padded to
# 1024x1024). mmcv builds every norm of the release with eps 1e-5 (its default when a config
# names none), so ours do too.
vitdet_b_backbone = dict(
    _delete_=True,
    type="pfcr.ViTDet",
    img_size=1024,
    patch_size=16,
    embed_dim=768,
    depth=12,
    num_heads=12,
    drop_path_rate=0.1,
    window_size=14,
    window_block_indexes=(0, 1, 3, 4, 6, 7, 9, 10),  # global: 2, 5, 8, 11
    norm_eps=1e-5,
)
vitdet_b_neck = dict(
    _delete_=True,
    type="pfcr.SimpleFPN",
    backbone_channel=768,
    in_channels=[192, 384, 768, 768],
    out_channels=256,
    num_outs=5,
    norm_eps=1e-5,
)
ln2d = dict(type="pfcr.LN2d")
vitdet_test_pipeline = [
    dict(type="LoadImageFromFile"),
    dict(type="Resize", scale=(1024, 1024), keep_ratio=True),
    dict(type="Pad", size=(1024, 1024), pad_val=dict(img=(114, 114, 114))),
    dict(type="LoadAnnotations", with_bbox=True, with_mask=True),
    dict(
        type="PackDetInputs",
        meta_keys=("img_id", "img_path", "ori_shape", "img_shape", "scale_factor"),
    ),
]
