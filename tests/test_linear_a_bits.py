"""Input bits of the blocks' linears by kind (QuantConfig.linear_a_bits): which quantizers get
them in every adapter, the post-GELU choice at those bits, saving, and refused settings."""

import json
import re

import pytest
import torch

from pfcr_mm.adapters import prepare, prepare_calibrated
from pfcr_mm.models.vitdet import ViTDet
from pfcr_mm.quant.calibrate import quant_summary, set_quant_state
from pfcr_mm.quant.post_gelu import POST_GELU_CANDIDATES
from pfcr_mm.settings import QuantConfig

ATTN4 = dict(qkv=4, proj=4)


def _tiny_vitdet():
    return ViTDet(img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=2).eval()


def _input_bits(model) -> dict[str, int]:
    return {
        name: m.input_quantizer.bits
        for name, m in model.named_modules()
        if hasattr(m, "input_quantizer")
    }


@pytest.mark.parametrize(
    "family, blocks, kinds",
    [
        # the names each family gives its qkv, proj, fc1 and fc2
        ("timm_vit", 4, ("attn.qkv", "attn.proj", "mlp.fc1", "mlp.fc2")),
        ("timm_swin", 4, ("attn.qkv", "attn.proj", "mlp.fc1", "mlp.fc2")),
        ("mmdet_swin", 4, ("attn.w_msa.qkv", "attn.w_msa.proj", "ffn.layers.0.0", "ffn.layers.1")),
        ("vitdet", 2, ("attn.qkv", "attn.proj", "mlp.fc1", "mlp.fc2")),
    ],
)
def test_each_kind_gets_its_bits_in_every_family(
    family, blocks, kinds, tiny_timm_vit, tiny_timm_swin, tiny_mmdet_swin
):
    build = {
        "timm_vit": tiny_timm_vit,
        "timm_swin": tiny_timm_swin,
        "mmdet_swin": tiny_mmdet_swin,
        "vitdet": _tiny_vitdet,
    }[family]
    cfg = QuantConfig(w_bits=3, a_bits=3, linear_a_bits=dict(qkv=4, proj=5, fc2=6))
    model = build()
    prepare(model, cfg, head=getattr(model, "head", None))
    bits = _input_bits(model)
    for kind, expected in zip(kinds, (4, 5, 3, 6)):
        named = {n: b for n, b in bits.items() if n.endswith(f".{kind}")}
        assert len(named) == blocks and set(named.values()) == {expected}, (kind, named)
    # the attention's matmul inputs, the patch embedding and every other layer keep theirs
    matmuls = [q for n, q in model.named_modules() if n.endswith("matmul_quant")]
    assert len(matmuls) == blocks
    assert {q.bits for m in matmuls for q in (m.q, m.k, m.v, m.probs)} == {3}
    rest = {n: b for n, b in bits.items() if not n.endswith(tuple(f".{k}" for k in kinds))}
    assert set(rest.values()) <= {3, 8} and list(rest.values()).count(8) == 1  # the image


def test_post_gelu_candidates_take_the_linears_bits_and_reload(tiny_timm_vit):
    """fc2 at 5 bits with ``post_gelu='auto'``: every candidate is built at 5 bits, the summary
    says so, and a model prepared from the same settings loads the choice at 5 bits."""
    cfg = QuantConfig(w_bits=3, a_bits=3, post_gelu="auto", linear_a_bits=dict(fc2=5))
    x = torch.randn(8, 3, 32, 32)
    model = tiny_timm_vit()
    prepare_calibrated(model, cfg, lambda m: m(x))
    rows = [r for r in quant_summary(model) if r["module"].endswith("mlp.fc2.input_quantizer")]
    assert len(rows) == 4 and {r["bits"] for r in rows} == {5}
    assert all(len(r["choice"]["candidates"]) == len(POST_GELU_CANDIDATES) for r in rows)
    loaded = tiny_timm_vit()
    prepare(loaded, cfg)
    loaded.load_state_dict(model.state_dict())
    assert {b.mlp.fc2.input_quantizer.bits for b in loaded.blocks} == {5}
    set_quant_state(loaded, weights=True, activations=True)
    with torch.no_grad():
        assert torch.equal(loaded(x), model(x))


def test_more_input_bits_lower_the_attention_error(tiny_timm_vit):
    """The same calibration at W3A3, then with qkv and proj inputs at 4 bits: the output moves
    less from the FP model's (the point of the setting)."""
    x = torch.randn(16, 3, 32, 32)
    with torch.no_grad():
        ref = tiny_timm_vit()(x)
    errors = []
    for linear_a_bits in (None, ATTN4):
        model = tiny_timm_vit()
        cfg = QuantConfig(w_bits=3, a_bits=3, linear_a_bits=linear_a_bits)
        prepare_calibrated(model, cfg, lambda m: m(x))
        with torch.no_grad():
            errors.append(float((model(x) - ref).pow(2).mean()))
    assert errors[1] < 0.9 * errors[0], errors


@pytest.mark.parametrize(
    "linear_a_bits, error, message",
    [
        (dict(qkvv=4), KeyError, "'qkvv' (did you mean 'qkv'?)"),
        (dict(proj=9), ValueError, "QuantConfig.linear_a_bits.proj: bits must be an integer"),
        (dict(fc1=True), ValueError, "QuantConfig.linear_a_bits.fc1: bits must be an integer"),
    ],
)
def test_bad_kinds_and_bits_are_refused(linear_a_bits, error, message):
    with pytest.raises(error, match=re.escape(message)):
        QuantConfig(linear_a_bits=linear_a_bits)


