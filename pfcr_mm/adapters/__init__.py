"""Convert a model by module class and list its finest reconstruction units.

:func:`prepare` swaps, inside the chosen parts of a model, every ``nn.Linear`` and ``nn.Conv2d``
(and the ``nn.ConvTranspose2d`` of the parts that declare theirs) for a quantized one and every
supported attention for one with an explicit quantized forward, and returns a
:class:`QuantPlan`: the MHSA and MLP units in forward order and the post-LayerNorm pairs to
re-parameterize. :func:`prepare_calibrated` adds calibration and the
re-parameterization on top (the first steps of :func:`pfcr_mm.quantize`).

Adapters for timm are used when timm is loaded, the one for mmdet when mmdet's Swin is loaded,
the one for ViTDet when ``pfcr_mm.models.vitdet`` is: a model can only hold classes of a module
that has been imported, and the core itself imports none of them.
"""

from __future__ import annotations

import importlib
import sys
from collections.abc import Callable
from dataclasses import dataclass, field

from torch import nn

from ..quant.calibrate import DownstreamOutputs, calibrate_activations, set_quant_state
from ..quant.modules import QuantConv2d, QuantConvTranspose2d, QuantLinear
from ..quant.post_gelu import PostGeluLinear
from ..quant.reparam import reparameterize_post_ln
from ..settings import QuantConfig
from .base import ArchAdapter, PartsAdapter, ReconUnit, swap_attention

# adapter module -> the module that must already be loaded for it to apply
_ADAPTER_MODULES = {
    "timm_vit": "timm",
    "timm_swin": "timm",
    "mmdet_swin": "mmdet.models.backbones.swin",
    "vitdet": "pfcr_mm.models.vitdet",
}
_PARTS_MODULES = {"mmdet_parts": "mmdet.models.roi_heads", "vitdet": "pfcr_mm.models.vitdet"}

# Module classes that compute in floating point, named in the summary when present.
_FP_CLASS_NAMES = (
    "LayerNorm",
    "LN2d",
    "GELU",
    "Softmax",
    "RoIAlign",
    "BatchNorm2d",
    "GroupNorm",
    "ReLU",
    "ConvTranspose2d",
    "MaxPool2d",
)


class UnsupportedModelError(ValueError):
    pass


def available_adapters() -> list[ArchAdapter]:
    return [
        importlib.import_module(f"{__name__}.{mod}").ADAPTER
        for mod, needs in _ADAPTER_MODULES.items()
        if needs in sys.modules
    ]


def available_parts() -> list[PartsAdapter]:
    return [
        importlib.import_module(f"{__name__}.{mod}").PARTS
        for mod, needs in _PARTS_MODULES.items()
        if needs in sys.modules
    ]


def task_loss_of(part: nn.Module) -> Callable | None:
    """The divergence of the task's predictions that ``part`` makes (a detector's RPN or RoI
    head; :attr:`PartsAdapter.task_losses`), ``loss(out, target)``; ``None`` for other parts."""
    for pa in available_parts():
        for cls, make in pa.task_losses.items():
            if isinstance(part, cls):
                return make(part)
    return None


def supported_block_classes() -> list[str]:
    names = {
        "timm_vit": ["timm.models.vision_transformer.Block"],
        "timm_swin": ["timm.models.swin_transformer.SwinTransformerBlock"],
        "mmdet_swin": ["mmdet.models.backbones.swin.SwinBlock"],
        "vitdet": ["pfcr_mm.models.vitdet.Block"],
    }
    return [n for mod in _ADAPTER_MODULES for n in names[mod]]


@dataclass
class QuantPlan:
    """The result of :func:`prepare`.

    layers: the quantized layers outside the blocks in forward order, as ``(name, layer,
        next_block)``: the index of the first block that runs after the layer (0: before every
        block; ``None``: after the last one, as a detector's neck and heads).
    parts: the modules of the scope that a :class:`~pfcr_mm.adapters.base.PartsAdapter`
        declares as parts (a detector's neck, RPN head, RoI box and mask heads) and that hold
        quantized layers, as ``(name, module, per_roi)`` in forward order; ``per_roi``: its
        inputs hold one row per RoI (a RoI box or mask head).
    pinned: ``(module, argument index)`` pairs a reconstruction takes from the FP run (RoIs).
    folded: the modules whose normalization was folded into the layer before it.
    """

    cfg: QuantConfig
    units: list[ReconUnit]
    post_ln_pairs: list[tuple[nn.Module, QuantLinear]]
    quantized_modules: list[str]
    fp_parts: list[str] = field(default_factory=list)
    layers: list[tuple[str, nn.Module, int | None]] = field(default_factory=list)
    parts: list[tuple[str, nn.Module, bool]] = field(default_factory=list)
    pinned: list[tuple[nn.Module, int]] = field(default_factory=list)
    folded: list[str] = field(default_factory=list)


