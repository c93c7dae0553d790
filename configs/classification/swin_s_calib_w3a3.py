# Swin-S calibration-only PTQ (W3A3) on ImageNet, the paper's classification setting.
# Needs data/imagenet/{train,val}/<class>/<image> and the timm weights of swin_small_patch4_window7_224
# at checkpoints/swin_small_patch4_window7_224.safetensors
# (e.g. model.safetensors of the Hugging Face repository timm/swin_small_patch4_window7_224.ms_in22k_ft_in1k).
_base_ = ["../_base_/imagenet_timm.py"]

model = dict(
    arch="swin_small_patch4_window7_224",
    checkpoint="checkpoints/swin_small_patch4_window7_224.safetensors",
)
ptq = dict(quant=dict(w_bits=3, a_bits=3))
