# DeiT-S calibration-only PTQ (W3A3) on ImageNet, the paper's classification setting.
# Needs data/imagenet/{train,val}/<class>/<image> and the timm weights of deit_small_patch16_224
# at checkpoints/deit_small_patch16_224.safetensors
# (e.g. model.safetensors of the Hugging Face repository timm/deit_small_patch16_224.fb_in1k).
_base_ = ["../_base_/imagenet_timm.py"]

model = dict(
    arch="deit_small_patch16_224",
    checkpoint="checkpoints/deit_small_patch16_224.safetensors",
)
ptq = dict(quant=dict(w_bits=3, a_bits=3))
