"""The chain data source (pfcr_mm/recon/data.py): every unit's caches, propagated block to
block (through the Swin PatchMerging links), equal what full forwards of the model compute at
that unit."""

import pytest
import torch

from pfcr_mm.adapters import UnsupportedModelError, prepare, prepare_calibrated
from pfcr_mm.quant.calibrate import quantizer_states
from pfcr_mm.recon import (
    ChainDataSource,
    ComposedUnit,
    FineToCoarseSchedule,
    LayerUnit,
    leaves,
)
from pfcr_mm.recon.data import probe_vectors
from pfcr_mm.settings import QuantConfig


@pytest.fixture
def vit_and_batches(tiny_timm_vit):
    """Factory: a tiny timm ViT and two batches of three 32x32 images."""

    def build():
        return tiny_timm_vit(), [torch.randn(3, 3, 32, 32) for _ in range(2)]

    return build


@pytest.fixture
def timm_swin_and_batches(tiny_timm_swin):
    """Factory: a tiny timm Swin and two batches of two 56x56 images."""

    def build():
        return tiny_timm_swin(), [torch.randn(2, 3, 56, 56) for _ in range(2)]

    return build


@pytest.fixture
def mmdet_swin_and_batches(tiny_mmdet_swin):
    """Factory: a tiny mmdet Swin and two batches of different image sizes."""

    def build():
        # two image sizes (the first needs window padding, and PatchMerging pads it too)
        return tiny_mmdet_swin(), [torch.randn(2, 3, 60, 76), torch.randn(1, 3, 56, 56)]

    return build


@pytest.fixture
def make(request):
    """The factory fixture named by the (indirect) parameter."""
    return request.getfixturevalue(request.param)


def unit_inputs_by_forward(model, units, batches):
    """Per finest unit, per batch: its input computed by full forwards of the model in the
    model's current quantizer states (the MLP unit's input = the MHSA unit on the block's)."""
    blocks = {id(u.block): u.block for u in units}
    seen = {k: [] for k in blocks}
    hooks = [
        b.register_forward_pre_hook(lambda m, a, k=k: seen[k].append((a[0], a[1:])))
        for k, b in blocks.items()
    ]
    with torch.no_grad():
        for b in batches:
            model(b)
    for h in hooks:
        h.remove()
    out = {}
    with torch.no_grad():
        for u in units:
            ins = seen[id(u.block)]
            if u.kind == "mlp":
                attn = next(v for v in units if v.block is u.block and v.kind == "attn")
                ins = [(attn(x, *a), a) for x, a in ins]
            out[u.name] = ins
    return out


def test_data_source_matches_the_model(quantized_vit):
    model, plan, batches = quantized_vit()
    attn1, mlp1 = plan.units[2], plan.units[3]
    block1 = ComposedUnit("blocks.1", 1, [attn1, mlp1])
    fp, quant = [], []
    hook = model.blocks[1].register_forward_hook(lambda m, a, o: seen.append((a[0], o)))
    with torch.no_grad():
        seen = fp
        with quantizer_states(model, weights=False, activations=False):
            for b in batches:
                model(b)
        seen = quant
        for b in batches:
            model(b)
    hook.remove()
    source = ChainDataSource(model, plan.units, batches)
    x, y, args = source.fp_io(block1)
    assert args == [(), ()]
    for (fx, fy), xi, yi in zip(fp, x, y):
        assert torch.equal(xi, fx) and torch.allclose(yi, fy, atol=1e-6)
    for (qx, _), xi in zip(quant, source.quant_input(block1)):
        assert torch.equal(xi, qx)
    # an MLP unit starts after its block's MHSA: its inputs go through the MHSA unit first
    x_mlp, y_mlp, _ = source.fp_io(mlp1)
    with torch.no_grad(), quantizer_states(model, weights=False, activations=False):
        assert torch.allclose(x_mlp[0], attn1(fp[0][0]), atol=1e-6)
        assert torch.allclose(y_mlp[0], fp[0][1], atol=1e-6)
    half = ChainDataSource(model, plan.units, batches, cache_dtype="float16")
    h_x, h_y, _ = half.fp_io(block1)
    assert h_x[0].dtype == torch.float16 and h_x[0].device.type == "cpu"
    assert torch.allclose(h_y[0].float(), y[0], rtol=1e-3, atol=1e-3)


