"""The classification path end to end through tools/ptq.py, and its error messages."""

import hashlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from pfcr_mm.engine.run_dir import last_run_dir

ROOT = Path(__file__).resolve().parents[1]


def _results(run: Path) -> dict:
    """The ``ptq_results.json`` of the run folder ``run``."""
    return json.loads((run / "ptq_results.json").read_text())


@pytest.fixture(scope="module")
def three_runs(
    tmp_path_factory, ptq_tool, make_image_folder, write_vit_config, seed_and_one_thread
):
    """tools/ptq.py three times on one W4A4 config: a run with the FP evaluation, the same at
    W8A8 without it, and a second W4A4 run without it into the first run's work dir. A
    namespace: ``work`` (the shared work dir), ``first`` (the first run's folder),
    ``first_files`` (its files' bytes right after it ran), ``w8`` (the W8A8 run's folder)."""
    tmp = tmp_path_factory.mktemp("three_runs")
    make_image_folder(tmp / "data")
    cfg = str(write_vit_config(tmp))
    work, w8 = tmp / "work", tmp / "w8"
    with seed_and_one_thread():
        assert ptq_tool.main([cfg, "--work-dir", str(work)]) == 0
        first = last_run_dir(work)
        first_files = {p: p.read_bytes() for p in first.rglob("*") if p.is_file()}
        opts = ["--cfg-options", "ptq.quant.w_bits=8", "ptq.quant.a_bits=8"]
        assert ptq_tool.main([cfg, "--work-dir", str(w8), "--no-fp-eval", *opts]) == 0
        assert ptq_tool.main([cfg, "--work-dir", str(work), "--no-fp-eval"]) == 0
    return SimpleNamespace(work=work, first=first, first_files=first_files, w8=last_run_dir(w8))


@pytest.mark.slow
def test_results_record_the_run_and_its_settings(three_runs):
    res = _results(three_runs.first)
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


@pytest.mark.slow
def test_accuracies_count_the_12_val_images(three_runs):
    res = _results(three_runs.first)
    # 12 val images: accuracies are multiples of 100/12
    for v in (res["fp"]["accuracy/top1"], res["quant"]["accuracy/top1"]):
        assert abs(v * 12 / 100 - round(v * 12 / 100)) < 1e-6


@pytest.mark.slow
def test_output_error_over_the_val_images_and_the_held_out_ones(three_runs):
    res = _results(three_runs.first)
    assert len(res["calib_indices"]) == 5 and all(0 <= i < 12 for i in res["calib_indices"])
    error = res["output_error"]
    assert error["outputs"] == "logits" and error["images"] == 12
    assert 0 < error["relative_mse"] < 1
    # the held-out error: the 7 calibration-split images calibration did not see (of 12)
    heldout = res["heldout_error"]
    assert sorted(heldout["indices"] + res["calib_indices"]) == list(range(12))
    assert heldout["images"] == 7 and 0 < heldout["relative_mse"] < 1


@pytest.mark.slow
def test_w8a8_logits_are_much_closer_to_fp_than_w4a4_ones(three_runs):
    w4 = _results(three_runs.first)["output_error"]["relative_mse"]
    assert _results(three_runs.w8)["output_error"]["relative_mse"] < 0.2 * w4


@pytest.mark.slow
def test_quant_summary_lists_the_quantizers_and_what_stays_fp(three_runs):
    summary = json.loads((three_runs.first / "quant_summary.json").read_text())
    assert any(r["module"].endswith("attn.matmul_quant.probs") for r in summary["quantizers"])
    assert "LayerNorm" in summary["floating_point"]


