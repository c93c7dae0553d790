"""Every setting of a run, as small serializable dataclasses, and the one place they are checked.

``PTQConfig`` is the ``ptq`` section of a config file::

    PTQConfig(method="pfcr",
              quant=QuantConfig(w_bits=4, a_bits=4),            # what is quantized, and how
              calib=CalibSettings(num_images=128),              # which calibration images
              recon=ReconSettings(iters=300,                    # how units are reconstructed
                                  cache=CacheSettings(limit_gb=8)))  # where their caches live

``from_dict`` refuses an unknown key naming the closest known one, and a value of the wrong type
naming its key; ``to_dict`` gives plain values. Why each default is what it is:
``docs/method.md``. This module imports nothing else of the package.
"""

from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from dataclasses import asdict, dataclass, field, fields

import torch

METHODS = ("calib", "block", "pfcr")
POST_SOFTMAX_CHOICES = ("auto", "log2", "log_sqrt2", "uniform")
POST_LN_CHOICES = ("reparam", "per_channel", "per_tensor")
POST_GELU_CHOICES = ("uniform", "auto", "shift_log2", "shift_log_sqrt2")
LINEAR_KINDS = ("qkv", "proj", "fc1", "fc2")  # a transformer block's linears (linear_a_bits)
RANGE_CHOICES = ("mse", "percentile", "minmax")
POS_STRATEGIES = ("none", "two_stage", "shrink", "anneal")
BUDGET_UNITS = ("block_passes", "steps")
NON_BLOCK = ("calib", "layerwise", "parts")
COMPENSATE = ("auto", "none", "bias", "gptq")  # closed-form steps (pfcr_mm.recon.compensate)
PART_LOSSES = ("mse", "task")  # what a detector's head parts are reconstructed against
A_LR_MODES = ("absolute", "relative")  # how a_lr applies to the activation step sizes
DOWNSTREAM_METRICS = ("mse", "kl")
CACHE_DTYPES = {"float32": torch.float32, "float16": torch.float16}
TOP = "top"  # max_level: one group per stage (the whole encoder of a ViT)


# ---------------------------------------------------------------------------------------------
# Checking


def check_bits(bits: int) -> int:
    """``bits`` if it is an integer from 2 to 8; raises ValueError otherwise."""
    if not isinstance(bits, int) or isinstance(bits, bool) or not 2 <= bits <= 8:
        raise ValueError(f"bits must be an integer from 2 to 8, got {bits!r}")
    return bits


def check_max_level(max_level: int | str) -> int | str:
    """``max_level`` itself if it is ``"top"`` or a level >= 0; raises ValueError otherwise."""
    if max_level != TOP and (
        not isinstance(max_level, int) or isinstance(max_level, bool) or max_level < 0
    ):
        raise ValueError(f"max_level must be a level >= 0 or {TOP!r}, got {max_level!r}")
    return max_level


def check_choice(value, choices, what: str) -> None:
    if value not in choices:
        raise ValueError(f"{what} must be one of {tuple(choices)}, got {value!r}")


def check_keys(d: dict, known, what: str) -> None:
    """Raise KeyError on a key of ``d`` that is not in ``known``, naming the closest known key."""
    unknown = sorted(set(d) - set(known))
    if unknown:
        hints = ", ".join(with_closest(key, known) for key in unknown)
        raise KeyError(f"unknown {what} setting(s) {hints}; known: {sorted(known)}")


def with_closest(key, known) -> str:
    """``'key'``, followed by `` (did you mean 'x'?)`` when ``x`` of ``known`` is close to it."""
    close = difflib.get_close_matches(str(key), sorted(known), n=1)
    return f"{key!r}" + (f" (did you mean {close[0]!r}?)" if close else "")


def _fits(value, annotation) -> bool:
    """Whether ``value`` has the type a settings field is annotated with (``int``, ``float``,
    ``str``, ``bool``, ``dict``, ``None``, a settings dataclass and unions of them; an int is a
    float, a bool is no int)."""
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


def dataclass_from_dict(cls: type, d, what: str):
    """``cls(**d)`` with nested settings built from their dicts (``None``: the defaults),
    failing with the unknown key, its closest match and the known keys, or with the key whose
    value has the wrong type. ``d`` may already be a ``cls``."""
    if isinstance(d, cls):
        return d
    if not isinstance(d, dict):
        raise ValueError(f"the {what} settings must be a dict, got {type(d).__name__}")
    d = dict(d)
    renamed = getattr(cls, "RENAMED", {})
    for old in set(d) & set(renamed):  # keys of earlier versions, still accepted
        part, key = renamed[old]
        d[part] = {**(d.get(part) or {}), key: d.pop(old)}
    check_keys(d, {f.name for f in fields(cls)}, what)
    hints = typing.get_type_hints(cls)
    for key, value in d.items():
        if dataclasses.is_dataclass(hints[key]) and not isinstance(value, hints[key]):
            d[key] = dataclass_from_dict(hints[key], value or {}, f"{what}.{key}")
    check_types(cls, d, what)
    return cls(**d)


