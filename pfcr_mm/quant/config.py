"""The quantization settings: one small, serializable dataclass."""

from __future__ import annotations

import difflib
import types
import typing
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


def _fits(value, annotation) -> bool:
    """Whether ``value`` has the type a settings field is annotated with (``int``, ``float``,
    ``str``, ``bool``, ``dict``, ``None`` and unions of them; an int is a float, a bool is no
    int)."""
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        return any(_fits(value, a) for a in typing.get_args(annotation))
    if annotation is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if annotation is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if annotation is type(None):
        return value is None
    annotation = typing.get_origin(annotation) or annotation
    return isinstance(value, annotation) if isinstance(annotation, type) else True


def check_types(cls: type, d: dict, what: str) -> None:
    """Raise ValueError on a value of ``d`` whose type is not the one its field of the
    dataclass ``cls`` is annotated with (``recon.iters=abc`` from the command line)."""
    hints = typing.get_type_hints(cls)
    for key, value in d.items():
        if not _fits(value, hints[key]):
            expected = " or ".join(
                "None" if a is type(None) else getattr(a, "__name__", str(a))
                for a in typing.get_args(hints[key]) or [hints[key]]
            )
            raise ValueError(f"{what}.{key} must be {expected}, got {value!r}")


def dataclass_from_dict(cls: type, d: dict, what: str):
    """``cls(**d)``, failing with the unknown key, its closest match and the known keys, or with
    the key whose value has the wrong type."""
    if not isinstance(d, dict):
        raise ValueError(f"the {what} settings must be a dict, got {type(d).__name__}")
    check_keys(d, {f.name for f in fields(cls)}, what)
    check_types(cls, d, what)
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
