"""SIGTERM (what a scheduler sends before it kills a job) ends ``tools/ptq.py`` with exit code
143 and one line saying where the run stopped and that ``--resume`` continues it; it does."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_sigterm_says_how_to_continue_and_resume_finishes_the_run(vit_config):
    work = vit_config.parent / "work"
    cmd = [sys.executable, str(ROOT / "tools/ptq.py"), str(vit_config), "--work-dir", str(work),
           "--no-fp-eval", "--cfg-options", "ptq.method=pfcr", "ptq.recon.iters=1000",
           "ptq.recon.batch_size=2"]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    run = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.DEVNULL,
                           stderr=subprocess.PIPE, text=True)  # fmt: skip
    deadline = time.time() + 300
    while not list(work.glob("*/recon/resume.pth")):  # the first unit is done
        assert run.poll() is None, run.communicate()[1][-2000:]
        assert time.time() < deadline
        time.sleep(0.1)
    run.send_signal(signal.SIGTERM)
    err = run.communicate(timeout=300)[1]
    assert run.returncode == 128 + signal.SIGTERM, err[-2000:]
    (folder,) = (p.parents[1] for p in work.glob("*/recon/resume.pth"))
    assert err.strip().splitlines()[-1] == (
        f"stopped (SIGTERM): {folder} holds the reconstructed units so far; run the same "
        "command with --resume to continue from there"
    )
    done = subprocess.run([*cmd, "--resume"], cwd=ROOT, env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]
    results = json.loads((folder / "ptq_results.json").read_text())
    assert results["method"] == "pfcr" and results["recon"]["units"] > 1
