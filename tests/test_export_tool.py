"""tools/export.py from the command line on a tiny quantized timm classifier (quantized by
tools/ptq.py in the test): the ONNX file and its report, with parity numbers; bad input is one
line on stderr and exit code 2."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def quantized(tmp_path_factory, ptq_tool, make_image_folder, write_vit_config):
    """``(config, work dir)`` of a tiny ViT quantized at W4A4 by tools/ptq.py."""
    tmp = tmp_path_factory.mktemp("export_tool")
    make_image_folder(tmp / "data")
    cfg = write_vit_config(tmp)
    work = tmp / "work"
    assert ptq_tool.main([str(cfg), "--work-dir", str(work), "--no-fp-eval"]) == 0
    return cfg, work


@pytest.mark.slow
def test_export_from_the_command_line(quantized, tmp_path):
    cfg, work = quantized
    out = tmp_path / "vit.onnx"
    before = sorted(p for p in work.rglob("*"))
    cmd = [sys.executable, "tools/export.py", str(cfg), "--quantized", str(work)]
    proc = subprocess.run(
        [*cmd, "--out", str(out)], cwd=ROOT, capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert sorted(p for p in work.rglob("*")) == before  # the export writes only its outputs
    assert out.is_file() and out.stat().st_size > 0
    report = json.loads(out.with_suffix(".json").read_text())
    assert f"wrote {out}" in proc.stdout
    parity = report["parity"]
    assert parity["images"] == 4  # the first test batch
    assert parity["top1_agreement"] == 1.0
    assert 0 <= parity["max_abs_logit_diff"] <= 0.02 * parity["logit_range"]
    assert report["quant_config"]["w_bits"] == 4 and report["method"] == "calib"
    assert report["quantizer_points"] > 0 and report["uint4_initializers"] > 0


BAD = [
    # the config says W8A8, the model was quantized at W4A4
    (
        ["--cfg-options", "ptq.quant.w_bits=8"],
        "was quantized with ptq.quant.w_bits=4, but the config says 8",
    ),
    # the FP checkpoint instead of a quantized model
    (["--quantized", "{fp}"], "tiny.pth is not a quantized model written by tools/ptq.py"),
    (["--input-size", "32", "32"], "--input-size is for detectors"),
]


@pytest.mark.slow
def test_bad_input_is_one_line_and_exit_code_2(quantized, export_tool, tmp_path, capsys):
    # one test for all cases: MMEngine keeps the loggers of the Runners it builds, and a
    # Runner built in the same second as an earlier one logs to that test's closed capture
    cfg, work = quantized
    out = tmp_path / "x.onnx"
    for args, says in BAD:
        args = [a.format(fp=cfg.parent / "tiny.pth") for a in args]
        argv = [str(cfg), "--quantized", str(work), "--out", str(out), *args]
        assert export_tool.main(argv) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and says in err[0], err
        assert not out.exists()


@pytest.mark.slow
def test_a_read_only_out_folder_is_refused_before_the_work(
    quantized, export_tool, tmp_path, capsys, monkeypatch
):
    cfg, work = quantized
    read_only = tmp_path / "read_only"
    read_only.mkdir()
    access = os.access  # a read-only mount, as access(2) reports one (root writes anywhere else)
    monkeypatch.setattr(os, "access", lambda p, mode: p != read_only and access(p, mode))
    built = []
    monkeypatch.setattr(export_tool, "build_quantized", lambda *args: built.append(args))
    argv = [str(cfg), "--quantized", str(work), "--out", str(read_only / "sub" / "m.onnx")]
    assert export_tool.main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [
        f"error (ValueError): cannot write into {read_only / 'sub'} ({read_only} is not "
        "writable): give --out a writable folder"
    ]
    assert built == [] and not (read_only / "sub").exists()
