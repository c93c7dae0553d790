# As pfcr_mask_rcnn_vitdet_b_w4a4.py, at W6A6.
_base_ = ["./pfcr_mask_rcnn_vitdet_b_w4a4.py"]

ptq = dict(quant=dict(w_bits=6, a_bits=6))
