"""The detection path end to end on a few demo images: tools/ptq.py (FP, calibration, quantized
evaluation, results file, saved model), reload with identical metrics, subset evaluation, and
clear failures that write nothing misleading."""

import json
import shutil
from pathlib import Path

import pytest
import torch
from mmdet.registry import MODELS
from mmdet.utils import register_all_modules
from mmengine.config import Config

from pfcr_mm.demo.coco_shapes import generate_coco_shapes
from pfcr_mm.engine.run_dir import last_run_dir

pytestmark = pytest.mark.slow  # every test runs tools/ptq.py on the demo detector (seconds each)

ROOT = Path(__file__).resolve().parents[1]

DEMO = ROOT / "configs/demo/demo_mask_rcnn_swin_shapes_w4a4.py"


@pytest.fixture(scope="module")
def demo_setup(tmp_path_factory):
    """A 6-train/4-val demo set and a randomly initialised demo detector checkpoint."""
    tmp = tmp_path_factory.mktemp("det")
    generate_coco_shapes(tmp / "data", num_train=6, num_val=4, seed=1)
    register_all_modules()
    torch.manual_seed(0)
    model = MODELS.build(Config.fromfile(DEMO).model)
    torch.save({"state_dict": model.state_dict()}, tmp / "det.pth")
    return tmp


def _config(tmp: Path, name: str = "cfg.py", extra: str = "") -> Path:
    data = str(tmp / "data") + "/"
    cfg = tmp / name
    cfg.write_text(f"""
_base_ = [{str(DEMO)!r}]
load_from = {str(tmp / 'det.pth')!r}
test_dataloader = dict(batch_size=2, dataset=dict(data_root={data!r}))
test_evaluator = dict(ann_file={data + 'annotations/instances_val.json'!r})
ptq = dict(calib=dict(num_images=3, batch_size=1))
{extra}
""")
    return cfg


def _bits_of(run: Path, module: str) -> int:
    summary = json.loads((run / "quant_summary.json").read_text())
    return next(r["bits"] for r in summary["quantizers"] if r["module"] == module)


def test_ptq_end_to_end_and_reload(ptq_tool, demo_setup, tmp_path):
    cfg = _config(demo_setup)
    work = tmp_path / "run"
    head_bits = ["--cfg-options", "ptq.quant.head_bits=8"]  # the prediction layers at 8 bits
    assert ptq_tool.main([str(cfg), "--work-dir", str(work), *head_bits]) == 0
    res = json.loads((last_run_dir(work) / "ptq_results.json").read_text())
    assert res["task"] == "detection" and res["scope"] == "all"
    for part in ("fp", "quant"):
        assert {"coco/bbox_mAP", "coco/segm_mAP"} <= set(res[part])
    assert len(res["calib_indices"]) == 3 and all(0 <= i < 6 for i in res["calib_indices"])
    calib = json.loads((last_run_dir(work) / "calib_indices.json").read_text())
    assert calib["dataset"]["ann_file"] == "annotations/instances_train.json"
    summary = (last_run_dir(work) / "quant_summary.txt").read_text()
    for part in ("RoIAlign", "NMS", "LayerNorm", "Softmax", "GELU"):
        assert part in summary
    # a fresh detector loads the saved quantized model and scores the same
    again = tmp_path / "again"
    assert (
        ptq_tool.main(
            [
                str(cfg),
                "--work-dir",
                str(again),
                "--no-fp-eval",
                "--quantized",
                str(last_run_dir(work) / "quantized_model.pth"),
                *head_bits,
            ]
        )
        == 0
    )
    res2 = json.loads((last_run_dir(again) / "ptq_results.json").read_text())
    assert res2["quant"] == res["quant"]
    assert res2["quant_config"]["head_bits"] == 8  # rebuilt with the 8-bit prediction layers
    assert _bits_of(last_run_dir(work), "roi_head.bbox_head.fc_cls.weight_quantizer") == 8
    assert _bits_of(last_run_dir(work), "roi_head.bbox_head.shared_fcs.0.weight_quantizer") == 4


def test_subset_evaluation_uses_subset_annotations(ptq_tool, demo_setup, tmp_path):
    cfg = _config(demo_setup)
    work = tmp_path / "sub"
    assert (
        ptq_tool.main([str(cfg), "--work-dir", str(work), "--no-fp-eval", "--eval-images", "2"])
        == 0
    )
    assert json.loads((last_run_dir(work) / "ptq_results.json").read_text())["eval_images"] == 2
    resolved = Config.fromfile(last_run_dir(work) / "ptq_config.py")
    subset = json.loads(Path(resolved.test_evaluator.ann_file).read_text())
    assert resolved.test_dataloader.dataset.ann_file == resolved.test_evaluator.ann_file
    assert len(subset["images"]) == 2
    assert {a["image_id"] for a in subset["annotations"]} <= {im["id"] for im in subset["images"]}


