"""Resumable runs: ``tools/ptq.py --resume [RUN_DIR]``.

After each reconstructed unit, ``recon/resume.pth`` in the run's folder is rewritten (atomically)
with the :class:`pfcr_mm.ResumeState` of the run so far (the records of the finished units and
every quantizer's state) and the run's fingerprint: what decides its result, by config key (the
quantization settings, the model and calibration dataset configs, the calibration indices, the
checkpoint's SHA-256, the package versions). A resumed run calibrates again (deterministic),
loads that state, skips the finished units and writes into the same folder; a fingerprint
that differs refuses, naming the first differing key.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from ..atomic import atomic_path
from ..core import ResumeState
from ..provenance import file_sha256, package_versions
from ..settings import PTQConfig
from .calib_split import calib_dataset_cfg, calibration_indices
from .checkpoint import load_checkpoint_file
from .run_dir import RESULTS_NAME
from .saved_model import differing_keys, flat_settings, quantization_settings

RESUME_FILE = Path("recon") / "resume.pth"
RESUME_FORMAT = "pfcr_mm.resume.v1"


def _plain(value) -> object:
    """A config value as JSON values (tuples become lists), as it is compared after saving."""
    return json.loads(json.dumps(value, default=str))


def run_fingerprint(cfg, config: PTQConfig, checkpoint: str | None) -> dict:
    """What decides the quantized model of a run, flat by config key: the quantization settings
    (``ptq.*``), the model config (``model.*``, without its checkpoint path), the calibration
    dataset config (``calib_dataset.*``), the calibration indices, the SHA-256 of the weights
    file ``checkpoint`` (``None``: none) and the package versions (``versions.*``)."""
    model = {k: v for k, v in cfg.model.items() if k != "checkpoint"}
    return {
        **flat_settings(quantization_settings(config)),
        **flat_settings(_plain(model), "model"),
        **flat_settings(
            _plain(calib_dataset_cfg(config, cfg.test_dataloader.dataset)), "calib_dataset"
        ),
        "calib_indices": calibration_indices(config, cfg.test_dataloader),
        "checkpoint_sha256": None if checkpoint is None else file_sha256(checkpoint),
        **flat_settings(package_versions(), "versions"),
    }


def save_resume_state(run: Path, fingerprint: dict, state: ResumeState) -> None:
    """Write ``run/recon/resume.pth`` whole or not at all."""
    path = Path(run) / RESUME_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    payload = {"format": RESUME_FORMAT, "fingerprint": fingerprint, **state.to_dict()}
    with atomic_path(path) as tmp:
        torch.save(payload, tmp)


def _short(value) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def load_resume_state(run: Path, fingerprint: dict) -> ResumeState:
    """The state saved in ``run/recon/resume.pth``; ``ValueError`` naming the first key whose
    value differs from ``fingerprint`` (the settings first)."""
    path = Path(run) / RESUME_FILE
    saved = load_checkpoint_file(path)
    if not isinstance(saved, dict) or saved.get("format") != RESUME_FORMAT:
        raise ValueError(
            f"{path} is not a resume checkpoint written by tools/ptq.py (it holds "
            f"{'a dict of another format' if isinstance(saved, dict) else type(saved).__name__}):"
            " start the run again without --resume"
        )
    was = saved["fingerprint"]
    differ = differing_keys(was, fingerprint, was.keys() | fingerprint.keys(), first="ptq.")
    if differ:
        key = differ[0]
        raise ValueError(
            f"cannot resume {run}: it ran with {key}={_short(was.get(key))}, now "
            f"{_short(fingerprint.get(key))} ({len(differ)} difference(s)); resume with the "
            "run's own settings, or start a new run without --resume"
        )
    return ResumeState.from_dict(saved)


def resumable_run(work_dir: str | Path, run: str | Path | None = None) -> Path:
    """``run`` (a run folder), or the last run folder in ``work_dir`` that has a resume
    checkpoint and no results yet; ``FileNotFoundError`` in one line when there is none."""
    if run is not None:
        run = Path(run)
        if not (run / RESUME_FILE).is_file():
            raise FileNotFoundError(f"nothing to resume: {run} has no {RESUME_FILE}")
        if (run / RESULTS_NAME).exists():
            raise FileNotFoundError(f"nothing to resume: {run} finished ({RESULTS_NAME})")
        return run
    work_dir = Path(work_dir)
    runs = sorted(
        p
        for p in (work_dir.iterdir() if work_dir.is_dir() else ())
        if (p / RESUME_FILE).is_file() and not (p / RESULTS_NAME).exists()
    )
    if not runs:
        raise FileNotFoundError(
            f"nothing to resume in {work_dir}: no run folder with {RESUME_FILE} and without "
            f"{RESULTS_NAME} (runs of method 'calib', or stopped before their first unit, "
            "start again without --resume)"
        )
    return runs[-1]
