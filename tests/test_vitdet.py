"""ViTDet (pfcr_mm.models.vitdet, pfcr_mm.adapters.vitdet): MMDetection's parameter names, FP
equivalence of the quantized attention, every quantizer point of the windowed and the global
blocks hit once, units that compose to the block, the re-parameterization exact with padding to
whole windows, the simple FPN's transposed convolutions quantized as one part."""

import copy

import pytest
import torch
from torch import nn

from pfcr_mm.adapters import prepare, prepare_calibrated
from pfcr_mm.adapters.vitdet import QuantViTDetAttention
from pfcr_mm.models.vitdet import LN2d, SimpleFPN, ViTDet
from pfcr_mm.quant.modules import QuantConv2d, QuantConvTranspose2d, QuantLinear
from pfcr_mm.settings import QuantConfig

DIM, HEADS, WINDOW = 32, 2, 3
# 56x72 pixels -> a 7x9 token map: windows of 3 pad it to 9x9; the global block (index 1) sees
# 7x9 where its relative position tables were made for 8x8 (interpolated)
INPUT = (2, 3, 56, 72)

# the tiny ViTDet's arguments: blocks 0 and 2 windowed, block 1 global
TINY_ARGS = dict(
    img_size=64,
    patch_size=8,
    embed_dim=DIM,
    depth=3,
    num_heads=HEADS,
    window_size=WINDOW,
    window_block_indexes=(0, 2),
    pretrain_img_size=48,
)


def tiny_vitdet() -> ViTDet:
    """Blocks 0 and 2 windowed, block 1 global; random relative positions and LayerNorms."""
    model = ViTDet(**TINY_ARGS).eval()
    for name, p in model.named_parameters():
        if "rel_pos" in name or "norm" in name:
            nn.init.uniform_(p, -1.0 if name.endswith(("bias", "rel_pos_h", "rel_pos_w")) else 0.5)
    return model


