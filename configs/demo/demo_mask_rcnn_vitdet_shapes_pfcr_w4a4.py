# PFCR on the embedded ViTDet demo at the quick budget of tools/benchmarks/benchmark_recon.py: 300
# iterations per backbone block spread over the fine-to-coarse levels, then the simple FPN, RPN
# head and RoI box and mask heads 300 iterations each (ptq_coco.py), 32 calibration images.
_base_ = ["./demo_mask_rcnn_vitdet_shapes_w4a4.py"]

ptq = dict(method="pfcr", calib=dict(num_images=32), recon=dict(iters=300, batch_size=4))
