"""The quantization settings: one small, serializable dataclass."""

from __future__ import annotations

import difflib
from dataclasses import asdict, dataclass, fields

from .quantizers import check_bits

POST_SOFTMAX_CHOICES = ("auto", "log2", "log_sqrt2", "uniform")
POST_LN_CHOICES = ("reparam", "per_channel", "per_tensor")
RANGE_CHOICES = ("mse", "percentile", "minmax")


def check_keys(d: dict, known, what: str) -> None:
    """Raise KeyError on a key of ``d`` that is not in ``known``, naming the closest known key."""
    unknown = sorted(set(d) - set(known))
    if unknown:
        hints = []
        for key in unknown:
            close = difflib.get_close_matches(str(key), sorted(known), n=1)
            hints.append(f"{key!r}" + (f" (did you mean {close[0]!r}?)" if close else ""))
        raise KeyError(f"unknown {what} setting(s) {', '.join(hints)}; known: {sorted(known)}")


def dataclass_from_dict(cls: type, d: dict, what: str):
    """``cls(**d)``, failing with the unknown key, its closest match and the known keys."""
    if not isinstance(d, dict):
        raise ValueError(f"the {what} settings must be a dict, got {type(d).__name__}")
    check_keys(d, {f.name for f in fields(cls)}, what)
    return cls(**d)


@dataclass
class QuantConfig:
    """What to quantize and how.

    w_bits / a_bits: weight and activation bits (2-8).
    post_softmax: quantizer of the attention probabilities: ``auto`` (each attention chooses
        among log quantizers of several bases and a uniform one by the error of its output
        ``probs @ v`` on the calibration images, :mod:`pfcr_mm.quant.attention`), or one fixed
        for all: ``log2``, ``log_sqrt2``, ``uniform``.
    post_ln: inputs of the linears after a LayerNorm (qkv, fc1, PatchMerging reduction):
        ``reparam`` calibrates them per channel and folds the channel scales into the LayerNorm
        and the linear (per tensor at inference, RepQ-ViT); ``per_channel`` keeps them per
        channel; ``per_tensor`` calibrates them per tensor.
    first_layer_a_bits: input bits of the patch-embedding conv (the image).
    head_bits: weight/input bits of a classification head; ``None`` uses w_bits/a_bits.
    act_range / weight_range: range search (``mse``, ``percentile``, ``minmax``).
    """

    w_bits: int = 4
    a_bits: int = 4
    post_softmax: str = "auto"
    post_ln: str = "reparam"
    first_layer_a_bits: int = 8
    head_bits: int | None = None
    act_range: str = "percentile"
    weight_range: str = "mse"

    def __post_init__(self) -> None:
        for name in ("w_bits", "a_bits", "first_layer_a_bits"):
            try:
                check_bits(getattr(self, name))
            except ValueError as err:
                raise ValueError(f"QuantConfig.{name}: {err}") from None
        if self.head_bits is not None:
            check_bits(self.head_bits)
        for name, choices in (
            ("post_softmax", POST_SOFTMAX_CHOICES),
            ("post_ln", POST_LN_CHOICES),
            ("act_range", RANGE_CHOICES),
            ("weight_range", RANGE_CHOICES),
        ):
            if getattr(self, name) not in choices:
                raise ValueError(
                    f"QuantConfig.{name} must be one of {choices}, got {getattr(self, name)!r}"
                )

    @classmethod
    def from_dict(cls, d: dict) -> QuantConfig:
        return dataclass_from_dict(cls, d, "quantization")

    def to_dict(self) -> dict:
        return asdict(self)
