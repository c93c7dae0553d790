# DeiT-S PFCR (W4A4) on ImageNet: deit_s_calib_w4a4.py plus fine-to-coarse reconstruction at
# the paper-grade budget (docs/method.md, section 4).
_base_ = ["./deit_s_calib_w4a4.py"]

# The objective of the demo ViT's best (benchmarks/demo_recon_objectives; not measured at this
# budget): the Fisher of the logits' KL divergence on each block's error, half and half with the
# plain error, and the layers outside the blocks (patch embedding, head) reconstructed too.
# Each row of probs @ v divided by the sum of its quantized probabilities (the demo ViT's
# held-out logit error -12 to -17 % at W3A3, -6 to -25 % at W4A4:
# benchmarks/demo_recon_renorm_quick; not measured at this scale).
ptq = dict(
    method="pfcr",
    quant=dict(post_softmax_renorm=True),
    recon=dict(
        iters=20000,
        batch_size=32,
        cache_dtype="float16",
        downstream_weight=1.0,
        downstream_metric="kl",
        downstream_temperature=4.0,
        non_block="layerwise",
    ),
)
