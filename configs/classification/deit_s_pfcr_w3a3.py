# As deit_s_pfcr_w4a4.py, at W3A3.
_base_ = ["./deit_s_pfcr_w4a4.py"]

ptq = dict(quant=dict(w_bits=3, a_bits=3))
