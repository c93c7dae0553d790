# The embedded classification demo: a tiny timm ViT (trained by tools/train/train_demo_classifier.py,
# checkpoint committed) on the synthetic shapes set (tools/make_demo_data.py writes it to
# data/demo_shapes). Calibration-only W4A4 (ranges, then GPTQ's rounding of the weights: calib's
# default) on 256 train images, evaluation on the val split.
_base_ = ["../_base_/imagenet_timm.py"]

data_root = "data/demo_shapes"
model = dict(
    arch="vit_tiny_patch16_224",
    model_kwargs=dict(
        img_size=32, patch_size=4, embed_dim=96, depth=6, num_heads=3, num_classes=10
    ),
    checkpoint="checkpoints/demo_vit_shapes.pth",
)
test_dataloader = dict(
    batch_size=100,
    num_workers=0,
    dataset=dict(
        data_root=data_root,
        resize=32,
        crop_size=32,
        mean=(0.5, 0.5, 0.5),
        std=(0.5, 0.5, 0.5),
        interpolation="bilinear",
    ),
)
# without the base's renormalized probability rows: this config is the base of every demo ViT
# run of tools/benchmarks (methods add settings to it), as they were measured; the `_rn`
# methods and the PFCR config add them
ptq = dict(
    quant=dict(w_bits=4, a_bits=4, post_softmax_renorm=False),
    calib=dict(num_images=256, batch_size=64, num_workers=0),
)
default_hooks = dict(logger=dict(type="LoggerHook", interval=5))