def test_a_kind_set_to_none_keeps_a_bits(tiny_timm_vit):
    model = tiny_timm_vit()
    prepare(model, QuantConfig(w_bits=3, a_bits=3, linear_a_bits=dict(qkv=None, proj=4)))
    assert {b.attn.qkv.input_quantizer.bits for b in model.blocks} == {3}
    assert {b.attn.proj.input_quantizer.bits for b in model.blocks} == {4}


@pytest.mark.slow
def test_from_the_command_line_and_reloaded_only_with_the_same_bits(
    make_image_folder, write_vit_config, ptq_tool, tmp_path, capsys
):
    """``--cfg-options ptq.quant.linear_a_bits.qkv=4`` on a config that sets it to ``None``: the
    summary shows the qkv inputs at 4 bits, the printed results mark the setting as mixed; the
    saved model is refused where the setting is missing, naming the option to pass."""
    make_image_folder(tmp_path / "data")
    vit_config = write_vit_config(tmp_path, extra="ptq['quant']['linear_a_bits'] = None")
    work = tmp_path / "work"
    option = ["--cfg-options", "ptq.quant.a_bits=3", "ptq.quant.linear_a_bits.qkv=4"]
    assert ptq_tool.main([str(vit_config), "--work-dir", str(work), "--no-fp-eval", *option]) == 0
    rows = json.loads(next(work.rglob("quant_summary.json")).read_text())["quantizers"]
    bits = {r["module"]: r["bits"] for r in rows if r["kind"] == "input"}
    assert [bits[f"net.blocks.{i}.attn.qkv.input_quantizer"] for i in (0, 1)] == [4, 4]
    assert [bits[f"net.blocks.{i}.attn.proj.input_quantizer"] for i in (0, 1)] == [3, 3]
    saved = next(work.rglob("quantized_model.pth"))
    argv = [str(vit_config), "--work-dir", str(tmp_path / "w2"), "--no-fp-eval"]
    argv += ["--quantized", str(saved), "--cfg-options", "ptq.quant.a_bits=3"]
    printed = capsys.readouterr().out  # the results table says the setting is mixed
    assert "W4A3*" in printed  # the config is W4, the option A3
    assert "* mixed precision (quant.linear_a_bits): the inputs of qkv at 4 bits" in printed
    assert ptq_tool.main(argv) == 2
    assert "ptq.quant.linear_a_bits.qkv=4" in capsys.readouterr().err
    assert ptq_tool.main([*argv, "ptq.quant.linear_a_bits.qkv=4"]) == 0


@pytest.mark.parametrize("with_settings", [True, False])
def test_a_model_saved_before_the_setting_existed_reads_as_all_at_a_bits(tmp_path, with_settings):
    """A file saved before ``linear_a_bits`` existed (with its settings recorded, or from before
    settings were saved: method, scope and quant only) was made with every input at ``a_bits``:
    it reads under that setting and is refused, naming the key, under any other."""
    from pfcr_mm import PTQConfig
    from pfcr_mm.engine.saved_model import (
        QUANTIZED_FORMAT,
        quantization_settings,
        read_quantized_model,
    )

    config = PTQConfig(method="block", quant=QuantConfig(w_bits=3, a_bits=3))
    older = quantization_settings(config)
    del older["quant"]["linear_a_bits"]
    payload = {"format": QUANTIZED_FORMAT, "state_dict": {}}
    if with_settings:
        payload["settings"] = older
    else:
        payload.update(method="block", scope=older["scope"], quant_config=older["quant"])
    path = tmp_path / "older.pth"
    torch.save(payload, path)
    read_quantized_model(config, path)
    mixed = PTQConfig(method="block", quant=QuantConfig(w_bits=3, a_bits=3, linear_a_bits=ATTN4))
    with pytest.raises(ValueError, match=r"linear_a_bits.proj=None, but the config says 4"):
        read_quantized_model(mixed, path)


def test_kinds_set_to_none_or_none_named_read_as_none():
    assert QuantConfig(linear_a_bits={}).linear_a_bits is None
    assert QuantConfig(linear_a_bits=dict(qkv=None, fc1=None)).linear_a_bits is None
    assert QuantConfig(linear_a_bits=dict(qkv=None, proj=4)).linear_a_bits == dict(proj=4)


def test_the_printed_results_mark_only_inputs_at_other_bits():
    from pfcr_mm.engine.loop import format_results

    def printed(linear_a_bits):
        quant = QuantConfig(w_bits=3, a_bits=3, linear_a_bits=linear_a_bits).to_dict()
        results = {"w_bits": 3, "a_bits": 3, "quant_config": quant, "fp": None}
        results.update(quant={"accuracy/top1": 88.6}, time_s={"quantize": 1.0}, method="pfcr")
        return format_results({**results, "scope": "all", "peak_mem_mb": {"host_rss": 1.0}})

    plain = printed(dict(qkv=3))  # at a_bits: not mixed
    assert "W3A3\n" in plain and "W3A3*" not in plain and "mixed" not in plain
    marked = printed(dict(qkv=3, proj=4))
    assert "W3A3*" in marked
    assert marked.endswith("* mixed precision (quant.linear_a_bits): the inputs of proj at 4 bits")