def _find_blocks(model: nn.Module, adapters: list[ArchAdapter]):
    found = []
    for name, m in model.named_modules():
        for ad in adapters:
            if isinstance(m, ad.block_classes):
                found.append((name, m, ad))
                break
    return found


def find_blocks(
    model: nn.Module, scope: list[str] | None = None
) -> tuple[list[nn.Module], list[tuple[nn.Module, str, nn.Module, ArchAdapter]]]:
    """The scope's root modules and the supported blocks inside them, in forward order, as
    ``(root, name relative to root, block, adapter)``.

    Raises ValueError for a scope naming no sub-module and :class:`UnsupportedModelError` when
    the scope holds no supported transformer block; changes nothing.
    """
    children = dict(model.named_children())
    unknown = [s for s in scope or [] if s and s not in children]
    if unknown:
        raise ValueError(
            f"quantization scope {unknown} names no sub-module of {type(model).__name__}; "
            f"its sub-modules are {sorted(children)}"
        )
    roots = [model] if scope is None else [model.get_submodule(s) for s in scope]
    adapters = available_adapters()
    blocks = [(root, *b) for root in roots for b in _find_blocks(root, adapters)]
    if not blocks:
        raise UnsupportedModelError(
            f"found no supported transformer block in {type(model).__name__}"
            f"{'' if scope is None else f' (scope {scope})'}; supported block classes: "
            f"{', '.join(supported_block_classes())}"
        )
    return roots, blocks


def prepare(
    model: nn.Module,
    cfg: QuantConfig,
    scope: list[str] | None = None,
    head: nn.Module | None = None,
) -> QuantPlan:
    """Swap modules in place for quantized ones (all quantizers start in floating point).

    scope: names of the sub-modules to quantize (``None``: the whole model); ``""`` is the root.
    head: a classification head, quantized with ``cfg.head_bits`` if set, as are the prediction
        layers of a detector's heads (:attr:`PartsAdapter.output_layers`) in ``scope``.
    Raises :class:`UnsupportedModelError` when the model holds no supported transformer block,
    ValueError when ``cfg.head_bits`` is set and there is neither.
    """
    roots, blocks = find_blocks(model, scope)
    heads = set()  # the ids of the layers at head_bits
    if cfg.head_bits is not None:
        heads = _output_layers(roots) | ({id(head)} if head is not None else set())
    if cfg.head_bits is not None and not heads:
        raise ValueError(
            "quant.head_bits is set but the model has neither a classification head nor "
            "detector prediction layers in the quantized scope; set quant.head_bits=None"
        )
    named_roots = list(zip(roots, scope or [""]))
    units = []  # built first: an unsupported chain fails before the model is changed
    for i, (_, name, block, ad) in enumerate(blocks):
        enter = _stage_link(blocks[i - 1], blocks[i], scope) if i else None
        units.append(ReconUnit(f"{name}.attn", "attn", block, ad.attn_unit, enter))
        units.append(ReconUnit(f"{name}.mlp", "mlp", block, ad.mlp_unit))
    folded = [
        ".".join(p for p in (root_name, name) if p)
        for root, root_name in named_roots
        for pa in available_parts()
        if pa.fold_norms is not None
        for name in pa.fold_norms(root)
    ]
    post_ln, first_convs = _swap_attention_and_find_inputs(roots, cfg)
    per_channel = {id(lin) for _, lin in post_ln} if cfg.post_ln != "per_tensor" else set()
    special = _SpecialLayers(
        heads, per_channel, first_convs, _quantized_deconvs(roots), *_block_linears(blocks, cfg)
    )
    replaced, quantized = {}, []
    for root, root_name in named_roots:
        for name, parent in list(root.named_modules()):
            for attr, child in list(parent.named_children()):
                new = _quantized_layer(child, cfg, special)
                if new is not None:
                    setattr(parent, attr, new)
                    replaced[id(child)] = new
                    quantized.append(".".join(p for p in (root_name, name, attr) if p))
    layers, parts = _outside_layers_and_parts(named_roots, blocks, replaced)
    pairs = [(norm, replaced[id(lin)]) for norm, lin in post_ln] if cfg.post_ln == "reparam" else []
    return QuantPlan(
        cfg, units, pairs, quantized, _fp_parts(model, scope), layers, parts, _pinned(roots), folded
    )


