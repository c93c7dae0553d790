"""The calibration split: ``ptq.calib.dataset`` merged into the test dataset config, the seeded
calibration and held-out images drawn from it, their loaders, and the checks made before any
long work."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import torch
from mmengine.dist import get_dist_info, is_main_process
from mmengine.registry import DATASETS, FUNCTIONS
from torch.utils.data import DataLoader, Subset

from ..atomic import atomic_path
from ..settings import PTQConfig


def calib_dataset_cfg(config: PTQConfig, test_dataset_cfg: dict) -> dict:
    """The calibration dataset config: the test one with ``calib.dataset`` merged in."""
    if not config.calib.dataset:
        raise KeyError(
            "ptq.calib.dataset is required: overrides of the test dataset config that select "
            "the calibration split, e.g. dict(split='train') or COCO train2017's "
            "ann_file/data_prefix"
        )
    return _merge(test_dataset_cfg, config.calib.dataset)


# The calibration dataset of the run, by its config: a run needs it three times (the early
# check, the calibration images, the held-out ones), and building COCO train2017 reads its
# annotations each time (tens of seconds).
_last_built: dict = {}


def _build_calibration_dataset(dataset_cfg: dict):
    key = json.dumps(dataset_cfg, sort_keys=True, default=str)
    if _last_built.get("key") != key:
        _last_built.clear()
        _last_built.update(key=key, dataset=DATASETS.build(dataset_cfg))
    return _last_built["dataset"]


def _calibration_order(config: PTQConfig, test_dataloader_cfg: dict):
    """The calibration dataset, its config, and its indices in the seeded random order from
    which the calibration images (the first ``num_images``) and the held-out ones (the next
    ``heldout_images``) are taken."""
    dataset_cfg = calib_dataset_cfg(config, test_dataloader_cfg["dataset"])
    if dataset_cfg == _merge(test_dataloader_cfg["dataset"], {}):
        raise ValueError(
            f"ptq.calib.dataset={config.calib.dataset} selects the evaluation images "
            "themselves: point it at another split (e.g. dict(split='train'))"
        )
    dataset = _build_calibration_dataset(dataset_cfg)
    if len(dataset) == 0:
        raise ValueError(f"the calibration dataset is empty: {dataset_cfg}")
    if len(dataset) < config.calib.num_images:
        raise ValueError(
            f"ptq.calib.num_images={config.calib.num_images}, but the calibration split has "
            f"{len(dataset)} images: lower num_images or use a larger split"
        )
    gen = torch.Generator().manual_seed(config.calib.seed)
    return dataset, dataset_cfg, torch.randperm(len(dataset), generator=gen).tolist()


def _loader(dataset, indices: list[int], batch_size: int, num_workers: int, cfg: dict):
    collate_cfg = cfg.get("collate_fn", {"type": "pseudo_collate"})
    collate = FUNCTIONS.get(collate_cfg["type"])
    if collate is None:
        raise KeyError(f"unknown collate_fn {collate_cfg['type']!r} in test_dataloader")
    return DataLoader(
        Subset(dataset, indices),
        batch_size=batch_size,
        shuffle=False,
        num_workers=num_workers,
        collate_fn=collate,
    )


def calibration_indices(config: PTQConfig, test_dataloader_cfg: dict) -> list[int]:
    """The indices of the calibration images in the calibration dataset, sorted."""
    _, _, order = _calibration_order(config, test_dataloader_cfg)
    return sorted(order[: config.calib.num_images])


def calibration_loader(
    config: PTQConfig, test_dataloader_cfg: dict, out_dir: Path
) -> tuple[DataLoader, list[int]]:
    """A loader over ``num_images`` seeded random images of the calibration dataset.

    ``ptq.calib.dataset`` holds overrides of the test dataset config (merged key by key), so the
    calibration images go through the test pipeline but come from another split: for example
    ``dict(split='train')`` for a folder dataset, or ``dict(ann_file=..., data_prefix=...)`` of
    COCO train2017. It is required: calibrating on the evaluation images would leak them. The
    indices are written to ``out_dir/calib_indices.json``.

    In a distributed run the loader of process ``rank`` of W holds batches ``rank, rank + W,
    ...`` of the whole calibration list (the share :func:`pfcr_mm.quantize` expects); the
    returned indices are always those of the whole list.
    """
    calib = config.calib
    dataset, dataset_cfg, _ = _calibration_order(config, test_dataloader_cfg)
    indices = calibration_indices(config, test_dataloader_cfg)
    if is_main_process():
        with atomic_path(out_dir / "calib_indices.json") as tmp:
            tmp.write_text(
                json.dumps({"seed": calib.seed, "dataset": dataset_cfg, "indices": indices})
            )
    rank, world = get_dist_info()
    size = calib.batch_size
    batches = [indices[i : i + size] for i in range(0, len(indices), size)]
    share = [i for batch in batches[rank::world] for i in batch]
    return _loader(dataset, share, size, calib.num_workers, test_dataloader_cfg), indices


def check_calibration_split(config: PTQConfig, test_dataloader_cfg: dict, eval_dataset) -> None:
    """Refuse, before any long work, a calibration split that is the evaluation split, is
    empty, has fewer than ``num_images`` images, or whose class list (``metainfo['classes']``:
    a folder dataset's class folders) differs from that of ``eval_dataset``, or with a
    calibration or held-out image that does not load (builds the calibration dataset once, and
    reads those images through its pipeline: seconds for a few hundred COCO images)."""
    dataset, _, order = _calibration_order(config, test_dataloader_cfg)
    calib_cfg = config.calib
    for index in order[: calib_cfg.num_images + calib_cfg.heldout_images]:
        _check_loads(dataset, index)
    calib = list(getattr(dataset, "metainfo", {}).get("classes") or [])
    evaluation = list(getattr(eval_dataset, "metainfo", {}).get("classes") or [])
    if calib != evaluation:
        only_calib = [c for c in calib if c not in evaluation]
        only_eval = [c for c in evaluation if c not in calib]
        how = (
            f"only in calibration: {only_calib[:5]}, only in evaluation: {only_eval[:5]}"
            if only_calib or only_eval
            else "the same classes in another order"
        )
        raise ValueError(
            f"the calibration and evaluation splits have different class lists ({how}): the "
            "labels would not match; give both splits the same classes (class folders)"
        )


def _check_loads(dataset, index: int) -> None:
    """Load one item of ``dataset``; a failure becomes one line naming its file."""
    try:
        dataset[index]
    except Exception as err:
        info = dataset.get_data_info(index) if hasattr(dataset, "get_data_info") else {}
        if "img_path" not in info:
            raise
        cause = f"{type(err).__name__}: {err}".strip().splitlines()[-1]
        raise ValueError(
            f"cannot read calibration image {info['img_path']} ({cause}): replace or remove it"
        ) from None


def heldout_loader(config: PTQConfig, test_dataloader_cfg: dict) -> DataLoader | None:
    """A loader over ``calib.heldout_images`` images of the calibration split that calibration
    did not see (they follow the calibration images in the seeded order): where settings are
    chosen without touching the evaluation images. ``None`` when there are none."""
    if config.calib.heldout_images == 0:
        return None
    calib = config.calib
    dataset, _, order = _calibration_order(config, test_dataloader_cfg)
    held = sorted(order[calib.num_images : calib.num_images + calib.heldout_images])
    if not held:
        return None
    return _loader(dataset, held, calib.batch_size, calib.num_workers, test_dataloader_cfg)


def _merge(base: dict, override: dict) -> dict:
    out = copy.deepcopy(dict(base))
    for key, value in override.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out
