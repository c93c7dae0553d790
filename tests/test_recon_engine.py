"""One unit's reconstruction (pfcr_mm/recon/unit.py) on a tiny timm ViT at W4A4: the loss
goes down, POS recipes, cache sampling, hardening, reproducibility, failure handling and the
settings."""

import copy
import math

import pytest
import torch

from pfcr_mm.quant.calibrate import quantizer_states
from pfcr_mm.recon import (
    ChainDataSource,
    ComposedUnit,
    ReconSettings,
    UnitRecord,
    beta_at,
    harden,
    layer_recipe,
    reconstruct_unit,
)
from pfcr_mm.recon.loss import reconstruction_loss
from pfcr_mm.recon.sampling import UnitCaches


def unit_caches(model, plan, batches, unit, **kw):
    source = ChainDataSource(model, plan.units, batches, **kw)
    fp_inputs, fp_targets, extra = source.fp_io(unit)
    return source.quant_input(unit), fp_inputs, fp_targets, extra


def weight_quantizers(unit):
    return [(m.weight_quantizer, m) for m in unit.modules() if hasattr(m, "weight_quantizer")]


def same_state(a, b):
    """Two state dicts hold equal tensors (and equal extra states)."""
    return a.keys() == b.keys() and all(
        torch.equal(a[k], b[k]) if isinstance(a[k], torch.Tensor) else a[k] == b[k] for k in a
    )


def mean_error(unit, inputs, targets):
    """The unit's reconstruction error on every cached sample, without QDrop."""
    with torch.no_grad():
        errors = [reconstruction_loss(unit(x), y).item() for x, y in zip(inputs, targets)]
    return sum(errors) / len(errors)


def test_unit_loss_goes_down(quantized_vit):
    model, plan, batches = quantized_vit()
    unit = plan.units[1]  # blocks.0.mlp
    q, x, y, args = unit_caches(model, plan, batches, unit)
    before = mean_error(unit, q, y)  # rounding to nearest, calibrated step sizes
    settings = ReconSettings(iters=50, batch_size=8, w_lr=1e-2, a_lr=1e-3, drop_prob=0.0)
    record = reconstruct_unit(unit, UnitCaches(q, x, y, args), settings)
    assert isinstance(record, UnitRecord) and record.name == "blocks.0.mlp" and record.level == 0
    assert len(record.losses) == 50 and record.iters == 50
    assert (record.n_weight_quantizers, record.n_act_quantizers) == (2, 2)  # fc1, fc2
    first, last = sum(record.losses[:10]) / 10, sum(record.losses[-10:]) / 10
    assert last < 0.99 * first
    harden(model)
    after = mean_error(unit, q, y)
    assert after < 0.97 * before
    # the record's integer-weight errors: rounding to nearest before, learned rounding after
    assert record.hard_before == pytest.approx(before, rel=1e-5)
    assert record.hard_after == pytest.approx(after, rel=1e-5)
    assert not any(m.training for m in model.modules())  # the model stays in eval mode
    # only the MLP's rounding was learned: the block's MHSA layers are untouched
    assert unit.block.attn.qkv.weight_quantizer.alpha is None
    assert unit.block.mlp.fc1.weight_quantizer.alpha is not None


def test_pos_two_stage_learns_rounding_with_fp_activations_first(quantized_vit):
    model, plan, batches = quantized_vit()
    unit = plan.units[1]  # blocks.0.mlp
    q, x, y, args = unit_caches(model, plan, batches, unit)
    acts = [unit.block.mlp.fc1.input_quantizer, unit.block.mlp.fc2.input_quantizer]
    scales = [a.scale.detach().clone() for a in acts]
    states = []  # the activation quantizers' state at every forward of the unit
    hook = unit.block.mlp.fc1.register_forward_pre_hook(lambda m, a: states.append(acts[0].state))
    # every step on all 32 cached samples without the QDrop mix: the losses differ only by what
    # was learned and by the activations' state, not by which samples a step drew
    settings = ReconSettings(iters=20, batch_size=32, w_lr=1e-2, a_lr=1e-3, drop_prob=0.0)
    # what POS "two_stage" gives a unit of 20 iterations (the settings' pos is not read here)
    record = reconstruct_unit(
        unit, UnitCaches(q, x, y, args), settings, layer_recipe("two_stage", 20)
    )
    hook.remove()
    # a probe forward and the integer-weight error on the 2 batches (quantized), then 10
    # iterations in FP, 10 quantized, and the integer-weight error again
    assert states == ["quant"] * 3 + ["fp"] * 10 + ["quant"] * 12
    assert all(a.state == "quant" for a in acts)
    # the weight-only stage cannot have a larger error than the fully quantized one after it
    assert sum(record.losses[:10]) < sum(record.losses[10:])
    # the step sizes moved only in the second stage, but they moved
    assert all(not torch.equal(a.scale, s) for a, s in zip(acts, scales))