def _swap_attention_and_find_inputs(
    roots: list[nn.Module], cfg: QuantConfig
) -> tuple[list[tuple[nn.Module, nn.Linear]], set[int]]:
    """Swap every supported attention for its quantized form; return the (LayerNorm, linear)
    pairs whose linear takes the LayerNorm's output, and the ids of the patch-embedding convs."""
    post_ln: list[tuple[nn.Module, nn.Linear]] = []
    first_convs: set[int] = set()
    adapters = available_adapters()
    for root in roots:
        for m in root.modules():
            for ad in adapters:
                if isinstance(m, ad.block_classes):
                    post_ln += ad.post_ln(m)
                for cls, (norm, linear) in ad.patch_merging.items():
                    if isinstance(m, cls):
                        post_ln.append((getattr(m, norm), getattr(m, linear)))
                for cls, conv in ad.patch_embed.items():
                    if isinstance(m, cls):
                        first_convs.add(id(getattr(m, conv)))
                for cls, qcls in ad.attention_swaps.items():
                    if type(m) is cls:
                        swap_attention(m, qcls, cfg)
    return post_ln, first_convs


def _output_layers(roots: list[nn.Module]) -> set[int]:
    """The ids of the prediction layers of the parts that declare theirs (a detector's logits),
    those that are linears or convolutions (the layers ``head_bits`` can apply to)."""
    named = [(cls, names) for pa in available_parts() for cls, names in pa.output_layers.items()]
    return {
        id(layer)
        for root in roots
        for m in root.modules()
        for cls, names in named
        if isinstance(m, cls)
        for name in names
        if isinstance(layer := getattr(m, name, None), (nn.Linear, nn.Conv2d))
    }


def _block_linears(blocks: list, cfg: QuantConfig) -> tuple[set[int], dict[int, int]]:
    """The ids of the blocks' post-GELU linears that ``cfg.post_gelu`` gives a quantizer other
    than the uniform one, and ``{id: input bits}`` of those ``cfg.linear_a_bits`` names."""
    post_gelu = (
        {id(lin) for _, _, b, ad in blocks for lin in ad.post_gelu(b)}
        if cfg.post_gelu != "uniform"
        else set()
    )
    bits_of = cfg.linear_a_bits or {}
    linear_a_bits = {
        id(lin): bits_of[kind]
        for _, _, b, ad in blocks
        for kind, lin in ad.linears(b).items()
        if bits_of.get(kind) is not None
    }
    return post_gelu, linear_a_bits


def _quantized_deconvs(roots: list[nn.Module]) -> set[int]:
    """The ids of the transposed convolutions inside the parts that quantize theirs."""
    classes = tuple(c for pa in available_parts() for c in pa.deconv_parts)
    return {
        id(m)
        for root in roots
        for part in root.modules()
        if classes and isinstance(part, classes)
        for m in part.modules()
        if isinstance(m, nn.ConvTranspose2d)
    }


@dataclass
class _SpecialLayers:
    """The ids of the layers quantized other than at ``w_bits``/``a_bits`` per tensor: the
    prediction layers at ``head_bits`` (empty without it), the linears with per-channel inputs,
    the patch-embedding convs, the quantized transposed convs, the post-GELU linears of a
    ``post_gelu`` other than ``uniform``, the blocks' linears with input bits of their own
    (``linear_a_bits``) and those bits."""

    heads: set[int]
    per_channel: set[int]
    first_convs: set[int]
    deconvs: set[int]
    post_gelu: set[int]
    linear_a_bits: dict[int, int]


