"""The demo shapes generator: determinism, the folder layout the classification dataset reads,
idempotency, and refusal to overwrite folders it did not write. Tiny counts: seconds on CPU."""

from pathlib import Path

import numpy as np
import pytest

from pfcr_mm.demo.shapes import CLASSES, generate_shapes_dataset, image_rng, render_shape_image
from pfcr_mm.engine.classification import ImageFolderDataset

TINY = dict(train_per_class=3, val_per_class=2, image_size=32)
DEMO_PREPROCESS = dict(
    resize=32, crop_size=32, mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5), interpolation="bilinear"
)


def _files(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*.png"))}


def test_same_seed_same_bytes_different_seed_differs(tmp_path):
    a = generate_shapes_dataset(tmp_path / "a", seed=0, **TINY)
    b = generate_shapes_dataset(tmp_path / "b", seed=0, **TINY)
    c = generate_shapes_dataset(tmp_path / "c", seed=1, **TINY)
    assert a["action"] == b["action"] == "generated"
    assert a["sha256"] == b["sha256"]
    assert _files(tmp_path / "a") == _files(tmp_path / "b")  # bit-identical PNGs
    assert c["sha256"] != a["sha256"]
    assert _files(tmp_path / "c").keys() == _files(tmp_path / "a").keys()
    assert _files(tmp_path / "c") != _files(tmp_path / "a")


def test_image_depends_on_identity_not_on_counts(tmp_path):
    # Asking for more images adds files; it does not change the ones a smaller set has.
    generate_shapes_dataset(tmp_path / "small", seed=0, **TINY)
    generate_shapes_dataset(tmp_path / "large", seed=0, train_per_class=5, val_per_class=2)
    small, large = _files(tmp_path / "small"), _files(tmp_path / "large")
    assert len(small) == 10 * (3 + 2) and len(large) == 10 * (5 + 2)
    assert all(large[name] == data for name, data in small.items())


def test_images_vary_within_a_class():
    imgs = [render_shape_image("circle", image_rng(0, "train", 1, i)) for i in range(4)]
    assert all(img.shape == (32, 32, 3) and img.dtype == np.uint8 for img in imgs)
    assert len({img.tobytes() for img in imgs}) == 4
    assert all(img.std() > 5.0 for img in imgs)  # not blank


def test_layout_is_readable_by_image_folder_dataset(tmp_path):
    result = generate_shapes_dataset(tmp_path / "shapes", seed=0, **TINY)
    assert result["classes"] == list(CLASSES) and len(CLASSES) == 10
    assert result["num_files"] == 10 * (3 + 2)
    for split, per_class in (("train", 3), ("val", 2)):
        ds = ImageFolderDataset(str(tmp_path / "shapes"), split, **DEMO_PREPROCESS)
        assert ds.classes == list(CLASSES)
        assert len(ds) == 10 * per_class
        labels = [label for _, label in ds.samples]
        assert [labels.count(k) for k in range(10)] == [per_class] * 10
        item = ds[len(ds) - 1]
        assert tuple(item["inputs"].shape) == (3, 32, 32)
        assert item["data_samples"]["gt_label"] == 9
        assert -1.0 <= float(item["inputs"].min()) and float(item["inputs"].max()) <= 1.0


def test_second_call_skips_and_changed_parameters_regenerate(tmp_path):
    root = tmp_path / "shapes"
    first = generate_shapes_dataset(root, seed=0, **TINY)
    png = root / "train" / "circle" / "00000.png"
    mtime = png.stat().st_mtime_ns
    again = generate_shapes_dataset(root, seed=0, **TINY)
    assert again["action"] == "skipped" and again["sha256"] == first["sha256"]
    assert png.stat().st_mtime_ns == mtime

    other = generate_shapes_dataset(root, seed=0, train_per_class=2, val_per_class=1)
    assert other["action"] == "regenerated" and other["num_files"] == 10 * (2 + 1)
    assert len(_files(root)) == 30  # the surplus images of the larger set are gone

    # A damaged demo set (an image edited) no longer matches its manifest: regenerated.
    target = root / "val" / "ring" / "00000.png"
    target.write_bytes(b"not a png")
    repaired = generate_shapes_dataset(root, seed=0, train_per_class=2, val_per_class=1)
    assert repaired["action"] == "regenerated" and repaired["sha256"] == other["sha256"]


def test_refuses_a_folder_it_did_not_write(tmp_path):
    root = tmp_path / "imagenet"
    (root / "train" / "n01440764").mkdir(parents=True)
    notes = root / "notes.txt"
    notes.write_text("keep me")
    with pytest.raises(FileExistsError, match="not a demo shapes folder"):
        generate_shapes_dataset(root, seed=0, **TINY)
    assert notes.read_text() == "keep me"
    assert not (root / "manifest.json").exists() and not (root / "val").exists()

    # An empty folder is fine.
    (tmp_path / "empty").mkdir()
    assert generate_shapes_dataset(tmp_path / "empty", seed=0, **TINY)["action"] == "generated"


def test_refuses_to_delete_foreign_files_inside_a_demo_folder(tmp_path):
    root = tmp_path / "shapes"
    generate_shapes_dataset(root, seed=0, **TINY)
    foreign = root / "train" / "circle" / "mine.jpg"
    foreign.write_bytes(b"user data")
    with pytest.raises(FileExistsError, match="did not write"):
        generate_shapes_dataset(root, seed=1, **TINY)
    assert foreign.read_bytes() == b"user data"


def test_rejects_bad_counts(tmp_path):
    with pytest.raises(ValueError):
        generate_shapes_dataset(tmp_path / "x", train_per_class=0)
