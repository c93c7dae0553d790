"""Bad inputs on the demo models: each ends tools/ptq.py with exit code 2 and a one-line
message saying what is wrong, before the FP evaluation, and changes no earlier output.

One good run of the demo ViT (its committed checkpoint, a few generated demo images) fills the
work dir first; every case then runs into the same work dir."""

import json
import math
import shutil
from pathlib import Path

import pytest
import torch

from pfcr_mm.demo.shapes import generate_shapes_dataset
from pfcr_mm.engine.run_dir import last_run_dir

# every test needs the good run of tools/ptq.py, and runs it again
pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]
DEMO_VIT = ROOT / "configs/demo/demo_vit_shapes_w4a4.py"
DEMO_CKPT = ROOT / "checkpoints/demo_vit_shapes.pth"


@pytest.fixture(scope="module")
def demo(tmp_path_factory, ptq_tool):
    """The demo data (2 train and 2 val images per class), a config of the demo ViT on it, and
    a work dir holding one good run, given the demo ViT's checkpoint as CHECKPOINT."""
    tmp = tmp_path_factory.mktemp("bad_inputs")
    generate_shapes_dataset(tmp / "data", train_per_class=2, val_per_class=2)
    cfg = _config(tmp, "model = dict(checkpoint=None)", "good.py")
    assert ptq_tool.main([str(cfg), str(DEMO_CKPT), "--work-dir", str(tmp / "work")]) == 0
    return tmp


def _files(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in folder.rglob("*") if p.is_file()}


@pytest.fixture(scope="module")
def earlier_outputs(demo):
    """Every file in the work dir after the good run: the files no bad run may change."""
    return _files(demo / "work")


def test_the_demo_checkpoint_as_checkpoint_argument(demo):
    """The timm state dict given as CHECKPOINT loads into the classifier (the FP model is the
    trained one: 20 val images, random weights would score about 10 %)."""
    results = json.loads((last_run_dir(demo / "work") / "ptq_results.json").read_text())
    assert results["fp"]["accuracy/top1"] >= 80


def _config(tmp: Path, extra: str = "", name: str = "cfg.py") -> Path:
    cfg = tmp / name
    cfg.write_text(f"""
_base_ = [{str(DEMO_VIT)!r}]
model = dict(checkpoint={str(DEMO_CKPT)!r})
test_dataloader = dict(batch_size=20, dataset=dict(data_root={str(tmp / 'data')!r}))
ptq = dict(calib=dict(num_images=4, batch_size=4, heldout_images=2))
{extra}
""")
    return cfg


def _damaged_checkpoint(tmp: Path, size: float) -> str:
    """The demo checkpoint cut to ``size`` of its bytes."""
    data = DEMO_CKPT.read_bytes()
    path = tmp / f"cut_{size}.pth"
    path.write_bytes(data[: int(len(data) * size)])
    return str(path)


def _other_models_saved_model(tmp: Path) -> str:
    """A saved quantized model (as tools/ptq.py writes one) of a detector's tensors."""
    saved = torch.load(_saved_model(tmp), weights_only=True)
    saved["state_dict"] = {"backbone.patch_embed.projection.weight": torch.zeros(3)}
    path = tmp / "detector_quantized_model.pth"
    torch.save(saved, path)
    return str(path)


def _foreign_resume_run(tmp: Path) -> str:
    """A run folder whose ``recon/resume.pth`` holds a tensor, not a resume checkpoint."""
    run = tmp / "foreign_run"
    (run / "recon").mkdir(parents=True, exist_ok=True)
    torch.save(torch.zeros(3), run / "recon" / "resume.pth")
    return str(run)


def _corrupt_calibration_image(tmp: Path) -> str:
    """A copy of the demo data whose train images are cut to 100 bytes."""
    data = tmp / "corrupt"
    if not data.exists():
        shutil.copytree(tmp / "data", data)
        for png in (data / "train").rglob("*.png"):
            png.write_bytes(png.read_bytes()[:100])
    return str(data)