def _quantized_layer(
    child: nn.Module, cfg: QuantConfig, special: _SpecialLayers
) -> nn.Module | None:
    """The quantized replacement of a linear, conv or listed transposed conv (``None``: none of
    them, or already quantized): a head at ``head_bits``, a patch-embedding conv's input at
    ``first_layer_a_bits``, a block's linear's input at its ``linear_a_bits``, a post-GELU
    linear's input by ``post_gelu``."""
    w, a = cfg.w_bits, cfg.a_bits
    if id(child) in special.heads:
        w = a = cfg.head_bits
    if isinstance(child, nn.Linear) and not isinstance(child, QuantLinear):
        a = special.linear_a_bits.get(id(child), a)
        if id(child) in special.post_gelu:
            return PostGeluLinear(child, cfg, w, a)
        per_channel = id(child) in special.per_channel
        return QuantLinear(child, w, a, per_channel, cfg.act_range, cfg.weight_range)
    if isinstance(child, nn.Conv2d) and not isinstance(child, QuantConv2d):
        if id(child) in special.first_convs:
            a = cfg.first_layer_a_bits
        return QuantConv2d(child, w, a, cfg.act_range, cfg.weight_range)
    if id(child) in special.deconvs and not isinstance(child, QuantConvTranspose2d):
        return QuantConvTranspose2d(child, w, a, cfg.act_range, cfg.weight_range)
    return None


def _outside_layers_and_parts(named_roots: list, blocks: list, replaced: dict) -> tuple[list, list]:
    """The quantized layers outside the blocks as ``(name, layer, index of the next block or
    None)`` and the parts holding quantized layers as ``(name, part, per RoI)``, in module order
    (forward order for the supported families)."""
    new_ids = {id(m) for m in replaced.values()}
    in_blocks = {id(m) for _, _, b, _ in blocks for m in b.modules()}
    block_index = {id(b): i for i, (_, _, b, _) in enumerate(blocks)}
    part_classes = tuple(c for pa in available_parts() for c in pa.parts)
    roi_classes = tuple(c for pa in available_parts() for c in pa.roi_parts)
    layers, parts = [], []
    next_block: int | None = 0
    for root, root_name in named_roots:
        for name, m in root.named_modules():
            full = ".".join(p for p in (root_name, name) if p)
            if id(m) in block_index:
                i = block_index[id(m)] + 1
                next_block = i if i < len(blocks) else None
            if id(m) in new_ids and id(m) not in in_blocks:
                layers.append((full, m, next_block))
            is_part = bool(part_classes) and isinstance(m, part_classes)
            if is_part and any(id(c) in new_ids for c in m.modules()):
                parts.append((full, m, isinstance(m, roi_classes)))
    return layers, parts


def _pinned(roots: list[nn.Module]) -> list[tuple[nn.Module, int]]:
    """The modules whose argument ``index`` the parts adapters pin (a detector's RoIs)."""
    return [
        (m, index)
        for root in roots
        for m in root.modules()
        for pa in available_parts()
        for cls, index in pa.pinned.items()
        if isinstance(m, cls)
    ]


def _fp_parts(model: nn.Module, scope: list[str] | None) -> list[str]:
    """What stays in floating point, for the quantization summary."""
    present = {type(m).__name__ for m in model.modules()}
    fp_parts = [n for n in _FP_CLASS_NAMES if n in present]
    fp_parts += ["attention softmax", "residual additions"]
    if scope is not None:
        fp_parts.append(f"everything outside the scope {scope}")
    return fp_parts


def _stage_link(last: tuple, this: tuple, scope: list[str] | None):
    """The link into block ``this`` from block ``last``, each ``(root, name, block, adapter)``:
    ``None`` within a stage, the adapter's stage link between two stages of one root."""
    (last_root, last_name, _, _), (root, name, _, ad) = last, this
    if root is last_root and last_name.rpartition(".")[0] == name.rpartition(".")[0]:
        return None
    if ad.stage_link is None or root is not last_root:
        raise UnsupportedModelError(
            f"blocks {last_name!r} and {name!r} are in different containers"
            f"{'' if scope is None else f' of the scope {scope}'} and the {ad.name} adapter "
            "does not know what connects them: reconstruction needs one chain of blocks"
        )
    return ad.stage_link(root, last_name, name)


def prepare_calibrated(
    model: nn.Module,
    cfg: QuantConfig,
    forward_loop: Callable[[nn.Module], None],
    scope: list[str] | None = None,
    head: nn.Module | None = None,
    downstream: DownstreamOutputs | None = None,
) -> QuantPlan:
    """Prepare, calibrate on ``forward_loop(model)`` (``downstream``: the outputs that decide
    close post-softmax choices, :func:`~pfcr_mm.quant.calibrate.calibrate_activations`),
    re-parameterize, and switch to quantized."""
    plan = prepare(model, cfg, scope, head)
    calibrate_activations(model, forward_loop, downstream)
    for norm, linear in plan.post_ln_pairs:
        reparameterize_post_ln(norm, linear)
    set_quant_state(model, weights=True, activations=True)
    return plan
