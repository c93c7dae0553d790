"""mmdet 3.x Swin: conversion, FP equivalence, counted quantizer hits, re-parameterization with
inputs whose token maps need padding to window multiples."""

import copy

import pytest
import torch
from mmdet.models.backbones.swin import WindowMSA
from torch import nn

from pfcr_mm.adapters import prepare, prepare_calibrated
from pfcr_mm.quant.modules import QuantLinear
from pfcr_mm.settings import QuantConfig

# 60x76 pixels -> 15x19 tokens at stage 1 and 8x10 at stage 2: neither is a multiple of 7
PADDED_INPUT = (2, 3, 60, 76)


def test_quantized_window_msa_equals_original_when_disabled(tiny_mmdet_swin):
    model = tiny_mmdet_swin()
    ref = copy.deepcopy(model)
    prepare(model, QuantConfig())
    orig = [m for m in ref.modules() if isinstance(m, WindowMSA)]
    quant = [m for m in model.modules() if isinstance(m, WindowMSA)]
    assert len(orig) == len(quant) == 4
    inputs = []
    hooks = [m.register_forward_pre_hook(lambda m, a: inputs.append(a)) for m in orig]
    x = torch.randn(PADDED_INPUT)
    with torch.no_grad():
        ref_outs = ref(x)
        for h in hooks:
            h.remove()
        assert len(inputs) == 4  # one call per window attention
        for a, q, args in zip(orig, quant, inputs):
            assert type(q) is not WindowMSA
            assert torch.allclose(q(*args), a(*args), atol=1e-5)
        for o, r in zip(model(x), ref_outs):
            assert torch.allclose(o, r, atol=1e-5)


def test_every_linear_and_both_matmuls_quantized(tiny_mmdet_swin, assert_every_point_hit_once):
    model = tiny_mmdet_swin()
    n_linear = sum(isinstance(m, nn.Linear) for m in model.modules())
    x = torch.randn(PADDED_INPUT)
    plan = prepare_calibrated(model, QuantConfig(), lambda m: m(x))
    assert sum(isinstance(m, QuantLinear) for m in model.modules()) == n_linear == 4 * 4 + 1
    assert [u.name for u in plan.units][:2] == ["stages.0.blocks.0.attn", "stages.0.blocks.0.mlp"]
    assert assert_every_point_hit_once(model, lambda: model(x)) == 4 * 4


def test_units_compose_to_the_block(tiny_mmdet_swin):
    model = tiny_mmdet_swin()
    plan = prepare(model, QuantConfig())
    calls = []
    blocks = {id(u.block): u.block for u in plan.units}
    hooks = [b.register_forward_hook(lambda m, a, o: calls.append((a, o))) for b in blocks.values()]
    with torch.no_grad():
        model(torch.randn(PADDED_INPUT))
        for h in hooks:
            h.remove()
        assert len(calls) == len(plan.units) // 2 == 4  # one call per block
        for ((x, hw), out), attn, mlp in zip(calls, plan.units[::2], plan.units[1::2]):
            assert torch.allclose(mlp(attn(x, hw), hw), out, atol=1e-6)


def test_reparameterization_exact_with_padding(tiny_mmdet_swin, fp_outputs_around_reparam):
    model = tiny_mmdet_swin()
    # give the LayerNorms non-trivial affine parameters, as trained models have
    for m in model.modules():
        if isinstance(m, nn.LayerNorm):
            m.weight.data.uniform_(0.5, 2.0)
            m.bias.data.uniform_(-1.0, 1.0)
    x = torch.randn(PADDED_INPUT)
    plan, before, after = fp_outputs_around_reparam(model, x)
    assert len(plan.post_ln_pairs) == 4 * 2 + 1
    shifts = [lin.input_shift.abs().max().item() for _, lin in plan.post_ln_pairs]
    assert max(shifts) > 0.1  # the shift is real, so exactness is not trivial
    for a, b in zip(after, before):
        assert torch.allclose(a, b, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("post_softmax", ["log2", "uniform"])
def test_quantized_swin_output_error_falls_with_bits(post_softmax, tiny_mmdet_swin):
    model = tiny_mmdet_swin()
    x = torch.randn(PADDED_INPUT)
    with torch.no_grad():
        ref = model(x)[-1]
    errs = {}
    for bits in (8, 4):
        m = copy.deepcopy(model)
        prepare_calibrated(
            m, QuantConfig(w_bits=bits, a_bits=bits, post_softmax=post_softmax), lambda m: m(x)
        )
        with torch.no_grad():
            errs[bits] = ((m(x)[-1] - ref).pow(2).mean() / ref.pow(2).mean()).item()
    assert errs[8] < 0.02 < errs[4]