@pytest.mark.slow
def test_a_second_run_writes_into_a_folder_of_its_own(three_runs):
    second = last_run_dir(three_runs.work)
    assert second != three_runs.first and second.parent == three_runs.work
    assert _results(second)["fp"] is None
    # the first run's files stay as they were
    first = three_runs.first
    assert {p: p.read_bytes() for p in first.rglob("*") if p.is_file()} == three_runs.first_files
    names = {p.name for p in second.iterdir() if p.is_file()}
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
        pytest.param(
            dict(
                extra="ptq = dict(method='pfcr', calib=dict(num_images=2), "
                "recon=dict(iters=2, max_level=9))"
            ),
            "max_level=9 is above this model's top level",
            marks=pytest.mark.slow,  # refused only after the calibration
        ),
    ],
)
def test_bad_configs_fail_clearly(
    ptq_tool, make_image_folder, write_vit_config, tmp_path, capsys, over, message
):
    make_image_folder(tmp_path / "data", per_class=1)
    cfg = write_vit_config(tmp_path, **over)
    work = tmp_path / "work"
    assert ptq_tool.main([str(cfg), "--work-dir", str(work)]) == 2
    assert message in capsys.readouterr().err
    assert not (work / "last_run").exists()  # no run finished


def test_empty_dataset_folder_fails_clearly(ptq_tool, write_vit_config, tmp_path, capsys):
    for split in ("train", "val"):
        (tmp_path / "data" / split / "a").mkdir(parents=True)
    cfg = write_vit_config(tmp_path)
    assert ptq_tool.main([str(cfg), "--work-dir", str(tmp_path / "w")]) == 2
    assert "no images" in capsys.readouterr().err


def test_hook_quantizes_before_a_stock_test_run(vit_config, tmp_path, monkeypatch):
    from mmengine.config import Config
    from mmengine.runner import Runner

    from pfcr_mm.quant.modules import QuantLinear

    cfg = Config.fromfile(vit_config)
    cfg.custom_hooks = [dict(type="pfcr.PFCRHook", ptq=cfg.pop("ptq"))]
    cfg.work_dir = str(tmp_path / "work")
    runner = Runner.from_cfg(cfg)
    # the thread rule of tools/ptq.py: OMP_NUM_THREADS, else 1, whatever the process had
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    torch.set_num_threads(2)
    metrics = runner.test()
    assert torch.get_num_threads() == 1
    assert set(metrics) == {"accuracy/top1", "accuracy/top5"}
    n_quant = sum(isinstance(m, QuantLinear) for m in runner.model.modules())
    assert n_quant == 2 * 4 + 1  # qkv, proj, fc1, fc2 per block and the head
    work = tmp_path / "work"
    assert (last_run_dir(work) / "quant_summary.json").exists() and (
        last_run_dir(work) / "quantized_model.pth"
    ).exists()
    assert (last_run_dir(work) / "ptq_config.py").exists()
    # the hook writes the results a tools/ptq.py run writes, without the FP evaluation
    res = _results(last_run_dir(work))
    assert res["fp"] is None and res["quant"] == metrics and res["method"] == "calib"
    assert res["threads"] == 1
    assert res["output_error"]["outputs"] == "logits" and 0 < res["output_error"]["relative_mse"]
    assert len(res["calib_indices"]) == 5


@pytest.fixture(scope="module")
def reloaded(tmp_path_factory, ptq_tool, make_image_folder, write_vit_config, seed_and_one_thread):
    """A W4A4 calib run of tools/ptq.py and a second run that evaluates the model it saved
    (``--quantized``), both without the FP evaluation. A namespace: ``cfg``, ``saved`` (the
    saved model's path), ``first`` and ``second`` (the two run folders)."""
    tmp = tmp_path_factory.mktemp("reloaded")
    make_image_folder(tmp / "data")
    cfg = write_vit_config(tmp)
    first, second = tmp / "first", tmp / "second"
    with seed_and_one_thread():
        assert ptq_tool.main([str(cfg), "--work-dir", str(first), "--no-fp-eval"]) == 0
        saved = last_run_dir(first) / "quantized_model.pth"
        argv = [str(cfg), "--work-dir", str(second), "--no-fp-eval", "--quantized", str(saved)]
        assert ptq_tool.main(argv) == 0
    return SimpleNamespace(
        cfg=cfg, saved=saved, first=last_run_dir(first), second=last_run_dir(second)
    )