def dotted(d: dict, prefix: str = "") -> dict:
    """``d`` with nested non-empty dicts flattened into dotted keys after ``prefix``:
    ``{"a": {"b": 1}}`` -> ``{"a.b": 1}`` (how ``--cfg-options
    recon.outside_iters.roi_head.bbox_head=900`` arrives; settings compared key by key)."""
    flat = {}
    for key, value in d.items():
        name = f"{prefix}{key}"
        nested = isinstance(value, dict) and value
        flat.update(dotted(value, f"{name}.") if nested else {name: value})
    return flat


class _Settings:
    """``from_dict`` / ``to_dict`` of a settings dataclass."""

    WHAT = "settings"

    @classmethod
    def from_dict(cls, d: dict):
        return dataclass_from_dict(cls, d, cls.WHAT)

    def to_dict(self) -> dict:
        return asdict(self)


# ---------------------------------------------------------------------------------------------
# The settings


@dataclass
class QuantConfig(_Settings):
    """What to quantize and how (``docs/method.md`` section 2).

    w_bits / a_bits: weight and activation bits (2-8).
    post_softmax: quantizer of the attention probabilities: ``auto`` (each attention chooses
        among log quantizers of several bases and a uniform one, :mod:`pfcr_mm.quant.attention`),
        or one fixed for all: ``log2``, ``log_sqrt2``, ``uniform``.
    post_softmax_renorm: divide each row of ``probs @ v`` by the sum of that row's quantized
        probabilities, which rounding moves away from 1 (:mod:`pfcr_mm.quant.attention`).
    post_ln: inputs of the linears after a LayerNorm (qkv, fc1, PatchMerging reduction):
        ``reparam`` calibrates them per channel and folds the channel scales into the LayerNorm
        and the linear (per tensor at inference, RepQ-ViT); ``per_channel`` keeps them per
        channel; ``per_tensor`` calibrates them per tensor.
    post_gelu: inputs of the MLPs' second linears, after GELU: ``uniform``; ``auto`` (each
        chooses among uniform and log quantizers above GELU's minimum, as ``post_softmax``
        chooses, :mod:`pfcr_mm.quant.post_gelu`); or one log quantizer for all,
        ``shift_log2`` or ``shift_log_sqrt2``.
    first_layer_a_bits: input bits of the patch-embedding conv (the image).
    linear_a_bits: input bits of the transformer blocks' linears by kind, overriding ``a_bits``
        for the kinds named: ``qkv``, ``proj`` (the attention's), ``fc1``, ``fc2`` (the MLP's);
        e.g. ``dict(qkv=4, proj=4)`` with ``a_bits=3``: a mixed-precision setting, which must
        be named as one beside any comparison with a model wholly at ``a_bits``. ``None`` (or a
        kind mapped to ``None``): ``a_bits``. The attention's matmul inputs (q, k, v, the
        probabilities) stay at ``a_bits``.
    head_bits: weight/input bits of the prediction layers (a classifier's head; a detector's
        RPN, RoI box and mask logits); ``None`` uses w_bits/a_bits.
    act_range / weight_range: range search (``mse``, ``percentile``, ``minmax``).
    """

    WHAT = "quantization"

    w_bits: int = 4
    a_bits: int = 4
    post_softmax: str = "auto"
    post_softmax_renorm: bool = False
    post_ln: str = "reparam"
    post_gelu: str = "uniform"
    first_layer_a_bits: int = 8
    linear_a_bits: dict | None = None
    head_bits: int | None = None
    act_range: str = "percentile"
    weight_range: str = "mse"

    def __post_init__(self) -> None:
        bits = {name: getattr(self, name) for name in ("w_bits", "a_bits", "first_layer_a_bits")}
        if self.head_bits is not None:
            bits["head_bits"] = self.head_bits
        if self.linear_a_bits is not None:
            check_keys(self.linear_a_bits, LINEAR_KINDS, "QuantConfig.linear_a_bits")
            # a plain dict (saved with the model) of the kinds named; None: a_bits for all
            named = {kind: b for kind, b in self.linear_a_bits.items() if b is not None}
            self.linear_a_bits = named or None
            bits.update({f"linear_a_bits.{kind}": b for kind, b in named.items()})
        for name, value in bits.items():
            try:
                check_bits(value)
            except ValueError as err:
                raise ValueError(f"QuantConfig.{name}: {err}") from None
        check_choice(self.post_softmax, POST_SOFTMAX_CHOICES, "QuantConfig.post_softmax")
        check_choice(self.post_ln, POST_LN_CHOICES, "QuantConfig.post_ln")
        check_choice(self.post_gelu, POST_GELU_CHOICES, "QuantConfig.post_gelu")
        check_choice(self.act_range, RANGE_CHOICES, "QuantConfig.act_range")
        check_choice(self.weight_range, RANGE_CHOICES, "QuantConfig.weight_range")


