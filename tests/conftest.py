"""Tiny models shared by the tests (CPU, seconds)."""

import importlib.util
from pathlib import Path

import pytest
import timm
import torch


def tiny_timm_vit(**kw):
    return timm.create_model(
        "vit_tiny_patch16_224",
        pretrained=False,
        img_size=32,
        patch_size=8,
        embed_dim=48,
        depth=4,
        num_heads=3,
        num_classes=5,
        **kw,
    ).eval()


def tiny_timm_swin():
    return timm.create_model(
        "swin_tiny_patch4_window7_224",
        pretrained=False,
        img_size=56,
        embed_dim=24,
        depths=(2, 2),
        num_heads=(2, 4),
        window_size=7,
        num_classes=5,
    ).eval()


def tiny_mmdet_swin():
    from mmdet.models.backbones.swin import SwinTransformer

    model = SwinTransformer(
        embed_dims=24,
        depths=(2, 2),
        num_heads=(2, 4),
        window_size=7,
        out_indices=(0, 1),
        strides=(4, 2),
        drop_path_rate=0.0,
    )
    model.eval()  # mmdet's SwinTransformer.train() returns None: no chaining
    return model


@pytest.fixture(autouse=True)
def _seed_and_one_thread():
    # Tiny tensors: one thread is faster, and immune to other processes on the cores.
    torch.manual_seed(0)
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def assert_every_point_hit_once(model, run) -> int:
    """Run ``run()`` and assert that every attention quantizer point (q, k, v, probs) and the
    input and weight quantizer of every QuantLinear ran exactly once; returns the number of
    attention points."""
    from pfcr_mm.quant.attention import AttentionQuantizers
    from pfcr_mm.quant.calibrate import named_quantizers
    from pfcr_mm.quant.modules import QuantLinear

    hits = {}
    handles = [
        q.register_forward_hook(lambda m, a, o, n=n: hits.__setitem__(n, hits.get(n, 0) + 1))
        for n, q in named_quantizers(model)
    ]
    with torch.no_grad():
        run()
    for h in handles:
        h.remove()
    points = 0
    for name, m in model.named_modules():
        if isinstance(m, AttentionQuantizers):
            for point in ("q", "k", "v", "probs"):
                assert hits.get(f"{name}.{point}", 0) == 1, f"{name}.{point} not hit once"
                points += 1
        if isinstance(m, QuantLinear):
            assert hits[f"{name}.input_quantizer"] == hits[f"{name}.weight_quantizer"] == 1
    return points


def fp_outputs_around_reparam(model, x):
    """Prepare ``model`` at W4A4, calibrate on ``x``, and return the plan and the FP outputs
    (all quantizers off) before and after the post-LayerNorm re-parameterization."""
    from pfcr_mm.adapters import prepare
    from pfcr_mm.quant.calibrate import calibrate_activations, set_quant_state
    from pfcr_mm.quant.config import QuantConfig
    from pfcr_mm.quant.reparam import reparameterize_post_ln

    plan = prepare(model, QuantConfig(w_bits=4, a_bits=4))
    calibrate_activations(model, lambda m: m(x))
    set_quant_state(model, weights=False, activations=False)
    with torch.no_grad():
        before = model(x)
        for norm, linear in plan.post_ln_pairs:
            reparameterize_post_ln(norm, linear)
        after = model(x)
    return plan, before, after


def _load_tool(name: str):
    """``tools/<name>.py`` as a module, without putting ``tools/`` on ``sys.path``."""
    path = Path(__file__).resolve().parents[1] / "tools" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(f"pfcr_tools_{name}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="session")
def ptq_tool():
    """``tools/ptq.py`` (its ``main(argv)`` returns the exit code)."""
    return _load_tool("ptq")


@pytest.fixture(scope="session")
def convert_tool():
    """``tools/convert_swin_det_checkpoint.py``."""
    return _load_tool("convert_swin_det_checkpoint")
