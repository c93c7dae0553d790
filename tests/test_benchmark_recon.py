"""tools/benchmarks/benchmark_recon.py's command line: ``--heldout`` and ``--options`` reach every
run's config options and are recorded, a rescore reads them back, and ``--merge`` refuses files
run with different ones."""

import json

import pytest


def test_options_and_heldout_reach_every_run_and_are_read_back(recon_tool, tmp_path):
    preset = {**recon_tool.PRESETS["quick"], "cls_heldout": 512, "options": ["ptq.recon.w_lr=0.01"]}
    opts = recon_tool._options("cls", 3, "block", 1, preset)
    assert "ptq.calib.heldout_images=512" in opts and "ptq.method=block" in opts
    assert opts[-1] == "ptq.recon.w_lr=0.01"  # after the method's, so it wins over them
    assert recon_tool._options("det", 3, "block", 1, preset)[-1] == "ptq.recon.w_lr=0.01"
    data = {"preset": "quick", **preset, "rows": []}
    assert recon_tool._preset_of(data) == preset
    assert recon_tool._preset_of({"preset": "fast", "rows": []}) == recon_tool.PRESETS["fast"]


def test_merge_refuses_files_run_with_other_options(recon_tool, tmp_path, capsys):
    paths = []
    for i, extra in enumerate(({}, {"options": ["ptq.recon.a_lr=0.0004"]})):
        path = tmp_path / f"part{i}.json"
        path.write_text(json.dumps({"preset": "quick", **extra, "rows": []}))
        paths.append(str(path))
    with pytest.raises(SystemExit, match="--options"):
        recon_tool.main(["--merge", *paths, "--out", str(tmp_path / "merged")])
    assert not (tmp_path / "merged").exists()
