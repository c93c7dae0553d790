"""The classification path end to end through tools/ptq.py, and its error messages."""

import hashlib
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from pfcr_mm.engine.run_dir import last_run_dir

ROOT = Path(__file__).resolve().parents[1]

ARCH = "vit_tiny_patch16_224"
KWARGS = dict(img_size=32, patch_size=8, embed_dim=48, depth=2, num_heads=3, num_classes=3)


def _make_folder(root: Path, per_class: int = 4, classes=("a", "b", "c")) -> None:
    rng = np.random.default_rng(0)
    for split in ("train", "val"):
        for c in classes:
            (root / split / c).mkdir(parents=True)
            for i in range(per_class):
                img = rng.integers(0, 255, (40, 36, 3), dtype=np.uint8)
                Image.fromarray(img).save(root / split / c / f"{i}.png")


def _write_config(tmp_path: Path, **over) -> Path:
    from pfcr_mm.engine.classification import create_timm_model

    ckpt = tmp_path / "tiny.pth"
    if not ckpt.exists():
        torch.save(create_timm_model(ARCH, KWARGS).state_dict(), ckpt)
    fields = dict(
        arch=repr(ARCH),
        kwargs=repr(KWARGS),
        ckpt=repr(str(ckpt)),
        data=repr(str(tmp_path / "data")),
        bits=4,
        extra="",
    )
    fields.update(over)
    cfg = tmp_path / "cfg.py"
    cfg.write_text(f"""
_base_ = [{str(ROOT / 'configs/_base_/imagenet_timm.py')!r}]
model = dict(arch={fields['arch']}, model_kwargs={fields['kwargs']}, checkpoint={fields['ckpt']})
test_dataloader = dict(batch_size=4, num_workers=0, dataset=dict(data_root={fields['data']},
                       resize=32, crop_size=32))
ptq = dict(quant=dict(w_bits={fields['bits']}, a_bits={fields['bits']}),
           calib=dict(num_images=5, batch_size=2, num_workers=0))
{fields['extra']}
""")
    return cfg


def test_ptq_tool_writes_results(ptq_tool, tmp_path):
    _make_folder(tmp_path / "data")
    cfg = _write_config(tmp_path)
    work = tmp_path / "work"
    assert ptq_tool.main([str(cfg), "--work-dir", str(work)]) == 0
    res = json.loads((last_run_dir(work) / "ptq_results.json").read_text())
    for key in (
        "task",
        "method",
        "w_bits",
        "a_bits",
        "scope",
        "fp",
        "quant",
        "calib_indices",
        "time_s",
        "peak_mem_mb",
        "versions",
    ):
        assert key in res
    assert res["task"] == "classification" and res["method"] == "calib"
    assert res["w_bits"] == res["a_bits"] == 4 and res["scope"] == "net"
    assert set(res["fp"]) == {"accuracy/top1", "accuracy/top5"}
    # 12 val images: accuracies are multiples of 100/12
    for v in (res["fp"]["accuracy/top1"], res["quant"]["accuracy/top1"]):
        assert abs(v * 12 / 100 - round(v * 12 / 100)) < 1e-6
    assert len(res["calib_indices"]) == 5 and all(0 <= i < 12 for i in res["calib_indices"])
    error = res["output_error"]
    assert error["outputs"] == "logits" and error["images"] == 12
    assert 0 < error["relative_mse"] < 1
    # the held-out error: the 7 calibration-split images calibration did not see (of 12)
    heldout = res["heldout_error"]
    assert sorted(heldout["indices"] + res["calib_indices"]) == list(range(12))
    assert heldout["images"] == 7 and 0 < heldout["relative_mse"] < 1
    # at W8A8 the logits are much closer to FP than at W4A4
    w8 = tmp_path / "w8"
    opts = ["--cfg-options", "ptq.quant.w_bits=8", "ptq.quant.a_bits=8"]
    assert ptq_tool.main([str(cfg), "--work-dir", str(w8), "--no-fp-eval", *opts]) == 0
    w8_error = json.loads((last_run_dir(w8) / "ptq_results.json").read_text())["output_error"][
        "relative_mse"
    ]
    assert w8_error < 0.2 * error["relative_mse"]
    summary = json.loads((last_run_dir(work) / "quant_summary.json").read_text())
    assert any(r["module"].endswith("attn.matmul_quant.probs") for r in summary["quantizers"])
    assert "LayerNorm" in summary["floating_point"]
    # a second run writes into a folder of its own; last_run moves to it; the first run's
    # files stay as they were
    first_run = last_run_dir(work)
    before = {p: p.read_bytes() for p in first_run.rglob("*") if p.is_file()}
    assert ptq_tool.main([str(cfg), "--work-dir", str(work), "--no-fp-eval"]) == 0
    assert last_run_dir(work) != first_run and last_run_dir(work).parent == work
    assert json.loads((last_run_dir(work) / "ptq_results.json").read_text())["fp"] is None
    assert {p: p.read_bytes() for p in first_run.rglob("*") if p.is_file()} == before
    names = {p.name for p in last_run_dir(work).iterdir() if p.is_file()}
    assert {
        "calib_indices.json",
        "ptq_config.py",
        "ptq_results.json",
        "quant_summary.json",
        "quant_summary.txt",
        "quantized_model.pth",
    } <= names
    assert not [n for n in names if n.startswith(".")]  # no temporary file left


