# The PTQ part of a COCO detection config, to list after an mmdet config in _base_.
# PFCR at the paper-grade budget of method.md: 20k iterations per backbone block spread over the
# fine-to-coarse levels. Calibration: 256 seeded COCO train2017 images through the test pipeline
# (batch 1: images differ in size); the reconstruction caches hold, per image, three fp16
# tensors of a unit's input size (about 40 MB at 800x1333 for Swin-T's first stage, so ~10 GB
# for 256 images); the RoI box head's caches, 1000 RoIs x 256 x 7 x 7 per image FP and quantized,
# about 50 MB per image (~13 GB for 256 images; computed, not measured: lower num_images or
# model.test_cfg.rpn.max_per_img if memory is short). Baselines: --cfg-options ptq.method=calib (ranges only) or ptq.method=block.
# Expected layout: data/coco/annotations/instances_{train,val}2017.json,
# data/coco/{train,val}2017/*.jpg.
custom_imports = dict(imports=["pfcr_mm.engine"], allow_failed_imports=False)
task = "detection"

ptq = dict(
    method="pfcr",
    quant=dict(w_bits=4, a_bits=4, post_softmax="auto", post_ln="reparam"),
    # the papers' protocol: every conv and linear of the detector (backbone, neck, RPN, RoI box
    # and mask heads) quantized; scope="backbone" quantizes the backbone alone
    scope="all",
    calib=dict(
        num_images=256,
        seed=0,
        batch_size=1,
        num_workers=2,
        dataset=dict(
            ann_file="annotations/instances_train2017.json", data_prefix=dict(img="train2017/")
        ),
    ),
    # neck, RPN head, RoI box and mask heads reconstructed as one unit each after the backbone
    # blocks (the heads on the FP model's RoIs), PatchMerging within its stage's order
    recon=dict(iters=20000, batch_size=1, cache_dtype="float16", non_block="parts"),
)