def test_hard_tail_runs_the_last_steps_on_the_hardened_weights(quantized_vit):
    model, plan, batches = quantized_vit()
    unit = plan.units[1]  # blocks.0.mlp
    q, x, y, args = unit_caches(model, plan, batches, unit)
    fc1 = unit.block.mlp.fc1
    modes = []  # fc1's rounding at every forward of the unit
    hook = fc1.register_forward_pre_hook(lambda m, a: modes.append(m.weight_quantizer.rounding))
    settings = ReconSettings(iters=10, batch_size=8, w_lr=1e-2, hard_tail=0.3)
    record = reconstruct_unit(unit, UnitCaches(q, x, y, args), settings)
    hook.remove()
    # a probe forward and the integer-weight error before (rounding to nearest: 2 batches), 7
    # soft steps, 3 on the hardened weights, the integer-weight error after (made hard)
    assert modes == ["nearest"] * 3 + ["soft"] * 7 + ["hard_ste"] * 3 + ["hard"] * 2
    assert fc1.weight_quantizer.rounding == "soft"  # what a next level learns from
    assert math.isfinite(record.hard_after) and len(record.losses) == 10
    for bad in (-0.1, 1.0):
        with pytest.raises(ValueError, match="hard_tail must be in"):
            ReconSettings(hard_tail=bad)


def test_batches_of_different_sizes_and_fp16_caches(quantized_vit):
    # pooled: same per-sample shape and extra args -> rows drawn across the cached batches
    same = [torch.arange(4.0).reshape(4, 1) + 10 * i for i in range(3)]
    pooled = UnitCaches(same, same, same, [(7,)] * 3)
    q, x, y, args, _ = pooled.draw(torch.Generator().manual_seed(0), 5, torch.device("cpu"))
    assert pooled.pooled and q.shape == (5, 1) and args == (7,)
    assert torch.equal(q, x) and len(set(q.flatten().tolist())) == 5  # no row twice
    # detection-like: sizes differ -> one cached batch at a time, with its own extra args
    sizes = [torch.zeros(2, 3, 1), torch.ones(3, 5, 1)]
    per_batch = UnitCaches(sizes, sizes, sizes, [((3,),), ((5,),)])
    seen = set()
    g = torch.Generator().manual_seed(0)
    for _ in range(10):
        q, _, _, (hw,), _ = per_batch.draw(g, 8, torch.device("cpu"))
        assert q.shape[1] == hw[0]
        seen.add(hw[0])
    assert not per_batch.pooled and seen == {3, 5}
    # a ViT MLP unit learns from cached fp16 token sequences of two lengths
    model, plan, batches = quantized_vit()
    unit = plan.units[1]
    q, x, y, args = unit_caches(model, plan, batches, unit, cache_dtype="float16")
    q, x, y = [q[0], q[1][:, :9]], [x[0], x[1][:, :9]], [y[0], y[1][:, :9]]
    assert q[0].dtype == torch.float16
    with quantizer_states(model, weights=False, activations=False), torch.no_grad():
        y = [unit(t.float()).half() for t in x]
    record = reconstruct_unit(
        unit, UnitCaches(q, x, y, args), ReconSettings(iters=10, batch_size=8)
    )
    assert len(record.losses) == 10 and all(math.isfinite(v) for v in record.losses)