def _nan_checkpoint(tmp: Path) -> str:
    state = torch.load(DEMO_CKPT, weights_only=True)
    state["blocks.3.mlp.fc1.weight"][0, 0] = math.nan
    path = tmp / "nan.pth"
    torch.save(state, path)
    return str(path)


def _other_classes(tmp: Path) -> str:
    data = tmp / "other_classes"
    if not data.exists():
        shutil.copytree(tmp / "data", data)
        (data / "train" / "circle").rename(data / "train" / "disc")
    return str(data)


# (case id, config lines, command-line arguments, message fragment); the lines and the arguments
# may be functions of the tmp folder that give them
CASES = [
    (
        "top_level_typo",
        "load_form = 'x.pth'",
        [],
        "unknown top-level config key 'load_form' " "(did you mean 'load_from'?)",
    ),
    (
        "ptq_typo",
        "ptq = dict(recon=dict(iter=3))",
        [],
        "unknown ptq.recon setting(s) 'iter' " "(did you mean 'iters'?)",
    ),
    (
        "cfg_option_below_a_number",
        "ptq = dict(recon=dict(outside_iters=30))",
        ["--cfg-options", "ptq.recon.outside_iters.neck=60"],
        "--cfg-options: outside_iters={'neck': 60} in child config cannot inherit",
    ),
    (
        "model_field_typo",
        "model = dict(model_kwarg=dict())",
        [],
        "unknown model setting(s) 'model_kwarg' (did you mean 'model_kwargs'?)",
    ),
    (
        "dataset_field_typo",
        "test_dataloader = dict(dataset=dict(crop=32))",
        [],
        "unknown test_dataloader.dataset setting(s) 'crop' (did you mean 'crop_size'?)",
    ),
    (
        "calib_dataset_typo",
        "ptq = dict(calib=dict(dataset=dict(splt='train')))",
        [],
        "unknown ptq.calib.dataset setting(s) 'splt' (did you mean 'split'?)",
    ),
    (
        "model_kwargs_typo",
        "model = dict(model_kwargs=dict(embed_dims=96))",
        [],
        "model.model_kwargs do not fit timm vit_tiny_patch16_224",
    ),
    (
        "recon_iters_type",
        "",
        ["--cfg-options", "ptq.recon.iters=abc"],
        "ptq.recon.iters must be int, got 'abc'",
    ),
    ("no_checkpoint", "model = dict(checkpoint=None)", [], "no checkpoint: pass CHECKPOINT"),
    (
        "nan_weights",
        lambda tmp: f"model = dict(checkpoint={_nan_checkpoint(tmp)!r})",
        [],
        "parameter blocks.3.mlp.fc1.weight holds NaN or Inf values",
    ),
    (
        "class_lists_differ",
        lambda tmp: f"test_dataloader = dict(dataset=dict(data_root={_other_classes(tmp)!r}))",
        [],
        "different class lists (only in calibration: ['disc'], only in evaluation: ['circle'])",
    ),
    ("eval_images_zero", "", ["--eval-images", "0"], "--eval-images must be >= 1, got 0"),
    ("eval_images_classifier", "", ["--eval-images", "5"], "applies to COCO detection configs"),
    (
        "missing_checkpoint_file",
        "model = dict(checkpoint='/nonexistent/vit.pth')",
        [],
        "checkpoint not found: /nonexistent/vit.pth",
    ),
    ("missing_quantized_file", "", ["--quantized", "/nonexistent/q.pth"], "not found"),
    (
        "checkpoint_is_a_folder",
        lambda tmp: f"load_from = {str(tmp / 'data')!r}",
        [],
        "data (the config's load_from) is a folder: pass the file itself",
    ),
    (
        "work_dir_is_a_file",
        "",
        lambda tmp: ["--work-dir", str(DEMO_CKPT)],
        "demo_vit_shapes.pth is a file: pass --work-dir a folder",
    ),
    (
        "quantized_model_of_another_model",
        "",
        lambda tmp: ["--quantized", _other_models_saved_model(tmp)],
        "holds another model: 80 of the 80 tensors of this config's model are not in it",
    ),
    (
        "resume_file_of_another_kind",
        "",
        lambda tmp: ["--resume", _foreign_resume_run(tmp), "--cfg-options", "ptq.method=pfcr"],
        "is not a resume checkpoint written by tools/ptq.py (it holds Tensor)",
    ),
    (
        "quantized_under_other_settings",
        "",
        lambda tmp: [
            "--quantized",
            str(last_run_dir(tmp / "work") / "quantized_model.pth"),
            "--cfg-options",
            "ptq.quant.a_bits=8",
        ],
        "was quantized with ptq.quant.a_bits=4, but the config says 8",
    ),
    (
        "quantized_under_other_method",
        "",
        lambda tmp: [
            "--quantized",
            str(last_run_dir(tmp / "work") / "quantized_model.pth"),
            "--cfg-options",
            "ptq.method=pfcr",
        ],
        "was quantized with ptq.method='calib', but the config says 'pfcr'",
    ),
    ("bits_out_of_range", "", ["--cfg-options", "ptq.quant.w_bits=9"], "bits must be an integer"),
    (
        "dataloader_key_typo",
        "",
        ["--cfg-options", "test_dataloader.batch_sze=2"],
        "'batch_sze' (did you mean 'batch_size'?)",
    ),
    (
        "num_images_above_split",
        "",
        ["--cfg-options", "ptq.calib.num_images=500"],
        "ptq.calib.num_images=500, but the calibration split has 20 images",
    ),
    (
        "calibration_on_evaluation_split",
        "",
        ["--cfg-options", "ptq.calib.dataset.split=val"],
        "selects the evaluation images themselves",
    ),
    (
        "max_level_above_top",
        "",
        ["--cfg-options", "ptq.method=pfcr", "ptq.recon.max_level=9"],
        "max_level=9 is above this model's top level",
    ),
    (
        "negative_cache_limit",
        "",
        ["--cfg-options", "ptq.method=pfcr", "ptq.recon.cache_limit_gb=-1"],
        "ptq.recon.cache.limit_gb must be a number >= 0 or None, got -1",
    ),
    ("missing_split", "", ["--cfg-options", "ptq.calib.dataset.split=training"], "split folder"),
    (
        "process_group_timeout_zero",
        "",
        ["--launcher", "pytorch", "--cfg-options", "env_cfg.dist_cfg.timeout=0"],
        "env_cfg.dist_cfg.timeout must be a number of seconds > 0, got 0",
    ),
    (
        "empty_checkpoint",
        lambda tmp: f"model = dict(checkpoint={_damaged_checkpoint(tmp, 0)!r})",
        [],
        "cut_0.pth (0 bytes; EOFError): the file is empty, truncated or not a checkpoint",
    ),
    (
        "truncated_checkpoint",
        lambda tmp: f"model = dict(checkpoint={_damaged_checkpoint(tmp, 0.5)!r})",
        [],
        "failed reading zip archive: failed finding central directory): the file is empty",
    ),
    (
        "corrupt_calibration_image",
        lambda tmp: "ptq = dict(calib=dict(num_images=4, dataset=dict(split='train', "
        f"data_root={_corrupt_calibration_image(tmp)!r})))",
        [],
        "cannot read image ",
    ),
]


