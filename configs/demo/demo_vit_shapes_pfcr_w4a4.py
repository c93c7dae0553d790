# PFCR on the embedded classification demo at the quick budget of tools/benchmark_recon.py: 300
# iterations per block spread over the fine-to-coarse levels, 128 calibration images.
_base_ = ["./demo_vit_shapes_w4a4.py"]

ptq = dict(method="pfcr", calib=dict(num_images=128), recon=dict(iters=300, batch_size=32))