@pytest.mark.parametrize(
    "make",
    ["vit_and_batches", "timm_swin_and_batches", "mmdet_swin_and_batches"],
    ids=["vit", "timm_swin", "mmdet"],
    indirect=True,
)
def test_chain_source_gives_every_unit_the_inputs_of_a_full_forward(make):
    model, batches = make()
    plan = prepare_calibrated(
        model, QuantConfig(w_bits=4, a_bits=4), lambda m: [m(b) for b in batches]
    )
    with quantizer_states(model, weights=False, activations=False):
        fp_ref = unit_inputs_by_forward(model, plan.units, batches)
    q_ref = unit_inputs_by_forward(model, plan.units, batches)
    source = ChainDataSource(model, plan.units, batches)
    calls = []
    run = source.run_batch
    source.run_batch = lambda m, b: calls.append(1) or run(m, b)
    schedule = FineToCoarseSchedule(plan.units)
    checked = 0
    for _, units in schedule:
        for unit in units:
            first = leaves(unit)[0].name
            x, y, args = source.fp_io(unit)
            q = source.quant_input(unit)
            for i, (rx, ra) in enumerate(fp_ref[first]):
                assert args[i] == tuple(ra)
                torch.testing.assert_close(x[i], rx, rtol=1e-5, atol=1e-5)
                torch.testing.assert_close(q[i], q_ref[first][i][0], rtol=1e-5, atol=1e-5)
            with torch.no_grad(), quantizer_states(model, weights=False, activations=False):
                torch.testing.assert_close(y[0], unit(fp_ref[first][0][0], *args[0]))
            checked += 1
    assert checked == len(schedule)
    # the model itself ran only to the first block: twice per batch (FP, quantized) per level
    assert len(calls) == 2 * len(batches) * len(list(schedule))


def test_chain_source_moves_the_quantized_front_through_what_was_learned(mmdet_swin_and_batches):
    model, batches = mmdet_swin_and_batches()
    plan = prepare_calibrated(
        model, QuantConfig(w_bits=4, a_bits=4), lambda m: [m(b) for b in batches]
    )
    source = ChainDataSource(model, plan.units, batches)
    first_of_stage1 = next(u for u in plan.units if u.enter is not None)
    assert first_of_stage1.name == "stages.1.blocks.0.attn"
    k = plan.units.index(first_of_stage1)
    before = plan.units[k - 1]  # stages.0.blocks.1.mlp, the unit before the PatchMerging
    source.fp_io(before)
    fp_before = source.fp_io(first_of_stage1)[0]
    # "learn" the unit before: a step size changes after the front passed its start
    source.fp_io(before)  # restarts the fronts
    with torch.no_grad():
        before.block.ffn.layers[0][0].input_quantizer.scale.mul_(1.5)
    x, _, _ = source.fp_io(first_of_stage1)
    q = source.quant_input(first_of_stage1)
    q_ref = unit_inputs_by_forward(model, plan.units, batches)[first_of_stage1.name]
    for qi, (rx, _) in zip(q, q_ref):
        torch.testing.assert_close(qi, rx, rtol=1e-5, atol=1e-5)
    for xi, fi in zip(x, fp_before):  # the FP front does not see quantizer changes
        assert torch.equal(xi, fi)


def test_blocks_in_two_roots_are_not_one_chain(tiny_timm_vit):
    vit_a, vit_b = tiny_timm_vit(), tiny_timm_vit()
    model = torch.nn.Sequential()
    model.add_module("a", vit_a)
    model.add_module("b", vit_b)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(UnsupportedModelError, match="one chain of blocks"):
        prepare(model, QuantConfig(w_bits=4, a_bits=4), scope=["a", "b"])
    # nothing was swapped before the error
    assert model.state_dict().keys() == before.keys()
    assert not any("quantizer" in n for n, _ in model.named_modules())


