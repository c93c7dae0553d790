"""The post-GELU input points (QuantConfig.post_gelu): the log quantizer above the minimum, the
choice per linear, saving, export."""

import json
import subprocess
import sys
from pathlib import Path

import onnx
import pytest
import torch

from pfcr_mm.adapters import prepare, prepare_calibrated
from pfcr_mm.export import export_onnx, integer_model
from pfcr_mm.export.runtime import cpu_session, run_session
from pfcr_mm.quant.calibrate import quant_summary, set_quant_state
from pfcr_mm.quant.histogram import WeightedValues
from pfcr_mm.quant.modules import QuantLinear
from pfcr_mm.quant.post_gelu import POST_GELU_CANDIDATES, PostGeluLinear
from pfcr_mm.quant.quantizers import ShiftedLogQuantizer, UniformQuantizer
from pfcr_mm.settings import QuantConfig

ROOT = Path(__file__).resolve().parents[1]


def test_a_loaded_base_brings_its_own_levels():
    """Loading the state of a log quantizer of another base rebuilds the level table."""
    a, b = ShiftedLogQuantizer(4, k=2.0), ShiftedLogQuantizer(4, k=1.0)
    for q in (a, b):
        q.delta.fill_(4.0)
        q.offset.fill_(-0.17)
        q.calibrated = True
    b.load_state_dict(a.state_dict())
    x = torch.linspace(-0.2, 4, 9)
    assert b.k == 2.0 and torch.equal(b.quant_dequant(x), a.quant_dequant(x))


def test_shifted_log_levels_sit_above_the_minimum():
    q = ShiftedLogQuantizer(3, k=1.0)  # codes 0..7: offset + delta * 2^-q, and the offset
    values = torch.tensor([-0.25, 0.0, 0.5, 1.75]).reshape(-1, 1)
    q.calibrate_from_stats(WeightedValues.of_rows(values))
    assert float(q.offset) == -0.25
    assert float(q.delta) == 2.0  # the exact maximum above the offset: 1.75 + 0.25
    x = torch.tensor([-1.0, -0.25, -0.24, -0.238, 0.0, 0.8, 1.75, 9.0])
    # x - offset: 0 and below -> the offset; 0.01 -> the offset too (log2(2 / 0.01) = 7.6 rounds
    # past the last code); 0.012 -> 2 * 2^-7 (7.4 rounds to 7); 0.25 -> 2 * 2^-3;
    # 1.05 -> 2 * 2^-1 (log2(2 / 1.05) = 0.93 rounds to 1); 2.0 -> 2; 9.25 clips to code 0
    expected = torch.tensor([-0.25, -0.25, -0.25, -0.25 + 2 * 2**-7, 0.0, 0.75, 1.75, 1.75])
    assert torch.allclose(q.quant_dequant(x), expected)
    info = q.describe()
    assert info["quantizer"] == "shift_log2" and (info["range_min"], info["range_max"]) == (
        -0.25,
        1.75,
    )


def _fc2s(model):
    return [b.mlp.fc2 for b in model.blocks]


def test_uniform_keeps_plain_linears_and_fixed_choices_build_one_quantizer(tiny_timm_vit):
    model = tiny_timm_vit()
    prepare(model, QuantConfig())  # post_gelu="uniform": the default
    assert all(type(f) is QuantLinear for f in _fc2s(model))
    model = tiny_timm_vit()
    prepare(model, QuantConfig(post_gelu="shift_log_sqrt2"))
    for f in _fc2s(model):
        assert isinstance(f, PostGeluLinear) and f.chosen() == {"kind": "shift_log", "k": 2.0}
    assert type(model.blocks[0].mlp.fc1) is QuantLinear  # only the linears after GELU
    with pytest.raises(ValueError, match="post_gelu"):
        QuantConfig(post_gelu="log2")


def test_each_linear_keeps_the_candidate_of_least_output_error(tiny_timm_vit, recorded_scores):
    """Without the model's outputs each post-GELU linear keeps the candidate of least squared
    error in its own output, which the summary records."""
    x = torch.randn(8, 3, 32, 32)
    model = tiny_timm_vit()
    scored = recorded_scores
    prepare_calibrated(model, QuantConfig(w_bits=3, a_bits=3, post_gelu="auto"), lambda m: m(x))
    inputs = {}
    hooks = [
        f.register_forward_hook(lambda m, a, o: inputs.__setitem__(id(m), a[0]))
        for f in _fc2s(model)
    ]
    set_quant_state(model, weights=False, activations=False)
    with torch.no_grad():
        model(x)
    for h in hooks:
        h.remove()
    rows = {r["module"]: r for r in quant_summary(model)}
    for i, f in enumerate(_fc2s(model)):
        scores = scored[id(f)]
        assert len(scores) == len(POST_GELU_CANDIDATES) and len(set(scores)) == len(scores)
        best = min(range(len(scores)), key=scores.__getitem__)
        kind, k = POST_GELU_CANDIDATES[best]
        assert f.chosen() == ({"kind": kind, "k": k} if k else {"kind": kind})
        z = inputs[id(f)]
        with torch.no_grad():
            zq = f.input_quantizer.fake_quant(z)
            error = (zq @ f.weight.t() - z @ f.weight.t()).pow(2).sum()
        assert scores[best] == pytest.approx(float(error), rel=1e-4)
        record = rows[f"blocks.{i}.mlp.fc2.input_quantizer"]["choice"]
        assert record["consumer"] == "linear output" and record["consumer_error"] == scores


