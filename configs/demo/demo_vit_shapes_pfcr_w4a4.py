# PFCR on the embedded classification demo at the "fast" budget of tools/benchmarks/benchmark_recon.py
# (benchmarks/demo_recon_fast, README "Measured: reconstruction"): 100 block-passes per block
# spread over two levels (MHSA/MLP, then blocks), learning rates for a run of tens of steps per
# unit (the peers' 1e-3 / 4e-5 are for 20k), 128 calibration images. Chosen on 512 held-out
# calibration-split images; about 7x faster than the quick run before and no worse there.
_base_ = ["./demo_vit_shapes_w4a4.py"]

ptq = dict(
    method="pfcr",
    calib=dict(num_images=128),
    recon=dict(iters=100, batch_size=32, w_lr=1e-2, a_lr=4e-4, max_level=1),
)
