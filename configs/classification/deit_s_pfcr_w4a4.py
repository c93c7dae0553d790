# DeiT-S PFCR (W4A4) on ImageNet: deit_s_calib_w4a4.py plus fine-to-coarse reconstruction at
# the paper-grade budget (docs/method.md, section 4).
_base_ = ["./deit_s_calib_w4a4.py"]

ptq = dict(method="pfcr", recon=dict(iters=20000, batch_size=32, cache_dtype="float16"))
