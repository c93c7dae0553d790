"""``tools/ptq.py --resume``: a run stopped during reconstruction continues from its last finished
unit and ends exactly where an uninterrupted run ends; a changed config is refused."""

import contextlib
import copy
import io
import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

import pfcr_mm.recon.driver as driver_module
from pfcr_mm import PTQConfig, QuantConfig, ReconSettings, ResumeState, quantize
from pfcr_mm.engine.resume import RESUME_FILE
from pfcr_mm.engine.run_dir import last_run_dir

# pfcr on the tiny ViT (2 blocks), every layer outside the blocks reconstructed, the
# detection-aware term on: 9 units (patch embedding, 4 MHSA/MLP, 2 blocks, the encoder, head)
OPTIONS = [
    "ptq.method=pfcr",
    "ptq.recon.iters=4",
    "ptq.recon.batch_size=2",
    "ptq.recon.non_block=layerwise",
    "ptq.recon.downstream_weight=1",
]
UNITS = 9
STOP_AFTER = 6  # the patch embedding, level 0 and the first block: mid-level
ROOT = Path(__file__).resolve().parents[1]

# tools/ptq.py in a process of its own that SIGKILLs itself as unit `stop` starts
KILLED_RUN = textwrap.dedent(
    """
    import os, signal, sys
    import pfcr_mm.recon.driver as driver

    stop, tool = int(sys.argv[1]), sys.argv[2]
    real, started = driver.reconstruct_unit, []

    def reconstruct(unit, *args, **kwargs):
        started.append(unit.name)
        if len(started) == stop:
            os.kill(os.getpid(), signal.SIGKILL)
        return real(unit, *args, **kwargs)

    driver.reconstruct_unit = reconstruct
    sys.argv = sys.argv[2:]  # tools/ptq.py CONFIG ...
    exec(open(tool).read(), {"__name__": "__main__", "__file__": tool})
    """
)


def _argv(cfg, work, options=OPTIONS) -> list[str]:
    return [str(cfg), "--work-dir", str(work), "--no-fp-eval", "--cfg-options", *options]


def _run(ptq_tool, cfg, work, *extra: str, options=OPTIONS) -> int:
    return ptq_tool.main([*_argv(cfg, work, options), *extra])


@pytest.fixture(scope="module")
def stopped(tmp_path_factory, ptq_tool, make_image_folder, write_vit_config, seed_and_one_thread):
    """An uninterrupted run of tools/ptq.py, and the same run in a process of its own that is
    SIGKILLed as unit ``STOP_AFTER + 1`` starts. A namespace: ``cfg``, ``whole`` (the
    uninterrupted run's folder), ``work`` (the killed run's work dir), ``run`` (its run
    folder) and ``records`` (the unit records it saved to resume from)."""
    tmp = tmp_path_factory.mktemp("resume")
    make_image_folder(tmp / "data")
    cfg = write_vit_config(tmp)
    whole, work = tmp / "whole", tmp / "stopped"
    with seed_and_one_thread():
        assert _run(ptq_tool, cfg, whole) == 0
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    killed = subprocess.run(
        [sys.executable, "-c", KILLED_RUN, str(STOP_AFTER + 1), str(ROOT / "tools/ptq.py")]
        + _argv(cfg, work),
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]
    (run,) = [p for p in work.iterdir() if (p / RESUME_FILE).is_file()]
    records = torch.load(run / RESUME_FILE, weights_only=True)["records"]
    return SimpleNamespace(cfg=cfg, whole=last_run_dir(whole), work=work, run=run, records=records)


@pytest.fixture(scope="module")
def resumed(stopped, ptq_tool, seed_and_one_thread):
    """``stopped``'s run resumed by tools/ptq.py --resume. A namespace: ``exit_code``,
    ``started`` (the names of the units it reconstructed) and ``out`` (what it printed)."""
    started, real = [], driver_module.reconstruct_unit

    def reconstruct(unit, *args, **kwargs):
        started.append(unit.name)
        return real(unit, *args, **kwargs)

    # MMEngine names a Runner's logger by the second it was built in, and a Runner of the same
    # second reuses that logger and its output stream (an earlier test's capture): start in a
    # second of our own, so that the resumed run's log goes to `out`
    time.sleep(1 - time.time() % 1)
    out = io.StringIO()
    with seed_and_one_thread(), pytest.MonkeyPatch.context() as mp, contextlib.redirect_stdout(out):
        mp.setattr(driver_module, "reconstruct_unit", reconstruct)
        exit_code = _run(ptq_tool, stopped.cfg, stopped.work, "--resume")
    return SimpleNamespace(exit_code=exit_code, started=started, out=out.getvalue())


@pytest.mark.slow
def test_a_killed_run_saved_the_units_it_finished(stopped):
    assert len(stopped.records) == STOP_AFTER and not (stopped.work / "last_run").exists()


def test_nothing_to_resume_without_a_stopped_run(ptq_tool, vit_config, tmp_path, capsys):
    assert _run(ptq_tool, vit_config, tmp_path / "empty", "--resume") == 2
    assert "nothing to resume in" in capsys.readouterr().err


