# The embedded detection demo: the tiny Swin Mask R-CNN of demo_mask_rcnn_swin_shapes.py
# (checkpoint committed), the whole detector at W4A4, calibration only (ranges, then GPTQ's
# rounding of the weights: calib's default; no reconstruction) on 64 seeded demo train images
# through the test pipeline, evaluated on the 100 val images.
_base_ = ["./demo_mask_rcnn_swin_shapes.py", "../_base_/ptq_coco.py"]

load_from = "checkpoints/demo_mask_rcnn_swin_shapes.pth"
ptq = dict(
    method="calib",
    calib=dict(
        num_images=64,
        batch_size=4,
        num_workers=0,
        dataset=dict(ann_file="annotations/instances_train.json", data_prefix=dict(img="train/")),
    ),
)
