# As pfcr_cascade_mask_rcnn_vitdet_b_w4a4.py, at W3A3.
_base_ = ["./pfcr_cascade_mask_rcnn_vitdet_b_w4a4.py"]

ptq = dict(quant=dict(w_bits=3, a_bits=3))