@pytest.mark.slow
def test_saved_quantized_model_reloads_with_identical_metrics(reloaded):
    a, b = _results(reloaded.first), _results(reloaded.second)
    assert a["quant"] == b["quant"] and a["calib_indices"] == b["calib_indices"]


@pytest.mark.slow
@pytest.mark.parametrize(
    "options, message",
    [
        (["--eval-images", "0"], "--eval-images must be >= 1, got 0"),
        # the saved model is a calib one: evaluating it as pfcr would record the wrong method
        (
            ["--no-fp-eval", "--cfg-options", "ptq.method=pfcr"],
            "was quantized with ptq.method='calib', but the config says 'pfcr'",
        ),
        (
            ["--cfg-options", "ptq.quant.w_bits=3"],
            "was quantized with ptq.quant.w_bits=4, but the config says 3",
        ),
        # a calib model made with GPTQ (compensate "auto"), not the bias correction
        (
            ["--cfg-options", "ptq.recon.compensate=bias"],
            "was quantized with ptq.recon.compensate='gptq', but the config says 'bias'",
        ),
        # one whose attention products are renormalized (the base config's setting)
        (
            ["--cfg-options", "ptq.quant.post_softmax_renorm=False"],
            "was quantized with ptq.quant.post_softmax_renorm=True, but the config says False",
        ),
        # one made from other calibration images
        (
            ["--cfg-options", "ptq.calib.seed=1"],
            "ptq.calib.seed=0, but the config says 1 (1 setting(s) differ)",
        ),
    ],
)
def test_a_mismatching_reload_is_refused(reloaded, ptq_tool, tmp_path, capsys, options, message):
    work = tmp_path / "work"
    argv = [str(reloaded.cfg), "--work-dir", str(work), "--quantized", str(reloaded.saved)]
    assert ptq_tool.main([*argv, *options]) == 2
    assert message in capsys.readouterr().err
    assert not (work / "last_run").exists()  # no run finished


@pytest.mark.slow
def test_a_model_saved_before_the_bias_correction_existed_reloads(
    reloaded, ptq_tool, tmp_path, capsys
):
    payload = torch.load(reloaded.saved, weights_only=True)
    del payload["settings"]["recon"]  # what a calib model saved before held: no compensation,
    state = payload["state_dict"]  # and so no GPTQ correction in its state; nor the setting
    del payload["settings"]["quant"]["post_softmax_renorm"]  # of the renormalization (off)
    for key in [k for k in state if k.endswith("weight_correction")]:
        del state[key]
    older = tmp_path / "older.pth"
    torch.save(payload, older)
    argv = [str(reloaded.cfg), "--work-dir", str(tmp_path / "w"), "--no-fp-eval"]
    argv += ["--quantized", str(older)]
    # calib's default is GPTQ now, and the base config renormalizes: the command tells the user
    # how to evaluate the older model, both settings at once
    assert ptq_tool.main(argv) == 2
    options = ["ptq.quant.post_softmax_renorm=False", "ptq.recon.compensate=none"]
    assert f"pass --cfg-options {' '.join(options)} to evaluate it" in capsys.readouterr().err
    assert ptq_tool.main([*argv, "--cfg-options", *options]) == 0


@pytest.mark.slow
def test_the_saved_model_holds_4_bit_codes_its_settings_and_its_config(reloaded):
    payload = torch.load(reloaded.saved, weights_only=True)
    codes = payload["integer_weights"]["net.blocks.0.attn.qkv"]
    assert codes.dtype == torch.uint8 and int(codes.max()) <= 15
    assert payload["settings"]["calib"]["seed"] == 0
    # of the reconstruction settings a calib model records only the compensation ("auto": GPTQ)
    assert payload["settings"]["recon"] == {"compensate": "gptq"}
    assert payload["config_sha256"] == hashlib.sha256(payload["config"].encode()).hexdigest()


