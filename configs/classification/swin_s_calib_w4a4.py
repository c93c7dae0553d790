# Swin-S calibration-only PTQ (W4A4) on ImageNet, the paper's classification setting.
# Needs data/imagenet/{train,val}/<class>/<image> and the timm weights of swin_small_patch4_window7_224
# at checkpoints/swin_small_patch4_window7_224.safetensors
# (e.g. model.safetensors of the Hugging Face repository timm/swin_small_patch4_window7_224.ms_in22k_ft_in1k).
_base_ = ["../_base_/imagenet_timm.py"]

model = dict(
    arch="swin_small_patch4_window7_224",
    checkpoint="checkpoints/swin_small_patch4_window7_224.safetensors",
)
# calibration alone, as RepQ-ViT, to compare with its published numbers (docs/method.md
# section 6): without GPTQ's rounding (recon.compensate "auto") and the renormalized
# probability rows (quant.post_softmax_renorm) that the base config adds
ptq = dict(
    quant=dict(w_bits=4, a_bits=4, post_softmax_renorm=False), recon=dict(compensate="none")
)