@pytest.mark.slow
def test_a_changed_setting_is_refused_naming_its_key(stopped, ptq_tool, tmp_path, capsys):
    work = shutil.copytree(stopped.work, tmp_path / "stopped")  # the stopped run stays as it is
    changed = [*OPTIONS[:1], "ptq.recon.iters=5", *OPTIONS[2:]]
    assert _run(ptq_tool, stopped.cfg, work, "--resume", options=changed) == 2
    err = capsys.readouterr().err.strip()
    assert "ptq.recon.iters=4, now 5" in err and len(err.splitlines()) == 1
    run = work / stopped.run.name
    assert torch.load(run / RESUME_FILE, weights_only=True)["records"] == stopped.records


@pytest.mark.slow
def test_a_resumed_run_skips_the_finished_units_in_the_stopped_runs_folder(stopped, resumed):
    assert resumed.exit_code == 0
    assert len(resumed.started) == UNITS - STOP_AFTER  # the finished units were skipped
    assert last_run_dir(stopped.work) == stopped.run  # the stopped run's own folder holds them
    assert f"resuming after unit {STOP_AFTER}/{UNITS}" in resumed.out


@pytest.mark.slow
def test_a_resumed_run_ends_with_the_results_and_log_of_an_uninterrupted_one(stopped, resumed):
    a = json.loads((stopped.whole / "ptq_results.json").read_text())
    b = json.loads((stopped.run / "ptq_results.json").read_text())
    for key in ("quant", "output_error", "heldout_error", "calib_indices"):
        assert b[key] == a[key], key
    for key in ("units", "iterations", "block_passes", "levels_run", "layer_units"):
        assert b["recon"][key] == a["recon"][key], key
    log_a = json.loads((stopped.whole / "recon" / "recon_log.json").read_text())
    log_b = json.loads((stopped.run / "recon" / "recon_log.json").read_text())
    assert log_b["resumed_after"] == STOP_AFTER and len(log_b["units"]) == UNITS
    keys = "name level iters first_loss last_loss hard_before hard_after curve".split()
    assert [[u[k] for k in keys] for u in log_b["units"]] == [
        [u[k] for k in keys] for u in log_a["units"]
    ]


@pytest.mark.slow
def test_a_resumed_run_saves_the_model_of_an_uninterrupted_one(stopped, resumed):
    sa = torch.load(stopped.whole / "quantized_model.pth", weights_only=True)
    sb = torch.load(stopped.run / "quantized_model.pth", weights_only=True)
    # the patch embedding, qkv, proj, fc1 and fc2 of the 2 blocks, the head
    assert len(sa["integer_weights"]) == 10
    assert sa["integer_weights"].keys() == sb["integer_weights"].keys()
    assert all(torch.equal(v, sb["integer_weights"][k]) for k, v in sa["integer_weights"].items())
    sa, sb = sa["state_dict"], sb["state_dict"]
    assert sa.keys() == sb.keys()
    assert sum(k.endswith("weight_quantizer.alpha") for k in sa) > 0
    for key, value in sa.items():
        if isinstance(value, torch.Tensor):
            assert torch.equal(value, sb[key]), key
        else:  # a quantizer's flags and rounding mode
            assert value == sb[key], key


@pytest.mark.slow
def test_a_finished_run_has_nothing_to_resume(stopped, resumed, ptq_tool, capsys):
    """Nothing left to resume, in the work dir or by the run's folder."""
    assert _run(ptq_tool, stopped.cfg, stopped.work, "--resume") == 2
    assert "nothing to resume in" in capsys.readouterr().err
    assert _run(ptq_tool, stopped.cfg, stopped.work, "--resume", str(stopped.run)) == 2
    assert "finished (ptq_results.json)" in capsys.readouterr().err


@pytest.mark.slow
def test_quantize_continues_from_a_resume_state(tiny_timm_vit):
    """The core alone: a run given the state saved after unit k reconstructs only the units
    after it and ends with the model of the whole run, tensor for tensor."""

    def model():
        torch.manual_seed(0)
        return tiny_timm_vit()

    gen = torch.Generator().manual_seed(0)
    batches = [torch.randn(4, 3, 32, 32, generator=gen) for _ in range(2)]
    config = PTQConfig(
        method="pfcr",
        quant=QuantConfig(w_bits=4, a_bits=4),
        recon=ReconSettings(iters=2, batch_size=4, log_every=0, downstream_weight=1),
    )
    whole, states = model(), []

    def keep(state: ResumeState) -> None:  # its tensors are the model's own: copy them
        states.append(copy.deepcopy(state))

    records = quantize(whole, config, batches, print_fn=print, on_unit_done=keep).records
    assert [len(s.records) for s in states] == list(range(1, len(records) + 1))
    done = len(records) // 2 + 1  # within the second level
    state = states[done - 1]
    assert any("alpha" in q for q in state.quantizers.values())

    again = model()
    result = quantize(again, config, batches, print_fn=print, resume=state)
    assert [r.losses for r in result.records] == [r.losses for r in records]
    a, b = whole.state_dict(), again.state_dict()
    assert a.keys() == b.keys()
    for key, value in a.items():
        assert torch.equal(value, b[key]) if isinstance(value, torch.Tensor) else value == b[key]

    wrong = ResumeState(state.records[1:], state.quantizers)
    with pytest.raises(ValueError, match="are not the first units of this run's plan"):
        quantize(model(), config, batches, print_fn=print, resume=wrong)