@pytest.mark.slow
def test_two_reloads_compute_bit_identical_outputs(reloaded, tmp_path):
    from mmengine.config import Config
    from mmengine.runner import Runner

    from pfcr_mm import PTQConfig
    from pfcr_mm.engine.saved_model import load_quantized_model

    outs = []
    for _ in range(2):
        c = Config.fromfile(reloaded.cfg)
        c.work_dir = str(tmp_path / "w")
        runner = Runner.from_cfg(c)
        load_quantized_model(runner, PTQConfig.from_dict(c.ptq), reloaded.saved)
        with torch.no_grad():
            outs.append(
                runner.model(torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1)))
            )
    assert torch.equal(outs[0], outs[1])


@pytest.mark.slow
@pytest.mark.parametrize("method", ["block", "pfcr"])
def test_reconstruction_methods_through_the_tool(ptq_tool, vit_config, tmp_path, method):
    cfg = vit_config
    work = tmp_path / method
    opts = [f"ptq.method={method}", "ptq.recon.iters=4", "ptq.recon.batch_size=2"]
    assert (
        ptq_tool.main([str(cfg), "--work-dir", str(work), "--no-fp-eval", "--cfg-options", *opts])
        == 0
    )
    res = _results(last_run_dir(work))
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
    assert _results(last_run_dir(again))["quant"] == res["quant"]
    assert res["recon"]["non_block"] == "calib" and res["recon"]["layer_units"] == {}
    assert res["recon"]["calib_only_layers"] == {
        "net.patch_embed.proj": "non_block='calib'",
        "net.head": "non_block='calib'",
    }
    assert res["recon"]["iterations"] == sum(iters)


@pytest.mark.slow
def test_layerwise_non_block_layers(ptq_tool, vit_config, tmp_path):
    cfg = vit_config
    work = tmp_path / "layerwise"
    opts = ["ptq.method=block", "ptq.recon.iters=4", "ptq.recon.non_block=layerwise"]
    assert (
        ptq_tool.main([str(cfg), "--work-dir", str(work), "--no-fp-eval", "--cfg-options", *opts])
        == 0
    )
    res = _results(last_run_dir(work))
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


def _plain_env() -> dict:
    """The environment without OMP_NUM_THREADS: as a user types the README's command."""
    return {k: v for k, v in os.environ.items() if k != "OMP_NUM_THREADS"}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _torchrun(cfg: Path, work: Path, *options: str) -> subprocess.CompletedProcess:
    """``tools/ptq.py CONFIG --launcher pytorch`` on 2 CPU processes (gloo), launched as a user
    would (torchrun gives each process OMP_NUM_THREADS=1)."""
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node=2",
        f"--master_port={_free_port()}",
        str(ROOT / "tools/ptq.py"),
        str(cfg),
        "--work-dir",
        str(work),
        "--launcher",
        "pytorch",
        *options,
    ]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=_plain_env())


@pytest.mark.slow
def test_two_gloo_processes_give_the_quantizers_and_metrics_of_one(ptq_tool, vit_config, tmp_path):
    """tools/ptq.py --launcher pytorch on 2 CPU processes (gloo): calibration split over the
    processes with pooled statistics, reconstruction on rank 0, evaluation split; the saved
    quantized model and the metrics equal those of the plain single-process command (both as a
    user starts them: the thread rule of tools/ptq.py makes them agree)."""
    cfg = vit_config
    opts = ["--cfg-options", "ptq.method=pfcr", "ptq.recon.iters=6", "ptq.recon.batch_size=2"]
    single, multi = tmp_path / "single", tmp_path / "multi"
    plain = [sys.executable, str(ROOT / "tools/ptq.py"), str(cfg), "--work-dir", str(single)]
    proc = subprocess.run([*plain, *opts], capture_output=True, text=True, env=_plain_env())
    assert proc.returncode == 0, proc.stderr[-4000:]
    proc = _torchrun(cfg, multi, *opts)
    assert proc.returncode == 0, proc.stderr[-4000:]
    a = _results(last_run_dir(single))
    b = _results(last_run_dir(multi))
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


