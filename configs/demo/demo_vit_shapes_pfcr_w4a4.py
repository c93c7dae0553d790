# PFCR on the embedded classification demo at the "fast" budget of tools/benchmarks/benchmark_recon.py
# (benchmarks/demo_recon_fast, docs/benchmarks.md "Reconstruction on the demo ViT at the fast
# budget"): 100 block-passes per block
# spread over two levels (MHSA/MLP, then blocks), learning rates for a run of tens of steps per
# unit (the peers' 1e-3 / 4e-5 are for 20k), 128 calibration images. Chosen on 512 held-out
# calibration-split images; about 7x faster than the quick run before and no worse there.
# The objective (benchmarks/demo_recon_objectives): each block's error weighted by the Fisher of
# the KL divergence of the logits' softmax at temperature 4, half and half with the plain error,
# and the patch embedding and head reconstructed too (docs/method.md section 4). Each activation
# step size learned at a rate of a_lr times its own size (benchmarks/demo_recon_step_rate: W3A3
# held-out logit error -12 % with block, -7 % with pfcr; W4A4 within the spread). The head at
# 8 bits and the last 30 % of each unit's steps on the hardened rounding
# (held-out logit error lower on every seed: W4A4 benchmarks/demo_recon_vit_config, W3A3
# benchmarks/demo_recon_val10k; there W3A3 top-1 +0.2 to +0.4 on 10,000 val images). Each
# fc2 input chooses its quantizer, uniform or log above GELU's minimum (quant.post_gelu="auto";
# benchmarks/demo_recon_post_gelu: held-out logit error lower on every seed at W4A4 and W3A3,
# W4A4 top-1 +0.16 to +0.32 on 10,000 val images, W3A3 within the spread). Each row of
# probs @ v divided by the sum of its quantized probabilities (quant.post_softmax_renorm;
# benchmarks/demo_recon_renorm_quick: held-out logit error lower on every seed, W3A3 -12 to
# -17 %, W4A4 -6 to -25 %; W3A3 top-1 87.7 to 88.1 on 10,000 val images).
_base_ = ["./demo_vit_shapes_w4a4.py"]

ptq = dict(
    method="pfcr",
    quant=dict(head_bits=8, post_gelu="auto", post_softmax_renorm=True),
    calib=dict(num_images=128),
    recon=dict(
        iters=100,
        batch_size=32,
        w_lr=1e-2,
        a_lr=5e-3,
        a_lr_mode="relative",
        max_level=1,
        downstream_weight=1.0,
        downstream_metric="kl",
        downstream_temperature=4.0,
        non_block="layerwise",
        hard_tail=0.3,
    ),
)
