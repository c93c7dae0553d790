"""Where a run's files go: its own folder ``<work_dir>/<YYYYmmdd_HHMMSS>/`` (MMEngine's log
folder of the run), and ``<work_dir>/last_run`` naming the last one that wrote its results.

Two runs started in the same second into one work dir get two folders: :class:`PTQRunner`
claims its folder by an exclusive create and takes ``<stamp>_2``, ``<stamp>_3``, ... when another
run holds ``<stamp>``.
"""

from __future__ import annotations

import shutil
from pathlib import Path

from mmengine.dist import broadcast_object_list
from mmengine.runner import Runner

from ..atomic import remove_stale_temporaries

# in the work dir: the name of the folder of the last run that wrote its results
LAST_RUN = "last_run"
QUANTIZED_NAME = "quantized_model.pth"
RESULTS_NAME = "ptq_results.json"
# what a run writes into its folder besides MMEngine's log, in the order it writes them
RUN_FILES = ("calib_indices.json", "quant_summary.json", "recon", QUANTIZED_NAME, RESULTS_NAME)


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


def claim_run_dir(work_dir: str | Path, stamp: str) -> str:
    """The name of a new folder in ``work_dir``, created here and by no one else: ``stamp``, or
    ``stamp_2``, ``stamp_3``, ... if another run created it first."""
    Path(work_dir).mkdir(parents=True, exist_ok=True)
    name, k = stamp, 1
    while True:
        try:
            (Path(work_dir) / name).mkdir()
            return name
        except FileExistsError:
            k += 1
            name = f"{stamp}_{k}"


class PTQRunner(Runner):
    """MMEngine's Runner whose log folder (the run's folder, :func:`run_dir`) no other run
    shares: the timestamp MMEngine takes to the second becomes the folder rank 0 claimed
    (:func:`claim_run_dir`), the same in every process. It also names the run's log file and
    its logger, so runs of the same second do not write into each other's log."""

    def __init__(self, *args, **kwargs):
        try:
            super().__init__(*args, **kwargs)
        except Exception:  # e.g. a model that refuses its checkpoint while it is built
            if getattr(self, "_log_dir", None) is not None:
                self.discard_if_refused()
            raise

    def setup_env(self, env_cfg: dict) -> None:
        super().setup_env(env_cfg)
        if self.rank == 0:  # what runs killed while saving left in the work dir
            remove_stale_temporaries(self.work_dir)
        name = [claim_run_dir(self.work_dir, self._timestamp) if self.rank == 0 else None]
        if self.world_size > 1:
            broadcast_object_list(name)
        self._timestamp = name[0]  # MMEngine's log_dir is <work_dir>/<timestamp>

    def dump_config(self) -> None:
        """The resolved config into the run's own folder: MMEngine writes it into the work dir,
        where every run, a refused one too, would overwrite the copy of the last one."""
        name = Path(self.cfg.filename).name if self.cfg.filename else f"{self.timestamp}.py"
        self.cfg.dump(str(Path(self.log_dir) / name))

    def discard_if_refused(self) -> bool:
        """Remove this run's folder if the run wrote no file of its own into it (it was refused
        before any work: only MMEngine's log and config copy are there), so that a refused
        command leaves nothing behind; whether it did."""
        folder = Path(self.log_dir)
        if self.rank != 0 or any((folder / name).exists() for name in RUN_FILES):
            return False
        shutil.rmtree(folder, ignore_errors=True)
        return True