def test_layer_units_off_the_chain(timm_swin_and_batches):
    model, batches = timm_swin_and_batches()
    plan = prepare_calibrated(
        model, QuantConfig(w_bits=4, a_bits=4), lambda m: [m(b) for b in batches]
    )
    layers = {name: (layer, next_block) for name, layer, next_block in plan.layers}
    assert list(layers) == ["patch_embed.proj", "layers.1.downsample.reduction", "head.fc"]
    # the block each layer precedes: the first, the first of stage 1 (after 2 blocks), none
    assert [next_block for _, next_block in layers.values()] == [0, 2, None]
    source = ChainDataSource(model, plan.units, batches)
    # the patch embedding sees the image; its output is compared channels last
    embed = LayerUnit("patch_embed.proj", layers["patch_embed.proj"][0])
    x, y, args = source.fp_io(embed)
    assert torch.equal(x[0], batches[0]) and args == [(), ()]
    assert y[0].shape == (2, 14, 14, 24)
    # the PatchMerging reduction: inputs as full forwards compute them, FP and quantized
    reduction = layers["layers.1.downsample.reduction"][0]
    seen = []
    hook = reduction.register_forward_pre_hook(lambda m, a: seen.append(a[0]))
    with torch.no_grad():
        with quantizer_states(model, weights=False, activations=False):
            model(batches[0])
        model(batches[0])
    hook.remove()
    unit = LayerUnit("layers.1.downsample.reduction", reduction)
    torch.testing.assert_close(source.fp_io(unit)[0][0], seen[0])
    torch.testing.assert_close(source.quant_input(unit)[0], seen[1])
    assert not torch.equal(seen[0], seen[1])
    # a layer before the blocks that changes moves the quantized input of the first block
    q_before = source.quant_input(plan.units[0])[0]
    with torch.no_grad():
        embed.layer.weight_quantizer.scale.mul_(1.1)
    source.fp_io(embed)
    assert not torch.equal(source.quant_input(plan.units[0])[0], q_before)


@pytest.mark.slow
def test_output_weights_estimate_the_diagonal_of_jtj(vit_and_batches):
    """The detection-aware weights: E[(J^T r)^2] over random projections r equals the diagonal
    of J^T J, J the FP model's Jacobian from a unit's output to the downstream outputs (here the
    logits): for the MLP unit (the block's output) and, pulled back through the FP MLP, for the
    MHSA unit of the third block."""
    model, batches = vit_and_batches()
    plan = prepare_calibrated(
        model, QuantConfig(w_bits=4, a_bits=4), lambda m: [m(b) for b in batches]
    )
    batches = batches[:1]
    source = ChainDataSource(model, plan.units, batches, downstream=lambda m, b: m(b))
    attn, mlp = plan.units[4], plan.units[5]  # blocks.2
    block = mlp.block

    def exact(unit, x_at_unit):
        """diag(J^T J) by the full Jacobian of the logits w.r.t. the unit's output."""

        def rest(y):
            out = mlp(y) if unit is attn else y  # an MHSA unit's output goes through its MLP
            h = block.register_forward_hook(lambda m, a, o: out)
            try:
                return model(batches[0])
            finally:
                h.remove()

        with quantizer_states(model, weights=False, activations=False):
            y = unit(x_at_unit).detach()
            jac = torch.autograd.functional.jacobian(rest, y)  # (B, classes, B, N, C)
        return jac.pow(2).sum((0, 1))

    for unit in (attn, mlp):
        x, targets, _ = source.fp_io(unit)
        weights = source.output_weights(unit, targets, probes=1500, seed=0)
        want = exact(unit, x[0])
        assert weights[0].shape == want.shape == targets[0].shape
        rel = (weights[0] - want).norm() / want.norm()
        assert rel < 0.1, (unit.name, float(rel))
    # a source without downstream outputs has no weights
    assert ChainDataSource(model, plan.units, batches).output_weights(mlp, targets, 2, 0) is None


def test_kl_probes_have_the_fisher_of_the_softmax_as_covariance():
    """The 'kl' projections: E[r r^T] = (diag(p) - p p^T) / T^2 with p = softmax(z / T), the
    Fisher information of the KL divergence of the tempered softmax at the FP logits z; 'mse'
    ones have the identity. Logits of another shape (a detector's features) are refused."""
    z = torch.tensor([[2.0, 0.5, -1.0, 0.0], [0.0, 0.0, 3.0, -2.0]])
    gen = torch.Generator().manual_seed(0)
    for metric, temp in (("kl", 1.0), ("kl", 4.0), ("mse", 1.0)):
        rs = torch.stack([probe_vectors([z], gen, metric, temp)[0] for _ in range(40000)])
        cov = torch.einsum("sbi,sbj->bij", rs, rs) / len(rs)
        if metric == "kl":
            p = torch.softmax(z / temp, -1)
            want = (torch.diag_embed(p) - p[:, :, None] * p[:, None, :]) / temp**2
        else:
            want = torch.eye(4).expand(2, 4, 4)
        assert (cov - want).abs().max() < 0.03 * want.abs().max(), (metric, temp)
    with pytest.raises(ValueError, match="needs the model's logits"):
        probe_vectors([torch.zeros(2, 3, 4)], gen, "kl", 1.0)
