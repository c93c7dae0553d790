"""tools/benchmarks/benchmark_step.py: a tiny run on the committed demo ViT writes one row per
unit type of the fine-to-coarse run, with positive times and the block-pass convention, and a
table line per row; bad input is refused with one line and exit code 2."""

import json

import pytest

from pfcr_mm.demo.shapes import generate_shapes_dataset


@pytest.fixture(scope="module")
def tiny_shapes(tmp_path_factory):
    """40 train images of the demo shapes set (the committed checkpoint's data, drawn small)."""
    root = tmp_path_factory.mktemp("shapes")
    generate_shapes_dataset(root, train_per_class=4, val_per_class=1)
    return root


@pytest.mark.slow
def test_one_row_per_unit_type_with_block_passes(step_tool, tiny_shapes, tmp_path, capsys):
    out = tmp_path / "step"
    argv = ["--iters", "2", "--repeats", "1", "--warmup", "0", "--batch-size", "16"]
    argv += ["--calib-images", "32", "--data-root", str(tiny_shapes), "--out", str(out)]
    assert step_tool.main(argv) == 0
    data = json.loads((out / "benchmark.json").read_text())
    rows = data["rows"]
    # the demo ViT has 6 blocks: levels 0 (attn, mlp), 1, 2, 3 (4 blocks; blocks 4-5 repeat
    # level 2 and are not run) and the top, 4 (all 6)
    types = [(r["level"], r["unit_type"], r["blocks"], r["block_passes"]) for r in rows]
    assert types == [
        (0, "attn", 1, 0.5),
        (0, "mlp", 1, 0.5),
        (1, "block", 1, 1),
        (2, "2 blocks", 2, 2),
        (3, "4 blocks", 4, 4),
        (4, "6 blocks", 6, 6),
    ]
    for r in rows:
        assert r["fp_fwd_bwd_ms"] > 0 and r["step_ms"] > 0
        assert r["ratio"] == pytest.approx(r["step_ms"] / r["fp_fwd_bwd_ms"])
        assert r["batch_shape"] == [16, 65, 96]  # 64 patches + class token, width 96
    assert (data["meta"]["bits"], data["meta"]["iters"], data["meta"]["threads"]) == (4, 2, 1)
    table = [line for line in (out / "benchmark.md").read_text().splitlines() if line[:1] == "|"]
    assert len(table) == 2 + len(rows)  # header, separator, one line per row
    assert f"wrote {out / 'benchmark.json'}" in capsys.readouterr().out


@pytest.mark.parametrize(
    "argv, says",
    [
        (["--checkpoint", "{tmp}/missing.pth"], "train_demo_classifier.py"),
        (["--data-root", "{tmp}/no_data"], "make_demo_data.py"),
        (["--iters", "1"], "--iters must be >= 2"),
        (["--bits", "9"], "w_bits"),
    ],
)
def test_bad_input_is_refused_in_one_line(step_tool, tmp_path, capsys, argv, says):
    argv = [a.format(tmp=tmp_path) for a in argv] + ["--out", str(tmp_path / "out")]
    assert step_tool.main(argv) == 2
    err = capsys.readouterr().err
    assert says in err and err.count("\n") == 1
    assert not (tmp_path / "out").exists()