@pytest.mark.parametrize("extra, args, message", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_bad_input_exits_2_with_one_line(
    ptq_tool, demo, earlier_outputs, capsys, extra, args, message
):
    extra = extra(demo) if callable(extra) else extra
    args = args(demo) if callable(args) else args
    cfg = _config(demo, extra, "bad.py")
    work = demo / "work"
    assert ptq_tool.main([str(cfg), "--work-dir", str(work), *args]) == 2
    now = _files(work)
    assert {k: now.get(k) for k in earlier_outputs} == earlier_outputs  # nothing earlier changed
    new = sorted(set(now) - set(earlier_outputs))
    assert not new, new  # refused before any work: nothing written
    err = capsys.readouterr().err.strip().splitlines()
    # the last line of stderr, whole (MMEngine's log lines may come before it)
    assert err[-1].startswith("error (") and message in err[-1], err[-3:]
    assert sum(line.startswith("error (") for line in err) == 1


def _saved_model(tmp: Path, size: float = 1.0) -> str:
    """The good run's quantized model, cut to ``size`` of its bytes."""
    saved = last_run_dir(tmp / "work") / "quantized_model.pth"
    if size == 1.0:
        return str(saved)
    path = tmp / f"quantized_cut_{size}.pth"
    data = saved.read_bytes()
    path.write_bytes(data[: int(len(data) * size)])
    return str(path)


@pytest.mark.parametrize(
    "args, message",
    [
        (
            lambda tmp: ["--quantized", _saved_model(tmp), "--cfg-options", "ptq.quant.a_bits=8"],
            "was quantized with ptq.quant.a_bits=4, but the config says 8",
        ),
        (
            lambda tmp: ["--quantized", _saved_model(tmp, 0.5)],
            "the file is empty, truncated or not a checkpoint",
        ),
    ],
    ids=["other_settings", "truncated"],
)
def test_a_saved_model_is_refused_before_the_fp_evaluation(
    ptq_tool, demo, capsys, monkeypatch, args, message
):
    from mmengine.runner.loops import TestLoop

    evaluated = []  # the FP evaluation is the test loop's own run
    monkeypatch.setattr(TestLoop, "run", lambda self: evaluated.append(self) or {})
    cfg = _config(demo, "", "bad.py")
    assert ptq_tool.main([str(cfg), "--work-dir", str(demo / "work"), *args(demo)]) == 2
    assert evaluated == []
    assert message in capsys.readouterr().err.strip().splitlines()[-1]


def test_a_full_disk_while_saving_ends_in_one_line(
    ptq_tool, demo, earlier_outputs, capsys, monkeypatch
):
    """torch.save on a full device raises ``RuntimeError: ... unexpected pos``: the run ends
    with exit code 2 and one line naming the file and the space left (injected here)."""
    import shutil

    real_save = torch.save

    def save_on_a_full_disk(obj, f, *args, **kwargs):
        if "quantized_model" not in str(f):
            return real_save(obj, f, *args, **kwargs)
        Path(f).write_bytes(b"x" * 1000)
        raise RuntimeError("[enforce fail at inline_container.cc:672] unexpected pos")

    usage = shutil.disk_usage(demo)
    monkeypatch.setattr(torch, "save", save_on_a_full_disk)
    monkeypatch.setattr(shutil, "disk_usage", lambda p: usage._replace(free=0))
    cfg = _config(demo, "", "full.py")
    assert ptq_tool.main([str(cfg), "--work-dir", str(demo / "work"), "--no-fp-eval"]) == 2
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert last.startswith("error (DiskFullError): no space left to write "), last
    assert "quantized_model.pth: 0 bytes free on its device, the file had reached 1000" in last
    now = _files(demo / "work")
    assert {k: now.get(k) for k in earlier_outputs} == earlier_outputs
    assert not [k for k in now if ".tmp" in k]  # no temporary left behind


def test_a_read_only_work_dir_is_refused_before_anything_is_built(
    ptq_tool, demo, capsys, monkeypatch
):
    import os

    from mmengine.runner import Runner

    read_only = demo / "read_only"
    read_only.mkdir(exist_ok=True)
    access = os.access  # a read-only mount, as access(2) reports one (root writes anywhere else)
    monkeypatch.setattr(os, "access", lambda p, mode: p != read_only and access(p, mode))
    monkeypatch.setattr(Runner, "__init__", lambda *a, **k: pytest.fail("a Runner was built"))
    cfg = _config(demo, "", "ro.py")
    assert ptq_tool.main([str(cfg), "--work-dir", str(read_only / "work")]) == 2
    assert capsys.readouterr().err.strip().splitlines()[-1] == (
        f"error (ValueError): cannot write into {read_only / 'work'} ({read_only} is not "
        "writable): give --work-dir a writable folder"
    )
    assert not (read_only / "work").exists()