@dataclass
class CalibSettings(_Settings):
    """Which calibration images a run takes (the engine picks them; ``pfcr_mm.quantize`` takes
    ``calib_data`` as given).

    num_images: how many images, drawn at random with ``seed`` from the calibration split.
    heldout_images: the engine measures the output error on this many further images of the
        calibration split, which calibration does not see (``ptq_results.json``
        ``heldout_error``): where settings are chosen without the evaluation images; 0: none.
    batch_size / num_workers: of the calibration loader.
    dataset: MMEngine only: overrides of the test dataset config that select the calibration
        split, e.g. ``dict(split='train')`` or COCO train2017's ``ann_file``/``data_prefix``.
    """

    WHAT = "ptq.calib"

    num_images: int = 256
    seed: int = 0
    heldout_images: int = 32
    batch_size: int = 32
    num_workers: int = 0
    dataset: dict | None = None

    def __post_init__(self) -> None:
        for name in ("num_images", "batch_size"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"ptq.calib.{name} must be a positive integer, got {value!r}")
        if not isinstance(self.heldout_images, int) or self.heldout_images < 0:
            raise ValueError(f"ptq.calib.heldout_images must be >= 0, got {self.heldout_images!r}")
        if not isinstance(self.num_workers, int) or self.num_workers < 0:
            raise ValueError(f"ptq.calib.num_workers must be >= 0, got {self.num_workers!r}")
        if not isinstance(self.seed, int) or isinstance(self.seed, bool):
            raise ValueError(f"ptq.calib.seed must be an integer, got {self.seed!r}")


@dataclass
class CacheSettings(_Settings):
    """Where the reconstruction caches live: run infrastructure, which never changes the
    quantized model (a run may be resumed with other values).

    limit_gb: the most GB (10^9 bytes) the unit caches hold in host memory; cached tensors
        beyond it are written to memory-mapped files (bit-identical steps). ``None``: no limit.
    dir: the folder the spill files go in (a temporary folder inside it, removed at the end);
        ``None``: the run's reconstruction log folder, or the system's temporary folder.
    """

    WHAT = "ptq.recon.cache"

    limit_gb: float | None = None
    dir: str | None = None

    def __post_init__(self) -> None:
        limit = self.limit_gb
        if limit is not None and (
            isinstance(limit, bool) or not isinstance(limit, (int, float)) or not limit >= 0
        ):
            raise ValueError(
                f"ptq.recon.cache.limit_gb must be a number >= 0 or None, got {limit!r}"
            )
        if self.dir is not None and not isinstance(self.dir, str):
            raise ValueError(f"ptq.recon.cache.dir must be a path or None, got {self.dir!r}")