@pytest.mark.parametrize(
    "extra, message",
    [
        (
            "test_dataloader = dict(dataset=dict(data_root='/nonexistent/coco/'))",
            "annotation file not found: /nonexistent/coco/annotations/instances_val.json",
        ),
        ("load_from = '/nonexistent/det.pth'", "checkpoint not found: /nonexistent/det.pth"),
        ("model = dict(backbone=dict(depths=[2, 2, 1]))", "does not match the model"),
        ("ptq = dict(scope='neck')", "found no supported transformer block"),
    ],
)
def test_bad_detection_inputs_fail_clearly(ptq_tool, demo_setup, tmp_path, capsys, extra, message):
    cfg = _config(demo_setup, "bad.py", extra)
    work = tmp_path / "bad"
    assert ptq_tool.main([str(cfg), "--work-dir", str(work)]) == 2
    assert message in capsys.readouterr().err
    assert not (work / "last_run").exists()  # no run finished


def test_whole_detector_reconstructed_in_forward_order(ptq_tool, demo_setup, tmp_path):
    """scope='all', non_block='parts' (the detection defaults): PatchMerging within the first
    level before the next stage, then the finer-to-coarser block levels, then the neck and the
    heads as one unit each; every quantized layer outside the blocks in exactly one unit."""
    cfg = _config(demo_setup)
    work = tmp_path / "pfcr"
    opts = ["ptq.method=pfcr", "ptq.recon.iters=2", "ptq.recon.batch_size=1"]
    opts.append("ptq.recon.outside_iters.roi_head.bbox_head=3")  # one part's steps by name
    argv = [str(cfg), "--work-dir", str(work), "--no-fp-eval", "--eval-images", "2"]
    assert ptq_tool.main([*argv, "--cfg-options", *opts]) == 0
    run = last_run_dir(work)
    recon = json.loads((run / "ptq_results.json").read_text())["recon"]
    log = json.loads((run / "recon" / "recon_log.json").read_text())
    outside_steps = {u["name"]: u["iters"] for u in log["units"] if u["level"] == -1}
    assert outside_steps.pop("roi_head.bbox_head") == 3 and set(outside_steps.values()) == {2}
    order = [(u["name"].removeprefix("backbone."), u["level"]) for u in log["units"]]
    stage = [
        (f"stages.{s}.blocks.{b}.{part}", 0)
        for s in range(3)
        for b in range(2)
        for part in ("attn", "mlp")
    ]
    assert order == [
        ("patch_embed.projection", -1),
        *stage[0:4],
        ("stages.0.downsample.reduction", -1),
        *stage[4:8],
        ("stages.1.downsample.reduction", -1),
        *stage[8:12],
        *[(f"stages.{s}.blocks.{b}", 1) for s in range(3) for b in range(2)],
        *[(f"stages.{s}.blocks.0..backbone.stages.{s}.blocks.1", 2) for s in range(3)],
        ("neck", -1),
        ("rpn_head", -1),
        ("roi_head.bbox_head", -1),
        ("roi_head.mask_head", -1),
    ]
    summary = json.loads((run / "quant_summary.json").read_text())
    quantized = {
        r["module"].removesuffix(".weight_quantizer")
        for r in summary["quantizers"]
        if r["kind"] == "weight"
    }
    outside = {m for m in quantized if ".blocks." not in m}
    in_units = [m for layers in recon["layer_units"].values() for m in layers]
    assert sorted(in_units) == sorted(outside) and recon["calib_only_layers"] == {}
    assert "roi_head.mask_head.conv_logits" in recon["layer_units"]["roi_head.mask_head"]
    # the heads' units learned from their cached inputs (no labels): their error went down
    heads = [u for u in log["units"] if u["name"].startswith(("rpn_head", "roi_head"))]
    assert sum(u["hard_after"] for u in heads) < sum(u["hard_before"] for u in heads)


def test_corrupt_calibration_image_is_named_before_the_fp_evaluation(
    ptq_tool, demo_setup, tmp_path, capsys
):
    data = tmp_path / "data"
    shutil.copytree(demo_setup / "data", data)
    image = sorted((data / "train").iterdir())[0]
    image.write_bytes(image.read_bytes()[:100])
    root = str(data) + "/"
    extra = f"ptq = dict(calib=dict(num_images=3, batch_size=1, dataset=dict(data_root={root!r})))"
    cfg = _config(demo_setup, "corrupt.py", extra)
    work = tmp_path / "work"
    assert ptq_tool.main([str(cfg), "--work-dir", str(work)]) == 2
    captured = capsys.readouterr()
    last = captured.err.strip().splitlines()[-1]
    assert last.startswith("error (ValueError): cannot read calibration image ")
    assert str(image) in last and last.endswith("replace or remove it")
    assert "coco/bbox_mAP" not in captured.out  # no evaluation ran
    assert not (work / "last_run").exists()
