"""Where a run's files go: its own folder ``<work_dir>/<YYYYmmdd_HHMMSS>/`` (MMEngine's log
folder of the run), and ``<work_dir>/last_run`` naming the last one that wrote its results."""

from __future__ import annotations

from pathlib import Path

# in the work dir: the name of the folder of the last run that wrote its results
LAST_RUN = "last_run"
QUANTIZED_NAME = "quantized_model.pth"
RESULTS_NAME = "ptq_results.json"


def run_dir(runner) -> Path:
    """The folder of this run's files: MMEngine's ``<work_dir>/<YYYYmmdd_HHMMSS>`` (the
    Runner's ``log_dir``, which also holds its log), so a run never touches an earlier one's;
    for ``tools/ptq.py --resume``, the folder of the run it continues (``test_cfg.resume``)."""
    return Path(runner.cfg.get("test_cfg", {}).get("resume") or runner.log_dir)


def last_run_dir(work_dir: str | Path) -> Path:
    """The folder of the last run in ``work_dir`` that wrote its results (named by the
    ``last_run`` file)."""
    pointer = Path(work_dir) / LAST_RUN
    if not pointer.is_file():
        raise FileNotFoundError(f"no finished run in {work_dir} (no {LAST_RUN} file)")
    return Path(work_dir) / pointer.read_text().strip()


def saved_model_path(path: str | Path) -> Path:
    """``path`` itself, or for a work dir the quantized model of its last run."""
    path = Path(path)
    return last_run_dir(path) / QUANTIZED_NAME if path.is_dir() else path
