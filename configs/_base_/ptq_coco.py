# The PTQ part of a COCO detection config, to list after an mmdet config in _base_.
# PFCR at the paper-grade budget of docs/method.md (section 4): 20k iterations per backbone
# block spread over the fine-to-coarse levels. Calibration: 256 seeded COCO train2017 images
# through the test pipeline (batch 1: images differ in size). The reconstruction caches hold, per
# unit and image, its FP input, quantized-path input and FP target in fp16: measured at 800x1333
# and Swin-T's widths and extrapolated to 256 images (docs/benchmarks.md "Memory of the
# reconstruction caches at COCO resolution", benchmarks/cache), 25.8 GB for the RPN head unit,
# 24.9 GB the neck, 14.5 GB the RoI box head, 9.9 GB a stage-1 block unit, plus about 6 GB for
# the rest of the process: ~32 GB of host memory. recon.cache.limit_gb caps the caches in memory
# and writes the rest to memory-mapped files in recon.cache.dir (default: the run's recon/
# folder). Baselines: --cfg-options ptq.method=calib (ranges, then GPTQ's rounding; add
# ptq.recon.compensate=none for ranges only) or ptq.method=block.
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
    # blocks (the heads on the FP model's RoIs, 32 RoIs per step), PatchMerging within its
    # stage's order; the heads against the divergence of their predictions (part_loss="task",
    # chosen on held-out calibration images: benchmarks/demo_det_heads)
    # cache limit_gb=None: every cache in memory; e.g. 8 keeps at most 8 GB there, the rest on disk
    recon=dict(
        iters=20000,
        batch_size=1,
        cache_dtype="float16",
        non_block="parts",
        part_loss="task",
        roi_batch_size=32,
        cache=dict(limit_gb=None),
    ),
)