@pytest.mark.parametrize(
    "over, message",
    [
        (dict(arch="'vit_tinyy_patch16_224'"), "unknown timm architecture 'vit_tinyy_patch16_224'"),
        (dict(ckpt="'/nonexistent/x.pth'"), "checkpoint not found: /nonexistent/x.pth"),
        (dict(bits=9), "w_bits: bits must be an integer from 2 to 8"),
        (dict(data="'/nonexistent/data'"), "ImageNet-layout"),
        (
            dict(extra="ptq = dict(quant=dict(wbits=4))"),
            "unknown ptq.quant setting(s) 'wbits' (did you mean 'w_bits'?)",
        ),
        (
            dict(
                kwargs="dict(img_size=32, patch_size=8, embed_dim=48, depth=3, num_heads=3, "
                "num_classes=3)"
            ),
            "does not match the model",
        ),
        # refused before the FP evaluation, not after it
        (
            dict(extra="ptq = dict(calib=dict(num_images=50))"),
            "ptq.calib.num_images=50, but the calibration split has",
        ),
        (
            dict(extra="ptq = dict(calib=dict(dataset=dict(split='val')))"),
            "selects the evaluation images themselves",
        ),
        (
            dict(
                extra="ptq = dict(method='pfcr', calib=dict(num_images=2), "
                "recon=dict(iters=2, max_level=9))"
            ),
            "max_level=9 is above this model's top level",
        ),
    ],
)
def test_bad_configs_fail_clearly(ptq_tool, tmp_path, capsys, over, message):
    _make_folder(tmp_path / "data", per_class=1)
    cfg = _write_config(tmp_path, **over)
    work = tmp_path / "work"
    assert ptq_tool.main([str(cfg), "--work-dir", str(work)]) == 2
    assert message in capsys.readouterr().err
    assert not (work / "last_run").exists()  # no run finished


def test_empty_dataset_folder_fails_clearly(ptq_tool, tmp_path, capsys):
    for split in ("train", "val"):
        (tmp_path / "data" / split / "a").mkdir(parents=True)
    cfg = _write_config(tmp_path)
    assert ptq_tool.main([str(cfg), "--work-dir", str(tmp_path / "w")]) == 2
    assert "no images" in capsys.readouterr().err


def test_hook_quantizes_before_a_stock_test_run(tmp_path):
    from mmengine.config import Config
    from mmengine.runner import Runner

    from pfcr_mm.quant.modules import QuantLinear

    _make_folder(tmp_path / "data")
    cfg = Config.fromfile(_write_config(tmp_path))
    cfg.custom_hooks = [dict(type="pfcr.PFCRHook", ptq=cfg.pop("ptq"))]
    cfg.work_dir = str(tmp_path / "work")
    runner = Runner.from_cfg(cfg)
    metrics = runner.test()
    assert set(metrics) == {"accuracy/top1", "accuracy/top5"}
    n_quant = sum(isinstance(m, QuantLinear) for m in runner.model.modules())
    assert n_quant == 2 * 4 + 1  # qkv, proj, fc1, fc2 per block and the head
    work = tmp_path / "work"
    assert (last_run_dir(work) / "quant_summary.json").exists() and (
        last_run_dir(work) / "quantized_model.pth"
    ).exists()
    assert (last_run_dir(work) / "ptq_config.py").exists()
    # the hook writes the results a tools/ptq.py run writes, without the FP evaluation
    res = json.loads((last_run_dir(work) / "ptq_results.json").read_text())
    assert res["fp"] is None and res["quant"] == metrics and res["method"] == "calib"
    assert res["output_error"]["outputs"] == "logits" and 0 < res["output_error"]["relative_mse"]
    assert len(res["calib_indices"]) == 5


