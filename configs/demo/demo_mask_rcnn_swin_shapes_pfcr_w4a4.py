# PFCR on the embedded detection demo at a short budget: 200 iterations per backbone block over
# two levels (MHSA and MLP units, then blocks: recon.max_level=1), then the neck and RoI box head
# 300 iterations each, the RPN and RoI mask heads 150 (ptq_coco.py), 32 calibration images; the
# rates of a short run (w_lr 1e-2, each step size at 0.002 times its size), the last 30 % of
# every unit's steps on the weights as they will be hardened (recon.hard_tail), and the
# prediction layers (the RPN's, box head's and mask head's logits) at 8 bits (quant.head_bits;
# every other layer of the detector at 4). Chosen on held-out calibration-split images: the
# prediction layers at 8 bits, box mAP 73.7 over three seeds against 72.5 at 4 bits
# (benchmarks/demo_det_head_bits); the RPN and mask heads at 150 steps, 74.1 against 73.7 with
# 300 (benchmarks/demo_det_head_steps); without the third level (groups of blocks, 100 steps per
# unit at each level as before), 74.1 against 73.9 and a held-out feature error no worse, in
# 0.84x the quantization time (benchmarks/demo_det_config_levels).
_base_ = ["./demo_mask_rcnn_swin_shapes_w4a4.py"]

ptq = dict(
    method="pfcr",
    quant=dict(head_bits=8),
    calib=dict(num_images=32),
    recon=dict(
        iters=200,
        max_level=1,
        batch_size=4,
        w_lr=1e-2,
        a_lr=2e-3,
        a_lr_mode="relative",
        hard_tail=0.3,
        outside_iters=dict(neck=300, rpn_head=150, roi_head=dict(bbox_head=300, mask_head=150)),
    ),
)