def test_harden_gives_integer_codes_and_soft_equals_hard_once_converged(quantized_vit):
    model, plan, batches = quantized_vit()
    unit = plan.units[1]
    q, x, y, args = unit_caches(model, plan, batches, unit)
    reconstruct_unit(unit, UnitCaches(q, x, y, args), ReconSettings(iters=5, batch_size=8))
    pairs = [(wq, layer) for wq, layer in weight_quantizers(unit) if wq.alpha is not None]
    assert len(pairs) == 2
    # converged rounding variables: h(V) is exactly 0 or 1 at |V| = 50
    with torch.no_grad():
        for wq, _ in pairs:
            wq.alpha.copy_(torch.where(wq.alpha >= 0, 50.0, -50.0))
            assert set(wq.soft_rounding().unique().tolist()) <= {0.0, 1.0}
        soft = [unit(t) for t in q]
        assert harden(model) == 2
        assert all(wq.rounding == "hard" for wq, _ in pairs)
        hard = [unit(t) for t in q]
    assert all(torch.equal(s, h) for s, h in zip(soft, hard))
    for wq, layer in pairs:
        codes = wq.integer_weight(layer.weight)
        assert torch.equal(codes, codes.round())
        assert codes.min() >= 0 and codes.max() <= 2**4 - 1
        shape = (-1, 1)
        expected = (codes - wq.zero_point.reshape(shape)) * wq.scale.reshape(shape)
        assert torch.equal(wq(layer.weight), expected)
    # layers never reconstructed keep rounding to nearest
    assert plan.units[0].block.attn.qkv.weight_quantizer.rounding == "nearest"


def test_strong_regularizer_drives_rounding_to_integers(quantized_vit):
    model, plan, batches = quantized_vit()
    unit = plan.units[1]
    q, x, y, args = unit_caches(model, plan, batches, unit)
    settings = ReconSettings(iters=100, batch_size=8, w_lr=0.1, a_lr=1e-3, round_weight=1.0)
    record = reconstruct_unit(unit, UnitCaches(q, x, y, args), settings)
    learned = [wq for wq, _ in weight_quantizers(unit) if wq.alpha is not None]
    h = torch.cat([wq.soft_rounding().flatten() for wq in learned])
    assert ((h == 0) | (h == 1)).float().mean() > 0.99
    with torch.no_grad():
        soft = unit(q[0])
        harden(unit)
        gap = reconstruction_loss(unit(q[0]), soft).item()
    assert gap < 0.1 * record.last_loss


def test_same_seed_same_parameters(quantized_vit):
    model, plan, batches = quantized_vit()
    twins = [copy.deepcopy((model, plan.units)) for _ in range(3)]
    learned = []
    for i, (m, units) in enumerate(twins):
        unit = ComposedUnit("blocks.1", 1, units[2:4])
        source = ChainDataSource(m, units, batches)
        x, y, args = source.fp_io(unit)
        q = source.quant_input(unit)
        seed = 0 if i < 2 else 1
        settings = ReconSettings(iters=15, batch_size=8, w_lr=1e-2, a_lr=1e-3, seed=seed)
        reconstruct_unit(unit, UnitCaches(q, x, y, args), settings)
        learned.append(
            {n: p.detach().clone() for n, p in unit.named_parameters() if n.endswith("alpha")}
            | {n: p.detach().clone() for n, p in unit.named_parameters() if n.endswith("scale")}
        )
    assert sum(n.endswith("alpha") for n in learned[0]) == 4  # qkv, proj, fc1, fc2
    assert all(torch.equal(learned[0][n], learned[1][n]) for n in learned[0])
    assert not all(torch.equal(learned[0][n], learned[2][n]) for n in learned[0])


def test_nan_loss_raises_and_leaves_the_unit_untouched(quantized_vit):
    model, plan, batches = quantized_vit()
    unit = plan.units[3]  # blocks.1.mlp
    q, x, y, args = unit_caches(model, plan, batches, unit)
    before = copy.deepcopy(model.state_dict())
    grads = {n: p.requires_grad for n, p in model.named_parameters()}
    bad = [t.clone() for t in q]
    bad[0][0, 0, 0] = float("nan")
    bad[1][0, 0, 0] = float("nan")
    settings = ReconSettings(iters=20, batch_size=8, drop_prob=0.0)
    with pytest.raises(FloatingPointError, match=r"blocks\.1\.mlp"):
        reconstruct_unit(unit, UnitCaches(bad, x, y, args), settings)
    assert same_state(model.state_dict(), before)  # no AdaRound variables added, nothing changed
    assert all(wq.alpha is None and wq.rounding == "nearest" for wq, _ in weight_quantizers(unit))
    assert {n: p.requires_grad for n, p in model.named_parameters()} == grads
    with quantizer_states(model, weights=False, activations=False):
        with pytest.raises(RuntimeError, match="nothing to learn"):
            reconstruct_unit(unit, UnitCaches(q, x, y, args), settings)
    # a unit with learned variables keeps them when a later reconstruction fails
    reconstruct_unit(unit, UnitCaches(q, x, y, args), settings)
    learned = copy.deepcopy(model.state_dict())
    with pytest.raises(FloatingPointError, match=r"blocks\.1\.mlp"):
        reconstruct_unit(unit, UnitCaches(bad, x, y, args), settings)
    assert same_state(model.state_dict(), learned)
    assert [wq.rounding for wq, _ in weight_quantizers(unit) if wq.alpha is not None] == [
        "soft"
    ] * 2