@pytest.mark.slow
def test_a_failure_on_rank_0_stops_every_process(vit_config, tmp_path):
    """Rank 0's reconstruction fails (Adam refuses a NaN learning rate): rank 1, waiting for
    its result, is told and stops too, instead of waiting for the group's timeout."""
    cfg = vit_config
    opts = ["--cfg-options", "ptq.method=block", "ptq.recon.iters=2", "ptq.recon.w_lr=nan"]
    proc = _torchrun(cfg, tmp_path / "fail", "--no-fp-eval", *opts)
    assert proc.returncode != 0
    assert "reconstruction on rank 0 failed in process 0" in proc.stderr
    assert "Invalid learning rate" in proc.stderr
    assert not (tmp_path / "fail" / "last_run").exists()


def _process_without_torchrun(rank: int, cfg: Path, out: Path, port: int) -> subprocess.Popen:
    """Process ``rank`` of 2 of ``tools/ptq.py CONFIG --launcher pytorch``, started as Slurm or
    MPI start a process: no torchrun to stop the other one when one dies. A ``pfcr`` run with
    a 10 s process-group timeout and progress lines every 100 iterations, far from its end
    (20000); its output into ``out/<rank>.stdout`` and ``out/<rank>.stderr``."""
    env = {**_plain_env(), "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port),
           "RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": "2"}  # fmt: skip
    cmd = [sys.executable, str(ROOT / "tools/ptq.py"), str(cfg), "--work-dir", str(out / "work"),
           "--launcher", "pytorch", "--no-fp-eval", "--cfg-options", "ptq.method=pfcr",
           "ptq.recon.iters=20000", "ptq.recon.batch_size=2", "ptq.recon.log_every=100",
           "env_cfg.dist_cfg.timeout=10"]  # fmt: skip
    with open(out / f"{rank}.stdout", "w") as stdout, open(out / f"{rank}.stderr", "w") as err:
        return subprocess.Popen(cmd, env=env, stdout=stdout, stderr=err)


@pytest.mark.slow
@pytest.mark.parametrize(
    "sig, stopped, why",
    [
        (signal.SIGKILL, 1, "process 1 sent no heartbeat for "),
        (signal.SIGKILL, 0, "process 0 closed its connection: dead or killed"),
        (signal.SIGSTOP, 0, "process 0 sent no heartbeat for "),
    ],
    ids=["rank1_killed", "rank0_killed", "rank0_frozen"],
)
def test_a_process_that_stops_stops_the_other_in_one_line(vit_config, tmp_path, sig, stopped, why):
    """Two processes without torchrun; as rank 0 reconstructs alone (the other waiting for it),
    process ``stopped`` is killed or frozen (SIGSTOP): the other one stops within seconds of
    the 10 s timeout, instead of when the reconstruction ends or never, with one line naming
    the process and exit code 3, and no result is claimed."""
    port = _free_port()
    procs = [_process_without_torchrun(r, vit_config, tmp_path, port) for r in (0, 1)]
    survivor = procs[1 - stopped]
    try:
        deadline = time.time() + 300
        while " iter " not in (tmp_path / "0.stdout").read_text():  # rank 0 reconstructs
            assert all(p.poll() is None for p in procs), (tmp_path / "0.stderr").read_text()
            assert time.time() < deadline
            time.sleep(0.1)
        procs[stopped].send_signal(sig)
        start = time.time()
        assert survivor.wait(timeout=120) == 3
        seconds = time.time() - start
    finally:
        for p in procs:
            p.kill()
            p.wait()
    err = (tmp_path / f"{1 - stopped}.stderr").read_text()
    assert seconds < 40 and "Traceback" not in err, err[-3000:]
    lines = err.strip().splitlines()
    assert lines[-1].startswith(f"stopped ({why}") and lines[-1].endswith(
        ("run the command again", "with --resume to continue from there")
    ), lines[-3:]
    assert sum(line.startswith("stopped (") for line in lines) == 1
    work = tmp_path / "work"
    claimed = [*work.rglob("ptq_results.json"), *work.rglob("quantized_model.pth")]
    assert not claimed and not (work / "last_run").exists()