def mmdet_vitdet_names(depth: int) -> dict[str, tuple[int, ...]]:
    """MMDetection projects/ViTDet's backbone parameter names and shapes for ``tiny_vitdet``'s
    sizes, written out (facts of its ``ViT``: ``patch_embed.proj``, ``pos_embed`` with the class
    token's row, ``blocks.N`` with ``norm1``, ``attn.{qkv, proj, rel_pos_h, rel_pos_w}``,
    ``norm2``, ``mlp.{fc1, fc2}``)."""
    head, windows = DIM // HEADS, {0: WINDOW, 2: WINDOW}
    names = {
        "patch_embed.proj.weight": (DIM, 3, 8, 8),
        "patch_embed.proj.bias": (DIM,),
        "pos_embed": (1, 6 * 6 + 1, DIM),
    }
    for i in range(depth):
        rel = 2 * windows.get(i, 64 // 8) - 1
        block = {
            "norm1.weight": (DIM,),
            "norm1.bias": (DIM,),
            "attn.qkv.weight": (3 * DIM, DIM),
            "attn.qkv.bias": (3 * DIM,),
            "attn.proj.weight": (DIM, DIM),
            "attn.proj.bias": (DIM,),
            "attn.rel_pos_h": (rel, head),
            "attn.rel_pos_w": (rel, head),
            "norm2.weight": (DIM,),
            "norm2.bias": (DIM,),
            "mlp.fc1.weight": (4 * DIM, DIM),
            "mlp.fc1.bias": (4 * DIM,),
            "mlp.fc2.weight": (DIM, 4 * DIM),
            "mlp.fc2.bias": (DIM,),
        }
        names.update({f"blocks.{i}.{k}": v for k, v in block.items()})
    return names


def mmdet_simple_fpn_names(c: int, out: int) -> dict[str, tuple[int, ...]]:
    """MMDetection's ``SimpleFPN`` with ``norm_cfg=dict(type='LN2d')``: ``fpn1`` (deconv, LN2d,
    GELU, deconv), ``fpn2`` (deconv), mmcv ``ConvModule`` laterals and outputs whose LN2d is
    named ``norm_layer`` (mmcv's abbreviation of a norm class it does not know) and whose
    convolutions have no bias (they have a norm)."""
    names = {
        "fpn1.0.weight": (c, c // 2, 2, 2),
        "fpn1.0.bias": (c // 2,),
        "fpn1.1.weight": (c // 2,),
        "fpn1.1.bias": (c // 2,),
        "fpn1.3.weight": (c // 2, c // 4, 2, 2),
        "fpn1.3.bias": (c // 4,),
        "fpn2.0.weight": (c, c // 2, 2, 2),
        "fpn2.0.bias": (c // 2,),
    }
    for i, cin in enumerate([c // 4, c // 2, c, c]):
        for conv, k, n_in in (("lateral_convs", 1, cin), ("fpn_convs", 3, out)):
            names[f"{conv}.{i}.conv.weight"] = (out, n_in, k, k)
            names[f"{conv}.{i}.norm_layer.weight"] = (out,)
            names[f"{conv}.{i}.norm_layer.bias"] = (out,)
    return names


def test_state_dicts_round_trip_through_mmdet_names():
    model, neck = tiny_vitdet(), SimpleFPN(DIM, [DIM // 4, DIM // 2, DIM, DIM], 16, 5)
    for module, names in ((model, mmdet_vitdet_names(3)), (neck, mmdet_simple_fpn_names(DIM, 16))):
        state = module.state_dict()
        assert {k: tuple(v.shape) for k, v in state.items()} == names
        # a checkpoint keyed by those names loads strictly into a fresh model of other weights
        fresh = type(module)(**_init_args(module))
        fresh.load_state_dict({k: state[k].clone() for k in names}, strict=True)
        assert all(torch.equal(fresh.state_dict()[k], state[k]) for k in names)
    x = torch.randn(INPUT)
    with torch.no_grad():
        levels = neck(model(x))
    assert [tuple(f.shape[-2:]) for f in levels] == [(28, 36), (14, 18), (7, 9), (3, 4), (2, 2)]


def _init_args(module: nn.Module) -> dict:
    if isinstance(module, SimpleFPN):
        return dict(backbone_channel=DIM, in_channels=[8, 16, 32, 32], out_channels=16, num_outs=5)
    return dict(TINY_ARGS)


def test_ln2d_is_a_layer_norm_over_channels():
    norm = LN2d(6, eps=1e-5)
    nn.init.uniform_(norm.weight, 0.5, 2.0)
    nn.init.uniform_(norm.bias, -1.0, 1.0)
    x = torch.randn(2, 6, 4, 5)
    mean, var = x.mean(1, keepdim=True), x.var(1, unbiased=False, keepdim=True)
    ref = (x - mean) / torch.sqrt(var + 1e-5) * norm.weight.view(-1, 1, 1) + norm.bias.view(
        -1, 1, 1
    )
    assert torch.allclose(norm(x), ref, atol=1e-5)
    assert norm(x).is_contiguous()  # mmcv's RoIAlign reads the memory as NCHW


def test_quantized_attention_equals_original_when_disabled():
    model = tiny_vitdet()
    ref = copy.deepcopy(model)
    prepare(model, QuantConfig())
    assert all(type(b.attn) is QuantViTDetAttention for b in model.blocks)
    x = torch.randn(INPUT)
    with torch.no_grad():
        assert torch.allclose(model(x), ref(x), atol=1e-5)


def test_every_point_of_windowed_and_global_blocks_hit_once(assert_every_point_hit_once):
    model = tiny_vitdet()
    x = torch.randn(INPUT)
    plan = prepare_calibrated(model, QuantConfig(), lambda m: m(x))
    assert sum(isinstance(m, QuantLinear) for m in model.modules()) == 4 * 3
    assert isinstance(model.patch_embed.proj, QuantConv2d)
    assert model.patch_embed.proj.input_quantizer.bits == 8  # the image, at 8 bits
    assert [b.window_size for b in model.blocks] == [WINDOW, 0, WINDOW]
    assert [u.name for u in plan.units] == [
        f"blocks.{i}.{k}" for i in range(3) for k in ("attn", "mlp")
    ]
    assert len(plan.post_ln_pairs) == 2 * 3
    assert assert_every_point_hit_once(model, lambda: model(x)) == 4 * 3


def test_units_compose_to_the_block():
    model = tiny_vitdet()
    plan = prepare(model, QuantConfig())
    calls = []
    hooks = [b.register_forward_hook(lambda m, a, o: calls.append((a[0], o))) for b in model.blocks]
    with torch.no_grad():
        model(torch.randn(INPUT))
        for h in hooks:
            h.remove()
        assert len(calls) == 3
        for (x, out), attn, mlp in zip(calls, plan.units[::2], plan.units[1::2]):
            assert torch.allclose(mlp(attn(x)), out, atol=1e-6)


def test_reparameterization_exact_with_padding_to_whole_windows(fp_outputs_around_reparam):
    model = tiny_vitdet()
    plan, before, after = fp_outputs_around_reparam(model, torch.randn(INPUT))
    shifts = [lin.input_shift.abs().max().item() for _, lin in plan.post_ln_pairs]
    assert max(shifts) > 0.1  # the shift is real, so exactness is not trivial
    assert torch.allclose(after, before, atol=1e-4, rtol=1e-4)


def test_output_error_falls_with_bits():
    model = tiny_vitdet()
    x = torch.randn(INPUT)
    with torch.no_grad():
        ref = model(x)
    errs = {}
    for bits in (8, 4):
        m = copy.deepcopy(model)
        prepare_calibrated(m, QuantConfig(w_bits=bits, a_bits=bits), lambda m: m(x))
        with torch.no_grad():
            errs[bits] = ((m(x) - ref).pow(2).mean() / ref.pow(2).mean()).item()
    # the tokens' residual stream dominates the map: W4A4 is still well under 1 %
    assert errs[8] < 2e-4 and errs[4] > 20 * errs[8]


@pytest.mark.parametrize("bits", [8, 4])
def test_simple_fpn_deconvolutions_quantized_as_one_part(bits):
    backbone, neck = tiny_vitdet(), SimpleFPN(DIM, [8, 16, 32, 32], 16, 5)
    model = nn.Sequential(backbone, neck).eval()
    x = torch.randn(INPUT)
    with torch.no_grad():
        ref = model(x)
    plan = prepare_calibrated(model, QuantConfig(w_bits=bits, a_bits=bits), lambda m: m(x))
    deconvs = [m for m in neck.modules() if isinstance(m, nn.ConvTranspose2d)]
    assert len(deconvs) == 3 and all(isinstance(m, QuantConvTranspose2d) for m in deconvs)
    assert deconvs[0].weight_quantizer.scale.shape == (DIM // 2,)  # per output channel
    assert [(name, per_roi) for name, _, per_roi in plan.parts] == [("1", False)]
    assert "LN2d" in plan.fp_parts and "ConvTranspose2d" not in plan.fp_parts
    with torch.no_grad():
        out = model(x)
    err = max(((o - r).pow(2).mean() / r.pow(2).mean()).item() for o, r in zip(out, ref))
    assert err < 0.01 if bits == 8 else err > 0.01


def test_parity_tool_refuses_a_folder_without_mmdetection_projects(parity_tool, tmp_path, capsys):
    assert parity_tool.main([str(tmp_path), "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "is not an MMDetection 3.x source checkout" in err[0]
    assert not (tmp_path / "out").exists()
    with pytest.raises(SystemExit) as exit_:
        parity_tool.main([str(tmp_path), "--sizes", "16x640"])
    assert exit_.value.code == 2


def test_parity_tool_pairs_detections_that_come_in_another_order(parity_tool):
    """Two detections of near-equal scores swapped: both matched, the differences are the
    boxes' and scores' own; a class that differs is not matched."""
    from mmengine.structures import InstanceData

    from pfcr_mm.benchmark_tables import vitdet_parity_table

    def dets(boxes, scores, labels):
        masks = torch.zeros(len(boxes), 4, 4, dtype=torch.bool)
        masks[0, 0, 0] = True
        return InstanceData(
            bboxes=torch.tensor(boxes),
            scores=torch.tensor(scores),
            labels=torch.tensor(labels),
            masks=masks,
        )

    theirs = dets([[0.0, 0.0, 10.0, 10.0], [5.0, 5.0, 20.0, 20.0]], [0.5, 0.49999], [1, 2])
    ours = dets([[5.0, 5.0, 20.001, 20.0], [0.0, 0.0, 10.0, 10.0]], [0.49998, 0.5], [2, 1])
    ours.masks[:] = False
    ours.masks[1, 0, 0] = True
    row = parity_tool._matched(theirs, ours)
    assert row["matched_within_0.01px"] == 2
    assert row["boxes_max_abs_diff_px"] == pytest.approx(0.001, abs=1e-5)
    assert row["scores_max_abs_diff"] == pytest.approx(1e-5, abs=1e-7)
    assert row["mask_pixels_differing"] == 0.0
    ours.labels[0] = 3
    assert parity_tool._matched(theirs, ours)["matched_within_0.01px"] == 1
    table = vitdet_parity_table(
        {
            "parity": [
                {
                    "size": [64, 96],
                    "backbone_rel_diff": 5e-7,
                    "neck_rel_diff": [1e-6, 2e-6],
                    "detections": [2, 2],
                    **row,
                }
            ],
            "config": "c.py",
            "peer_config": "p.py",
            "mmdet_root_commit": None,
            "checkpoint_keys": 3,
            "checkpoint_parameters": 2e6,
            "seed": 0,
            "threads": 1,
        }
    )
    assert "| 64x96 | 5.0e-07 | 2.0e-06 | 2 / 2 | 2 / 2 | 0.0010 |" in table
