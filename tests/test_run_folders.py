"""Run folders never shared: two ``tools/ptq.py`` runs started in the same second into one work
dir each get a folder of their own (``<stamp>`` and ``<stamp>_2``), and both results stay."""

import json
import multiprocessing
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from pfcr_mm.engine.run_dir import LAST_RUN, RESULTS_NAME, claim_run_dir

ROOT = Path(__file__).resolve().parents[1]


def test_a_claimed_folder_is_never_claimed_again(tmp_path):
    names = [claim_run_dir(tmp_path / "work", "20261203_080000") for _ in range(3)]
    assert names == ["20261203_080000", "20261203_080000_2", "20261203_080000_3"]
    assert all((tmp_path / "work" / n).is_dir() for n in names)


def _claim_after(barrier, work: str, stamp: str, names) -> None:
    barrier.wait()
    names.append(claim_run_dir(work, stamp))


@pytest.mark.slow  # spawned processes
def test_processes_claiming_one_second_at_once_get_distinct_folders(tmp_path):
    ctx = multiprocessing.get_context("spawn")
    with ctx.Manager() as manager:
        barrier, names = manager.Barrier(4), manager.list()
        args = (barrier, str(tmp_path), "20261203_080000", names)
        procs = [ctx.Process(target=_claim_after, args=args) for _ in range(4)]
        for p in procs:
            p.start()
        for p in procs:
            p.join(60)
        assert sorted(names) == ["20261203_080000"] + [f"20261203_080000_{k}" for k in (2, 3, 4)]


def _take_next_seconds(work: Path, seconds: int = 300) -> list[str]:
    """Create the folders of the next ``seconds`` stamps, as runs started then would."""
    now = time.time()
    taken = [time.strftime("%Y%m%d_%H%M%S", time.localtime(now + s)) for s in range(seconds)]
    for name in taken:
        (work / name).mkdir(parents=True)
    return taken


def _results(work: Path) -> dict[str, dict]:
    return {
        p.parent.name: json.loads(p.read_text()) for p in sorted(work.glob(f"*/{RESULTS_NAME}"))
    }


@pytest.mark.slow
def test_a_run_whose_second_is_taken_writes_into_a_folder_of_its_own(ptq_tool, vit_config):
    work = vit_config.parent / "work"
    taken = _take_next_seconds(work)
    argv = [str(vit_config), "--work-dir", str(work), "--no-fp-eval"]
    assert ptq_tool.main(argv) == 0
    (folder,) = _results(work)
    assert folder.endswith("_2") and folder[:-2] in taken
    assert (work / LAST_RUN).read_text().strip() == folder
    assert all(not any((work / name).iterdir()) for name in taken)  # untouched


@pytest.mark.slow
def test_two_runs_started_together_keep_both_results(vit_config):
    """Started together, with every second they can start in already taken: whether or not they
    reach their folders in the same second, each run gets a suffixed folder of its own."""
    work = vit_config.parent / "work"
    taken = _take_next_seconds(work)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    runs = [
        subprocess.Popen(
            [
                sys.executable,
                str(ROOT / "tools/ptq.py"),
                str(vit_config),
                "--work-dir",
                str(work),
                "--no-fp-eval",
                "--cfg-options",
                f"ptq.quant.w_bits={bits}",
                f"ptq.quant.a_bits={bits}",
            ],
            cwd=ROOT,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )  # fmt: skip
        for bits in (4, 8)
    ]
    outputs = [run.communicate(timeout=600)[0] for run in runs]
    assert [run.returncode for run in runs] == [0, 0], outputs[0][-2000:] + outputs[1][-2000:]
    results = _results(work)
    assert sorted(r["w_bits"] for r in results.values()) == [4, 8], sorted(results)
    assert all(name.rpartition("_")[0] in taken for name in results)
    assert (work / LAST_RUN).read_text().strip() in results
    # each run's log is its own: the W8A8 settings appear in exactly one of the two logs
    logs = [next((work / folder).glob("*.log")).read_text() for folder in results]
    assert sum("'w_bits': 8" in log or "w_bits=8" in log for log in logs) == 1


@pytest.mark.slow
def test_the_next_run_removes_what_a_run_killed_while_saving_left(ptq_tool, vit_config):
    work = vit_config.parent / "work"
    gone = subprocess.Popen(["true"])
    gone.wait()
    stale = work / "20200101_000000" / f".quantized_model.{gone.pid}.tmp.pth"
    stale.parent.mkdir(parents=True)
    stale.write_bytes(b"half a model")
    assert ptq_tool.main([str(vit_config), "--work-dir", str(work), "--no-fp-eval"]) == 0
    assert not stale.exists() and len(_results(work)) == 1
