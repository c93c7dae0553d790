"""RepQ-ViT scale re-parameterization of post-LayerNorm activations.

A post-LayerNorm activation has a few channels with far larger ranges than the rest, so it is
calibrated per channel: channel ``c`` gets scale ``s_c`` and zero point ``z_c``, i.e. the range
``[m_c, M_c]`` with ``m_c = -z_c s_c``. Per-channel activation quantization is expensive in
hardware, so the channel ranges are mapped onto one per-tensor range ``[m, M]`` with
``s = mean(s_c)``, ``z = round(mean(z_c))``, ``m = -z s``:

    x'_c = x_c / r_c + b_c,   r_c = s_c / s,   b_c = m - m_c / r_c

The LayerNorm absorbs the map (``gamma' = gamma / r``, ``beta' = beta / r + b``) and the next
linear undoes it (``W' = W diag(r)``, ``bias' = bias - W' b``), so the FP function is unchanged
and the linear's input quantizer becomes per tensor with ``(s, z)``.

Padding: Swin pads the LayerNorm output with zeros up to window multiples, and a zero in the
shifted space would stand for ``x = -r b``, not 0. So only the scale ``1 / r`` is folded into the
LayerNorm (zero padding stays exact) and the shift ``b`` is added at the linear's input
(``QuantLinear.input_shift``), after any padding. On hardware the shift folds into the LayerNorm
bias with ``b`` as the padding value; the simulated function is the same.
"""

from __future__ import annotations

import torch
from torch import nn

from .modules import QuantLinear


@torch.no_grad()
def reparameterize_post_ln(norm: nn.LayerNorm, linear: QuantLinear) -> None:
    """Fold the per-channel input ranges of ``linear`` into ``norm`` and ``linear`` (in place)."""
    quantizer = linear.input_quantizer
    if not (quantizer.per_channel and quantizer.calibrated):
        raise RuntimeError("re-parameterization needs a calibrated per-channel input quantizer")
    if norm.weight is None or norm.bias is None:
        raise ValueError("re-parameterization needs a LayerNorm with elementwise affine parameters")
    s_c, z_c = quantizer.scale.detach(), quantizer.zero_point
    s = s_c.mean()
    z = torch.round(z_c.mean())
    r = s_c / s
    b = (-z * s) - (-z_c * s_c) / r

    norm.weight.div_(r)
    norm.bias.div_(r)
    linear.input_shift = b
    linear.weight.mul_(r)  # W diag(r): scales input columns
    shift = linear.weight @ b
    if linear.bias is None:
        linear.bias = nn.Parameter(-shift)
    else:
        linear.bias.sub_(shift)

    quantizer.ch_axis = None
    quantizer.set_params(s, z)
    linear.weight_quantizer.calibrate_from(linear.weight)
