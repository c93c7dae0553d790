# DeiT-S calibration-only PTQ (W4A4) on ImageNet, the paper's classification setting.
# Needs data/imagenet/{train,val}/<class>/<image> and the timm weights of deit_small_patch16_224
# at checkpoints/deit_small_patch16_224.safetensors
# (e.g. model.safetensors of the Hugging Face repository timm/deit_small_patch16_224.fb_in1k).
_base_ = ["../_base_/imagenet_timm.py"]

model = dict(
    arch="deit_small_patch16_224",
    checkpoint="checkpoints/deit_small_patch16_224.safetensors",
)
# calibration alone, as RepQ-ViT, to compare with its published numbers (docs/method.md
# section 6); without this line calib rounds the weights with GPTQ (recon.compensate "auto")
ptq = dict(quant=dict(w_bits=4, a_bits=4), recon=dict(compensate="none"))