def test_saved_quantized_model_reloads_with_identical_metrics(ptq_tool, tmp_path, capsys):
    _make_folder(tmp_path / "data")
    cfg = _write_config(tmp_path)
    first, second = tmp_path / "first", tmp_path / "second"
    assert ptq_tool.main([str(cfg), "--work-dir", str(first), "--no-fp-eval"]) == 0
    saved = last_run_dir(first) / "quantized_model.pth"
    assert (
        ptq_tool.main(
            [str(cfg), "--work-dir", str(second), "--no-fp-eval", "--quantized", str(saved)]
        )
        == 0
    )
    a = json.loads((last_run_dir(first) / "ptq_results.json").read_text())
    b = json.loads((last_run_dir(second) / "ptq_results.json").read_text())
    assert a["quant"] == b["quant"] and a["calib_indices"] == b["calib_indices"]
    # the saved model is a calib one: evaluating it as pfcr would record the wrong method
    third = tmp_path / "third"
    argv = [str(cfg), "--work-dir", str(third), "--quantized", str(saved), "--eval-images", "0"]
    assert ptq_tool.main(argv) == 2
    assert "--eval-images must be >= 1, got 0" in capsys.readouterr().err
    argv = argv[:-2] + ["--no-fp-eval", "--cfg-options", "ptq.method=pfcr"]
    assert ptq_tool.main(argv) == 2
    assert "was quantized with ptq.method='calib', but the config says 'pfcr'" in (
        capsys.readouterr().err
    )
    assert not (third / "last_run").exists()  # no run finished
    payload = torch.load(saved, weights_only=True)
    codes = payload["integer_weights"]["net.blocks.0.attn.qkv"]
    assert codes.dtype == torch.uint8 and int(codes.max()) <= 15
    # two reloads compute bit-identical outputs
    from mmengine.config import Config
    from mmengine.runner import Runner

    from pfcr_mm import PTQConfig
    from pfcr_mm.engine.saved_model import load_quantized_model

    outs = []
    for _ in range(2):
        c = Config.fromfile(cfg)
        c.work_dir = str(tmp_path / "w")
        runner = Runner.from_cfg(c)
        load_quantized_model(runner, PTQConfig.from_dict(c.ptq), saved)
        with torch.no_grad():
            outs.append(
                runner.model(torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1)))
            )
    assert torch.equal(outs[0], outs[1])
    # a mismatching setting is refused
    assert (
        ptq_tool.main(
            [
                str(cfg),
                "--work-dir",
                str(second),
                "--quantized",
                str(saved),
                "--cfg-options",
                "ptq.quant.w_bits=3",
            ]
        )
        == 2
    )
    assert "was quantized with ptq.quant.w_bits=4, but the config says 3" in (
        capsys.readouterr().err
    )
    # so is one made from other calibration images
    argv = [str(cfg), "--work-dir", str(second), "--quantized", str(saved)]
    assert ptq_tool.main([*argv, "--cfg-options", "ptq.calib.seed=1"]) == 2
    assert "ptq.calib.seed=0, but the config says 1 (1 setting(s) differ)" in (
        capsys.readouterr().err
    )
    assert payload["settings"]["calib"]["seed"] == 0 and "recon" not in payload["settings"]
    assert payload["config_sha256"] == hashlib.sha256(payload["config"].encode()).hexdigest()


@pytest.mark.parametrize("method", ["block", "pfcr"])
def test_reconstruction_methods_through_the_tool(ptq_tool, tmp_path, method):
    _make_folder(tmp_path / "data")
    cfg = _write_config(tmp_path)
    work = tmp_path / method
    opts = [f"ptq.method={method}", "ptq.recon.iters=4", "ptq.recon.batch_size=2"]
    assert (
        ptq_tool.main([str(cfg), "--work-dir", str(work), "--no-fp-eval", "--cfg-options", *opts])
        == 0
    )
    res = json.loads((last_run_dir(work) / "ptq_results.json").read_text())
    assert res["method"] == method
    log = json.loads((last_run_dir(work) / "recon" / "recon_log.json").read_text())
    records = log["units"]
    iters = [r["iters"] for r in records]
    # the same budget (4 iterations x 2 blocks) however it is spread
    if method == "block":
        assert [r["level"] for r in records] == [1, 1] and iters == [4, 4]
    else:
        assert sorted({r["level"] for r in records}) == [0, 1, 2]
        assert sum(iters) == pytest.approx(8, abs=3)
    assert (last_run_dir(work) / "recon" / "recon_loss.png").stat().st_size > 0
    # a saved reconstructed model reloads with the same metrics
    again = tmp_path / f"{method}_again"
    assert (
        ptq_tool.main(
            [
                str(cfg),
                "--work-dir",
                str(again),
                "--no-fp-eval",
                "--cfg-options",
                *opts,
                "--quantized",
                str(last_run_dir(work) / "quantized_model.pth"),
            ]
        )
        == 0
    )
    assert (
        json.loads((last_run_dir(again) / "ptq_results.json").read_text())["quant"] == res["quant"]
    )
    assert res["recon"]["non_block"] == "calib" and res["recon"]["layer_units"] == {}
    assert res["recon"]["calib_only_layers"] == {
        "net.patch_embed.proj": "non_block='calib'",
        "net.head": "non_block='calib'",
    }
    assert res["recon"]["iterations"] == sum(iters)


