# As demo_mask_rcnn_swin_shapes_w4a4.py, at W6A6.
_base_ = ["./demo_mask_rcnn_swin_shapes_w4a4.py"]

ptq = dict(quant=dict(w_bits=6, a_bits=6))
