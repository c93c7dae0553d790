# PFCR on the embedded detection demo at W3A3: as demo_mask_rcnn_swin_shapes_pfcr_w4a4.py (two
# levels at 200 iterations per backbone block, the rates of a short run, the hard tail, the
# prediction layers at 8 bits), with 64 calibration images, 900 steps for the neck and the RoI
# box head (benchmarks/demo_det_outside_iters_by_unit) and 300 for the RPN and mask heads.
# Chosen on held-out calibration-split images: box mAP 71.0 (three seeds; val 68.9), against 70.3
# (val 67.8) with 32 images and 300 steps for every unit (benchmarks/demo_det_w3a3_config,
# benchmarks/demo_det_head_bits; held-out sets of 536 and 568 images, a difference within about
# two standard deviations; 1.4x faster) and 68.1 with the prediction layers at 3 bits; two
# levels at 200 against three at 300, 71.2 against 71.0 (val 69.1 against 68.6) in 0.90x the
# time (benchmarks/demo_det_w3a3_levels).
_base_ = ["./demo_mask_rcnn_swin_shapes_pfcr_w4a4.py"]

ptq = dict(
    quant=dict(w_bits=3, a_bits=3),
    calib=dict(num_images=64),
    recon=dict(
        outside_iters=dict(neck=900, rpn_head=300, roi_head=dict(bbox_head=900, mask_head=300))
    ),
)
