# PFCR on the embedded detection demo at the quick budget of tools/benchmarks/benchmark_recon.py: 300
# iterations per backbone block spread over the fine-to-coarse levels, then the neck, RPN head
# and RoI box and mask heads 300 iterations each (ptq_coco.py), 32 calibration images; the rates
# of a short run (w_lr 1e-2, each step size at 0.002 times its size), the last 30 % of every
# unit's steps on the weights as they will be hardened (recon.hard_tail), and the prediction
# layers (the RPN's, box head's and mask head's logits) at 8 bits (quant.head_bits; every other
# layer of the detector at 4). Chosen on held-out calibration-split images
# (benchmarks/demo_det_head_bits): box mAP 73.7 over three seeds, against 72.5 with those
# layers at 4 bits and 72.4 with the previous config (the peers' rates, no tail, 4 bits). The
# RPN and RoI mask heads take 150 steps: held-out box 74.1 against 73.7 with 300, in 0.83x the
# quantization time (benchmarks/demo_det_head_steps).
_base_ = ["./demo_mask_rcnn_swin_shapes_w4a4.py"]

ptq = dict(
    method="pfcr",
    quant=dict(head_bits=8),
    calib=dict(num_images=32),
    recon=dict(
        iters=300,
        batch_size=4,
        w_lr=1e-2,
        a_lr=2e-3,
        a_lr_mode="relative",
        hard_tail=0.3,
        outside_iters=dict(rpn_head=150, roi_head=dict(mask_head=150)),
    ),
)