@dataclass
class ReconSettings(_Settings):
    """How each unit is reconstructed (the loss and its schedule: ``docs/method.md`` section 4).

    iters: the budget per block: optimizer steps of a ``block`` run's unit; a ``pfcr`` run
        spreads ``iters`` x blocks block-passes over its levels (``budget_unit``).
    batch_size: samples per step, drawn from the cached calibration batches.
    roi_batch_size: RoIs per step of a detector's RoI box or mask head unit.
    w_lr / a_lr: Adam learning rates of the AdaRound variables and of the activation step sizes
        (cosine-annealed to 0 over a unit). The defaults are the peers' for 20k steps per unit;
        short runs need larger ones (the demo's fast budget: 1e-2 / 4e-4).
    a_lr_mode: ``"absolute"`` (the peers'): ``a_lr`` is the rate of every step size in its own
        units, so Adam moves a step of 0.01 and one of 6 by the same amount per iteration;
        ``"relative"``: each step size's rate is ``a_lr`` times its size when its unit starts,
        so every step can move by the same fraction of itself (docs/method.md section 4).
    round_weight: weight of the AdaRound regularizer.
    beta_start / beta_end / warmup: the regularizer temperature decays linearly from beta_start
        to beta_end after the first ``warmup`` fraction of a unit's iterations (regularizer off).
    hard_tail: the last fraction of a unit's iterations runs its weights with the rounding they
        will be hardened to (``V >= 0``), the AdaRound variables learning through it with the
        soft rounding's gradient (straight-through); 0: off (docs/method.md section 4).
    budget_unit: ``"block_passes"`` (a step costs the blocks its unit holds) or ``"steps"``.
    pos: the progressive optimization strategy (``none``, ``two_stage``, ``shrink``,
        ``anneal``: :mod:`pfcr_mm.recon.pos`).
    max_level: the coarsest level of a ``pfcr`` run: ``"top"`` or an integer (0: MHSA and MLP
        only, 1: up to blocks, ...).
    non_block: layers outside the blocks: ``"calib"`` (calibrated only), ``"layerwise"`` (a
        unit each) or ``"parts"`` (a unit per part an adapter declares: a detector's neck, RPN
        head, RoI heads); ``outside_iters`` iterations per unit, outside the block budget.
    outside_iters: optimizer steps of each unit outside the blocks: one number for all, or a
        dict from unit names (``neck``, ``roi_head.bbox_head``; nested dicts read as dotted names)
        to steps, the units it does not name getting ``iters``; ``None``: ``iters``.
    drop_prob: probability that an input element comes from the FP input (QDrop); 0: off.
    cache_dtype: dtype of the cached inputs and targets (``float32`` or ``float16``).
    seed: seeds the sampling of batches and QDrop masks (per unit, combined with its name).
    log_every: report progress every this many iterations (0: only at the end of a unit).
    downstream_weight / downstream_probes: the output-aware term (0: off): a block unit's
        squared error weighted by the diagonal of ``J^T M J`` from its output to the model's
        downstream outputs, estimated with ``downstream_probes`` random projections, mixed with
        the plain error by this weight.
    downstream_metric / downstream_temperature: ``M``: ``mse`` (the outputs' squared error; a
        detector's features) or ``kl`` (the Fisher of the KL divergence of the logits' softmax at
        this temperature; a classifier).
    downstream_min_level: the term applies to units of this level and coarser only.
    compensate: closed-form compensation on the calibration images
        (:mod:`pfcr_mm.recon.compensate`): ``"gptq"`` rounds the weights with GPTQ after
        calibration (the reconstruction starts from its weights); ``"bias"`` corrects the output
        mean of every quantized layer after the reconstruction (after calibration with
        ``calib``); ``"none"``: off; ``"auto"`` (the default): ``"gptq"`` with ``calib``, where it
        lowered the held-out error of every demo model on every seed, ``"none"`` with ``block``
        and ``pfcr``, whose reconstruction it did not help (``docs/method.md`` section 4).
        :class:`PTQConfig` resolves it once, at construction: a config whose ``method`` is
        changed afterwards (or a resolved dict edited) keeps the resolved value.
    part_loss: what the parts whose outputs are the task's (a detector's RPN head, RoI box and
        mask heads; ``non_block="parts"``) are reconstructed against: ``"mse"``, the squared
        error of their outputs; ``"task"``, the divergence of the detector's predictions they
        make (score distributions, and box deltas weighted by the FP scores; docs/method.md
        section 4), scaled to the squared error at the first step.
    cache: where the caches live (:class:`CacheSettings`).
    """

    WHAT = "reconstruction"
    # earlier flat keys -> (nested settings, key)
    RENAMED = {"cache_limit_gb": ("cache", "limit_gb"), "cache_dir": ("cache", "dir")}

    iters: int = 20000
    batch_size: int = 32
    w_lr: float = 1e-3
    a_lr: float = 4e-5
    a_lr_mode: str = "absolute"
    round_weight: float = 0.01
    beta_start: float = 20.0
    beta_end: float = 2.0
    warmup: float = 0.2
    hard_tail: float = 0.0
    budget_unit: str = "block_passes"
    pos: str = "anneal"
    max_level: int | str = TOP
    non_block: str = "calib"
    outside_iters: int | dict | None = None
    drop_prob: float = 0.5
    cache_dtype: str = "float32"
    seed: int = 0
    log_every: int = 1000
    downstream_weight: float = 0.0
    downstream_probes: int = 8
    downstream_metric: str = "mse"
    downstream_temperature: float = 1.0
    downstream_min_level: int = 0
    roi_batch_size: int = 128
    compensate: str = "auto"
    part_loss: str = "mse"
    cache: CacheSettings = field(default_factory=CacheSettings)

    def __post_init__(self) -> None:
        if self.iters < 1 or self.batch_size < 1 or self.roi_batch_size < 1:
            raise ValueError("ReconSettings.iters, batch_size and roi_batch_size must be >= 1")
        if isinstance(self.outside_iters, dict):
            self.outside_iters = dotted(self.outside_iters)
        steps = (
            self.outside_iters.values()
            if isinstance(self.outside_iters, dict)
            else [self.outside_iters]
        )
        if self.outside_iters is not None and not all(_fits(n, int) and n >= 1 for n in steps):
            raise ValueError(
                "ReconSettings.outside_iters must be >= 1, a dict of unit names to steps >= 1, "
                f"or None, got {self.outside_iters}"
            )
        if not 0.0 <= self.warmup < 1.0:
            raise ValueError(f"ReconSettings.warmup must be in [0, 1), got {self.warmup}")
        if not 0.0 <= self.hard_tail < 1.0:
            raise ValueError(f"ReconSettings.hard_tail must be in [0, 1), got {self.hard_tail!r}")
        if not 0.0 <= self.drop_prob <= 1.0:
            raise ValueError(f"ReconSettings.drop_prob must be in [0, 1], got {self.drop_prob}")
        check_choice(self.pos, POS_STRATEGIES, "ReconSettings.pos")
        check_choice(self.budget_unit, BUDGET_UNITS, "ReconSettings.budget_unit")
        check_choice(self.non_block, NON_BLOCK, "ReconSettings.non_block")
        check_choice(self.compensate, COMPENSATE, "ReconSettings.compensate")
        check_choice(self.part_loss, PART_LOSSES, "ReconSettings.part_loss")
        check_choice(self.a_lr_mode, A_LR_MODES, "ReconSettings.a_lr_mode")
        check_choice(self.cache_dtype, CACHE_DTYPES, "ReconSettings.cache_dtype")
        check_max_level(self.max_level)
        check_choice(self.downstream_metric, DOWNSTREAM_METRICS, "ReconSettings.downstream_metric")
        if not self.downstream_temperature > 0:
            raise ValueError(
                "ReconSettings.downstream_temperature must be > 0, got "
                f"{self.downstream_temperature!r}"
            )
        if not isinstance(self.downstream_min_level, int) or self.downstream_min_level < 0:
            raise ValueError(
                "ReconSettings.downstream_min_level must be a level >= 0, got "
                f"{self.downstream_min_level!r}"
            )
        if not self.downstream_weight >= 0 or not self.downstream_probes >= 1:
            raise ValueError(
                "ReconSettings.downstream_weight must be >= 0 and downstream_probes >= 1, got "
                f"{self.downstream_weight!r} and {self.downstream_probes!r}"
            )


