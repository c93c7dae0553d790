"""Detection specifics: COCO layout checks and evaluation on a subset of images.

``CocoMetric`` scores every image id of its annotation file, so evaluating a subset of images
against the full file counts the skipped images as misses. :func:`write_subset_annotations`
writes the annotation file of the subset, used by both the dataset and the metric.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from ..atomic import atomic_path

COCO_LAYOUT = (
    "expected COCO layout: <data_root>/annotations/instances_{train,val}2017.json and "
    "<data_root>/{train,val}2017/<image files> (set data_root, ann_file and data_prefix in the "
    "config for your own COCO-format data)"
)


def coco_paths(dataset_cfg: dict) -> tuple[Path, Path]:
    """The annotation file and image folder a CocoDataset config points at."""
    root = dataset_cfg.get("data_root") or ""
    ann = Path(os.path.join(root, dataset_cfg["ann_file"]))
    img = Path(os.path.join(root, (dataset_cfg.get("data_prefix") or {}).get("img", "")))
    return ann, img


def check_coco_dataset(dataset_cfg: dict, what: str) -> None:
    """Raise FileNotFoundError naming the missing file and the expected layout."""
    ann, img = coco_paths(dataset_cfg)
    if not ann.is_file():
        raise FileNotFoundError(f"{what} annotation file not found: {ann}; {COCO_LAYOUT}")
    if not img.is_dir():
        raise FileNotFoundError(f"{what} image folder not found: {img}; {COCO_LAYOUT}")


def write_subset_annotations(ann_file: Path, num_images: int, out: Path) -> list[int]:
    """Write the first ``num_images`` images (by id) of ``ann_file`` with only their
    annotations to ``out``; returns the kept image ids."""
    coco = json.loads(Path(ann_file).read_text())
    if num_images <= 0:
        raise ValueError(f"the number of evaluation images must be positive, got {num_images}")
    images = sorted(coco["images"], key=lambda im: im["id"])[:num_images]
    ids = {im["id"] for im in images}
    subset = {
        **coco,
        "images": images,
        "annotations": [a for a in coco["annotations"] if a["image_id"] in ids],
    }
    # every process of a distributed run writes the same file: none reads a half-written one
    with atomic_path(out) as tmp:
        tmp.write_text(json.dumps(subset))
    return sorted(ids)
