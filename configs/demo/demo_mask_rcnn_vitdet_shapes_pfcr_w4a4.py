# PFCR on the embedded ViTDet demo at the quick budget of tools/benchmarks/benchmark_recon.py: 300
# iterations per backbone block spread over the fine-to-coarse levels, then the simple FPN, RPN
# head and RoI box and mask heads 300 iterations each (ptq_coco.py), 32 calibration images.
_base_ = ["./demo_mask_rcnn_vitdet_shapes_w4a4.py"]

# Learning rates for 300 steps per unit (benchmarks/demo_det_vitdet_step_rate, chosen on held-out
# calibration-split images): w_lr 1e-2 and every activation step size learned at 0.002 times its
# own size (the peers' 1e-3 / absolute 4e-5 are for 20k steps); W3A3 held-out feature error of
# pfcr 0.086 -> 0.045, val box mAP 49.4 -> 51.9. The prediction layers (the RPN's, box head's
# and mask head's logits) at 8 bits, every other layer at 4 (benchmarks/demo_det_vitdet_head_bits):
# held-out box mAP 61.5 -> 62.6 over three seeds, W3A3 55.1 -> 58.1, every seed higher.
ptq = dict(
    method="pfcr",
    quant=dict(head_bits=8),
    calib=dict(num_images=32),
    recon=dict(iters=300, batch_size=4, w_lr=1e-2, a_lr=2e-3, a_lr_mode="relative"),
)