def test_beta_decay_and_settings():
    s = ReconSettings()
    assert (s.iters, s.batch_size, s.w_lr, s.a_lr, s.round_weight, s.drop_prob) == (
        20000, 32, 1e-3, 4e-5, 0.01, 0.5
    )  # fmt: skip
    assert beta_at(0.0, s) == 20.0 and beta_at(1.0, s) == 2.0 and beta_at(0.5, s) == 11.0
    assert ReconSettings.from_dict(s.to_dict()) == s
    with pytest.raises(ValueError, match="pos must be one of"):
        ReconSettings(pos="never")
    with pytest.raises(KeyError, match="itres"):
        ReconSettings.from_dict({"itres": 5})


@pytest.mark.slow
def test_downstream_weights_steer_the_reconstruction(quantized_vit):
    """With the detection-aware term, the error where the output weights are large drops more
    than with the plain loss alone (weights 1 on the first 8 channels, 0 elsewhere)."""
    errors, records = [], []
    for weight in (0.0, 20.0):
        model, plan, batches = quantized_vit()  # the same calibrated model each time
        unit = plan.units[1]  # blocks.0.mlp
        q, x, y, args = unit_caches(model, plan, batches, unit)
        weights = [torch.zeros_like(t) for t in y]
        for w in weights:
            w[..., :8] = 1
        settings = ReconSettings(
            iters=60, batch_size=8, w_lr=1e-2, a_lr=1e-3, drop_prob=0.0, downstream_weight=weight
        )
        records.append(reconstruct_unit(unit, UnitCaches(q, x, y, args, weights), settings))
        harden(unit)
        with torch.no_grad():
            errors.append(sum((unit(a) - b)[..., :8].pow(2).sum().item() for a, b in zip(q, y)))
    assert errors[1] < 0.95 * errors[0]  # measured: 5.35 against 5.91


def test_output_aware_settings_are_checked():
    with pytest.raises(ValueError, match="downstream_weight must be >= 0"):
        ReconSettings(downstream_weight=-1)
    with pytest.raises(ValueError, match="downstream_metric must be one of"):
        ReconSettings(downstream_metric="fisher")
    with pytest.raises(ValueError, match="downstream_temperature must be > 0"):
        ReconSettings(downstream_temperature=0)
    with pytest.raises(ValueError, match="downstream_min_level must be a level >= 0"):
        ReconSettings(downstream_min_level=-1)


@pytest.mark.parametrize("mode", ["absolute", "relative"])
def test_step_sizes_move_by_a_lr_or_by_a_lr_times_their_size(quantized_vit, mode):
    """Adam's first step moves each learned step size by its rate: ``a_lr`` for all, or ``a_lr``
    times the step's own size (a step of 0.01 and one of 6 move by the same fraction)."""
    model, plan, batches = quantized_vit()
    unit = plan.units[1]  # blocks.0.mlp: the inputs of fc1 and fc2
    q, x, y, args = unit_caches(model, plan, batches, unit)
    acts = [unit.block.mlp.fc1.input_quantizer, unit.block.mlp.fc2.input_quantizer]
    before = [float(a.scale) for a in acts]
    assert max(before) > 1.5 * min(before)  # sizes that differ, or the test shows nothing
    settings = ReconSettings(iters=1, batch_size=8, a_lr=1e-2, a_lr_mode=mode, drop_prob=0.0)
    reconstruct_unit(unit, UnitCaches(q, x, y, args), settings)
    moved = [abs(float(a.scale) - b) for a, b in zip(acts, before)]
    expected = [1e-2 * (b if mode == "relative" else 1.0) for b in before]
    assert moved == pytest.approx(expected, rel=2e-2)  # Adam: |g| / (|g| + eps) of tiny g
    with pytest.raises(ValueError, match="a_lr_mode"):
        ReconSettings(a_lr_mode="scaled")