def _forced_log_model(tiny_timm_vit, batches):
    """The tiny ViT at W4A4 (log2 post-softmax) with post_gelu='auto', its first post-GELU
    point forced to a shifted log quantizer (whatever the choice), every quantizer on."""
    model = tiny_timm_vit()
    cfg = QuantConfig(w_bits=4, a_bits=4, post_softmax="log2", post_gelu="auto")
    prepare_calibrated(model, cfg, lambda m: [m(b) for b in batches])
    first = model.blocks[0].mlp.fc2
    if not isinstance(first.input_quantizer, ShiftedLogQuantizer):
        q = ShiftedLogQuantizer(4, k=2**0.5)
        q.offset.fill_(-0.17)
        q.delta.fill_(3.0)
        q.calibrated = True
        first.input_quantizer = q
    set_quant_state(model, weights=True, activations=True)
    return model, cfg


def test_the_choice_is_saved_and_exported(tiny_timm_vit, tmp_path):
    batches = [torch.randn(16, 3, 32, 32) for _ in range(2)]
    model, cfg = _forced_log_model(tiny_timm_vit, batches)
    loaded = tiny_timm_vit()
    prepare(loaded, cfg)
    loaded.load_state_dict(model.state_dict())
    for a, b in zip(_fc2s(model), _fc2s(loaded)):
        assert (
            a.chosen() == b.chosen()
            and a.input_quantizer.describe() == b.input_quantizer.describe()
        )
    set_quant_state(loaded, weights=True, activations=True)
    x = torch.randn(8, 3, 32, 32)
    with torch.no_grad():
        ref = model(x)
        assert torch.equal(loaded(x), ref)
        assert torch.equal(integer_model(model)(x), ref)
    path = tmp_path / "post_gelu.onnx"
    logs = sum(isinstance(f.input_quantizer, ShiftedLogQuantizer) for f in _fc2s(model))
    for int8 in (False, True):  # 4-bit containers, and every point in 8-bit ones
        report = export_onnx(model, x[:2], path, int8=int8)
        assert [r["kind"] for r in report["post_gelu"]] == [
            f.chosen()["kind"] for f in _fc2s(model)
        ]
        ops = [n.op_type for n in onnx.load(path).graph.node]
        assert ops.count("Log") == 4 + logs  # the log2 post-softmax points and the shifted ones
        out = run_session(cpu_session(path), x)
        assert float((out - ref).abs().max()) <= 0.02 * float(ref.max() - ref.min())


def test_a_point_used_before_the_choice_is_refused(tiny_timm_vit):
    model = tiny_timm_vit()
    prepare(model, QuantConfig(post_gelu="auto"))
    first = model.blocks[0].mlp.fc2
    assert not isinstance(first.input_quantizer, (UniformQuantizer, ShiftedLogQuantizer))
    first.input_quantizer.calibrated = True
    with pytest.raises(RuntimeError, match="choice"):
        first.input_quantizer.fake_quant(torch.rand(2, 2))


@pytest.mark.parametrize("family", ["timm_swin", "mmdet_swin"])
def test_swin_mlps_choose_their_post_gelu_point(family, tiny_timm_swin, tiny_mmdet_swin):
    """Every Swin block's second MLP linear (timm's ``mlp.fc2``, mmdet's ``ffn.layers[1]``) is
    a post-GELU point and gets a choice; the quantized model runs."""
    model = (tiny_timm_swin if family == "timm_swin" else tiny_mmdet_swin)()
    x = torch.randn(4, 3, 56, 56)
    prepare_calibrated(model, QuantConfig(w_bits=4, a_bits=4, post_gelu="auto"), lambda m: m(x))
    points = [m for m in model.modules() if isinstance(m, PostGeluLinear)]
    assert len(points) == 4  # two stages of two blocks
    for m in points:
        assert m.chosen()["kind"] in ("uniform", "shift_log") and m.choice_record is not None
    set_quant_state(model, weights=True, activations=True)
    with torch.no_grad():
        out = model(x)
    outs = [out] if isinstance(out, torch.Tensor) else list(out)  # mmdet's: one map per stage
    assert outs and all(torch.isfinite(o).all() for o in outs)


@pytest.mark.slow
def test_quantize_and_export_from_the_command_line(
    tmp_path, ptq_tool, make_image_folder, write_vit_config
):
    """tools/ptq.py with post_gelu='auto', then tools/export.py of its saved model: the choice
    travels through the file, the report lists it, onnxruntime agrees with the fake-quant
    model; the config without the setting is refused."""
    make_image_folder(tmp_path / "data")
    cfg, work = write_vit_config(tmp_path), tmp_path / "work"
    option = ["--cfg-options", "ptq.quant.post_gelu=auto"]
    assert ptq_tool.main([str(cfg), "--work-dir", str(work), "--no-fp-eval", *option]) == 0
    summary = json.loads(next(work.rglob("quant_summary.json")).read_text())["quantizers"]
    chosen = [r["quantizer"] for r in summary if r["module"].endswith("mlp.fc2.input_quantizer")]
    assert chosen and all("choice" in r for r in summary if "fc2.input" in r["module"])
    out = tmp_path / "vit.onnx"
    cmd = [sys.executable, "tools/export.py", str(cfg), "--quantized", str(work), "--out", str(out)]
    refused = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert refused.returncode == 2 and "ptq.quant.post_gelu=auto" in refused.stderr
    proc = subprocess.run([*cmd, *option], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    report = json.loads(out.with_suffix(".json").read_text())
    names = {"uniform": "uniform", 1.0: "shift_log2", 2**0.5: "shift_log_k1.41421"}
    names[2.0] = "shift_log_sqrt2"
    assert [names[r.get("k", r["kind"])] for r in report["post_gelu"]] == chosen
    parity = report["parity"]
    assert parity["top1_agreement"] == 1.0
    assert parity["max_abs_logit_diff"] <= 0.02 * parity["logit_range"]
