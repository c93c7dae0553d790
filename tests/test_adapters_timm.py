"""timm ViT/DeiT and Swin: conversion, equivalence in FP, counted quantizer hits, re-param."""

import copy

import pytest
import torch
from torch import nn

from pfcr_mm.adapters import UnsupportedModelError, prepare, prepare_calibrated
from pfcr_mm.quant.calibrate import calibrate_activations
from pfcr_mm.quant.modules import QuantLinear
from pfcr_mm.settings import QuantConfig

INPUT_SHAPES = {"vit": (4, 3, 32, 32), "swin": (2, 3, 56, 56)}


@pytest.fixture
def models(tiny_timm_vit, tiny_timm_swin):
    """Per model name: its tiny factory and the shape of its input."""
    factories = {"vit": tiny_timm_vit, "swin": tiny_timm_swin}
    return {name: (factories[name], shape) for name, shape in INPUT_SHAPES.items()}


def _attention_modules(model):
    return [m for m in model.modules() if hasattr(m, "qkv") and hasattr(m, "proj")]


@pytest.mark.parametrize("name", INPUT_SHAPES)
def test_quantized_attention_equals_original_when_disabled(name, models):
    build, shape = models[name]
    model = build()
    x = torch.randn(shape)
    ref = copy.deepcopy(model)
    prepare(model, QuantConfig())
    orig_attn, quant_attn = _attention_modules(ref), _attention_modules(model)
    assert len(orig_attn) == len(quant_attn) == 4
    inputs = []
    hooks = [m.register_forward_pre_hook(lambda m, a, kw=None: inputs.append(a)) for m in orig_attn]
    with torch.no_grad():
        ref_out = ref(x)
        for h in hooks:
            h.remove()
        assert len(inputs) == 4  # one call per attention
        for a, q, args in zip(orig_attn, quant_attn, inputs):
            assert type(q) is not type(a) and isinstance(q, type(a))
            assert torch.allclose(q(*args), a(*args), atol=1e-5)
        assert torch.allclose(model(x), ref_out, atol=1e-5)


@pytest.mark.parametrize("name", INPUT_SHAPES)
def test_every_linear_and_both_matmuls_quantized(name, models, assert_every_point_hit_once):
    build, shape = models[name]
    model = build()
    n_linear = sum(isinstance(m, nn.Linear) for m in model.modules())
    n_conv = sum(isinstance(m, nn.Conv2d) for m in model.modules())
    x = torch.randn(shape)
    plan = prepare_calibrated(model, QuantConfig(), lambda m: m(x))
    assert sum(isinstance(m, QuantLinear) for m in model.modules()) == n_linear
    assert len(plan.quantized_modules) == n_linear + n_conv
    assert len(plan.units) == 2 * 4  # attn + mlp per block, 4 blocks
    assert [u.kind for u in plan.units] == ["attn", "mlp"] * 4
    assert assert_every_point_hit_once(model, lambda: model(x)) == 4 * 4


@pytest.mark.parametrize("name", INPUT_SHAPES)
def test_units_compose_to_the_model(name, models):
    build, shape = models[name]
    model = build()
    x = torch.randn(shape)
    plan = prepare(model, QuantConfig())
    with torch.no_grad():
        tokens = []
        blocks = {id(u.block): u.block for u in plan.units}
        hooks = [
            b.register_forward_hook(lambda m, a, o: tokens.append((a[0], o)))
            for b in blocks.values()
        ]
        model(x)
        for h in hooks:
            h.remove()
        assert len(tokens) == len(plan.units) // 2 == 4  # one call per block
        for (inp, out), (attn, mlp) in zip(tokens, zip(plan.units[::2], plan.units[1::2])):
            assert torch.allclose(mlp(attn(inp)), out, atol=1e-6)


@pytest.mark.parametrize("name", INPUT_SHAPES)
def test_reparameterization_keeps_fp_output(name, models, fp_outputs_around_reparam):
    build, shape = models[name]
    model = build()
    x = torch.randn(shape)
    plan, before, after = fp_outputs_around_reparam(model, x)
    assert len(plan.post_ln_pairs) == 8 + (1 if name == "swin" else 0)
    assert all(not lin.input_quantizer.per_channel for _, lin in plan.post_ln_pairs)
    assert torch.allclose(before, after, atol=1e-4, rtol=1e-4)


def test_quantized_model_close_at_8_bits_and_further_at_3(tiny_timm_vit):
    model = tiny_timm_vit()
    x = torch.randn(8, 3, 32, 32)
    with torch.no_grad():
        ref = model(x)
    errs = {}
    for bits in (8, 3):
        m = copy.deepcopy(model)
        prepare_calibrated(m, QuantConfig(w_bits=bits, a_bits=bits), lambda m: m(x))
        with torch.no_grad():
            errs[bits] = (m(x) - ref).pow(2).mean().item() / ref.pow(2).mean().item()
    assert errs[8] < 1e-2
    assert errs[3] > 10 * errs[8]


def test_no_supported_block_is_a_clear_error():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU())
    import timm  # noqa: F401  (the adapters apply once timm is loaded)

    with pytest.raises(UnsupportedModelError, match="timm.models.vision_transformer.Block"):
        prepare(model, QuantConfig())


def test_unobserved_quantizer_is_named(tiny_timm_vit):
    model = tiny_timm_vit()
    prepare(model, QuantConfig())
    with pytest.raises(RuntimeError, match=r"blocks\.0\.attn\.qkv\.input_quantizer"):
        calibrate_activations(model, lambda m: None)


def test_weight_range_reaches_every_weight_quantizer(tiny_timm_vit):
    from pfcr_mm.quant.modules import QuantConv2d

    errors = {}
    for method in ("mse", "minmax"):
        model = tiny_timm_vit()
        prepare(model, QuantConfig(w_bits=3, a_bits=8, weight_range=method))
        layers = [m for m in model.modules() if isinstance(m, (QuantLinear, QuantConv2d))]
        assert len(layers) == 4 * 4 + 2  # qkv, proj, fc1, fc2 per block; patch embed; head
        assert {m.weight_quantizer.range_method for m in layers} == {method}
        w = model.blocks[0].mlp.fc1.weight.detach()
        q = model.blocks[0].mlp.fc1.weight_quantizer
        q.set_state("quant")
        with torch.no_grad():
            w_hat = q(w)
        half_step = q.scale.detach().reshape(-1, 1) / 2
        clipped = ((w_hat - w).abs() > half_step + 1e-7).sum()
        if method == "minmax":  # the grid covers every weight: only rounding, no clipping
            assert clipped == 0
        else:  # the MSE search clips the outliers of some channels
            assert clipped > 0
        errors[method] = float((w_hat - w).pow(2).sum())
    # the MSE search clips outliers to lower the error at 3 bits
    assert errors["mse"] < errors["minmax"]