def test_layerwise_non_block_layers(ptq_tool, tmp_path):
    _make_folder(tmp_path / "data")
    cfg = _write_config(tmp_path)
    work = tmp_path / "layerwise"
    opts = ["ptq.method=block", "ptq.recon.iters=4", "ptq.recon.non_block=layerwise"]
    assert (
        ptq_tool.main([str(cfg), "--work-dir", str(work), "--no-fp-eval", "--cfg-options", *opts])
        == 0
    )
    res = json.loads((last_run_dir(work) / "ptq_results.json").read_text())
    assert res["recon"]["layer_units"] == {
        "net.patch_embed.proj": ["net.patch_embed.proj"],
        "net.head": ["net.head"],
    }
    assert res["recon"]["calib_only_layers"] == {}
    log = json.loads((last_run_dir(work) / "recon" / "recon_log.json").read_text())
    # the patch embedding before the blocks, the head after them, each with `iters` iterations
    assert [(u["name"], u["level"], u["iters"]) for u in log["units"]] == [
        ("net.patch_embed.proj", -1, 4),
        ("blocks.0", 1, 4),
        ("blocks.1", 1, 4),
        ("net.head", -1, 4),
    ]
    bad = tmp_path / "bad"
    opts[-1] = "ptq.recon.non_block=everything"
    assert ptq_tool.main([str(cfg), "--work-dir", str(bad), "--cfg-options", *opts]) == 2


def _torchrun(cfg: Path, work: Path, *options: str) -> subprocess.CompletedProcess:
    """``tools/ptq.py CONFIG --launcher pytorch`` on 2 CPU processes (gloo)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node=2",
        f"--master_port={port}",
        str(ROOT / "tools/ptq.py"),
        str(cfg),
        "--work-dir",
        str(work),
        "--launcher",
        "pytorch",
        *options,
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env)


def test_two_gloo_processes_give_the_quantizers_and_metrics_of_one(ptq_tool, tmp_path):
    """tools/ptq.py --launcher pytorch on 2 CPU processes (gloo): calibration split over the
    processes with pooled statistics, reconstruction on rank 0, evaluation split; the saved
    quantized model and the metrics equal a single-process run's."""
    _make_folder(tmp_path / "data")
    cfg = _write_config(tmp_path)
    opts = ["--cfg-options", "ptq.method=pfcr", "ptq.recon.iters=6", "ptq.recon.batch_size=2"]
    single, multi = tmp_path / "single", tmp_path / "multi"
    assert ptq_tool.main([str(cfg), "--work-dir", str(single), *opts]) == 0
    proc = _torchrun(cfg, multi, *opts)
    assert proc.returncode == 0, proc.stderr[-4000:]
    a = json.loads((last_run_dir(single) / "ptq_results.json").read_text())
    b = json.loads((last_run_dir(multi) / "ptq_results.json").read_text())
    assert b["fp"] == a["fp"] and b["quant"] == a["quant"]
    assert b["output_error"] == a["output_error"]
    assert b["calib_indices"] == a["calib_indices"] and len(a["calib_indices"]) == 5
    assert b["recon"]["units"] == a["recon"]["units"] == 7
    sa = torch.load(last_run_dir(single) / "quantized_model.pth", weights_only=True)["state_dict"]
    sb = torch.load(last_run_dir(multi) / "quantized_model.pth", weights_only=True)["state_dict"]
    assert sa.keys() == sb.keys()
    tensors = [k for k in sa if isinstance(sa[k], torch.Tensor)]
    assert any(k.endswith("input_quantizer.scale") for k in tensors)
    assert any(k.endswith("weight_quantizer.alpha") for k in tensors)  # reconstructed
    assert all(torch.equal(sa[k], sb[k]) for k in tensors)


def test_a_failure_on_rank_0_stops_every_process(tmp_path):
    """Rank 0's reconstruction fails (Adam refuses a NaN learning rate): rank 1, waiting for
    its result, is told and stops too, instead of waiting for the group's timeout."""
    _make_folder(tmp_path / "data")
    cfg = _write_config(tmp_path)
    opts = ["--cfg-options", "ptq.method=block", "ptq.recon.iters=2", "ptq.recon.w_lr=nan"]
    proc = _torchrun(cfg, tmp_path / "fail", "--no-fp-eval", *opts)
    assert proc.returncode != 0
    assert "reconstruction on rank 0 failed in process 0" in proc.stderr
    assert "Invalid learning rate" in proc.stderr
    assert not (tmp_path / "fail" / "last_run").exists()