@dataclass
class PTQConfig(_Settings):
    """Everything a post-training quantization run is given.

    method: ``calib`` (ranges, then GPTQ's rounding by default; RepQ-ViT-like with
        ``recon.compensate="none"``), ``block`` (every transformer block
        reconstructed once, QDrop/BRECQ-like) or ``pfcr`` (fine to coarse).
    scope: the sub-modules to quantize, joined by ``+`` (``"backbone+neck"``), or ``"all"``.
    quant / calib / recon: :class:`QuantConfig`, :class:`CalibSettings`, :class:`ReconSettings`.
    eval_fp: the engine evaluates the FP model before quantizing it.
    """

    WHAT = "ptq"

    method: str = "calib"
    scope: str = "all"
    quant: QuantConfig = field(default_factory=QuantConfig)
    calib: CalibSettings = field(default_factory=CalibSettings)
    recon: ReconSettings = field(default_factory=ReconSettings)
    eval_fp: bool = True

    def __post_init__(self) -> None:
        check_choice(self.method, METHODS, "ptq.method")
        if self.recon.compensate == "auto":  # a copy: the caller's settings stay as given
            how = "gptq" if self.method == "calib" else "none"
            self.recon = dataclasses.replace(self.recon, compensate=how)
        if not isinstance(self.scope, str) or not self.scope:
            raise ValueError(
                f"ptq.scope must be a string like 'backbone+neck' or 'all', got {self.scope!r}"
            )

    @property
    def scope_modules(self) -> list[str] | None:
        """The sub-module names of ``scope`` (``None``: the whole model)."""
        return None if self.scope == "all" else self.scope.split("+")
