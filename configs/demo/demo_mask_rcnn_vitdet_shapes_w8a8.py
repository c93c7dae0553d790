# As demo_mask_rcnn_vitdet_shapes_w4a4.py, at W8A8.
_base_ = ["./demo_mask_rcnn_vitdet_shapes_w4a4.py"]

ptq = dict(quant=dict(w_bits=8, a_bits=8))
