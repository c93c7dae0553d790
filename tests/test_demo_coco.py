"""The demo COCO shapes generator: determinism, COCO annotation sanity, occlusion handled in the
polygons, idempotency, and loading through mmdet's CocoDataset with the demo config's test
pipeline. Tiny counts: seconds on CPU."""

import json
from pathlib import Path

import numpy as np
import pytest
from shapely.geometry import Polygon
from shapely.ops import unary_union

from pfcr_mm.demo.coco_shapes import CATEGORIES, generate_coco_shapes, render_scene, scene_rng

ROOT = Path(__file__).resolve().parents[1]
CONFIG = ROOT / "configs" / "demo" / "demo_mask_rcnn_swin_shapes.py"
TINY = dict(num_train=6, num_val=3, image_size=160)


def _files(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*.*"))}


def _geometry(segmentation: list[list[float]]):
    return unary_union([Polygon(np.reshape(s, (-1, 2))) for s in segmentation])


@pytest.fixture(scope="module")
def tiny_set(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("coco") / "shapes"
    generate_coco_shapes(root, seed=0, **TINY)
    return root


def test_same_seed_same_bytes_different_seed_differs(tmp_path, tiny_set):
    a = json.loads((tiny_set / "manifest.json").read_text())
    b = generate_coco_shapes(tmp_path / "b", seed=0, **TINY)
    c = generate_coco_shapes(tmp_path / "c", seed=1, **TINY)
    assert b["action"] == c["action"] == "generated"
    assert a["sha256"] == b["sha256"] and a["num_files"] == b["num_files"] == 6 + 3 + 2
    files_a, files_b, files_c = _files(tiny_set), _files(tmp_path / "b"), _files(tmp_path / "c")
    files_a.pop("manifest.json"), files_b.pop("manifest.json"), files_c.pop("manifest.json")
    assert files_a == files_b  # bit-identical PNGs and JSON
    assert c["sha256"] != a["sha256"]
    assert files_c.keys() == files_a.keys()
    assert all(files_c[k] != files_a[k] for k in files_a)  # every image and annotation differs


def test_scene_depends_on_identity_not_on_counts(tmp_path, tiny_set):
    generate_coco_shapes(tmp_path / "small", seed=0, num_train=2, num_val=1)
    small, large = _files(tmp_path / "small"), _files(tiny_set)
    assert all(
        small[k] == large[k] for k in ("train/00000.png", "train/00001.png", "val/00000.png")
    )
    ann_small = json.loads(small["annotations/instances_train.json"])["annotations"]
    ann_large = json.loads(large["annotations/instances_train.json"])["annotations"]
    assert ann_small == [a for a in ann_large if a["image_id"] <= 2]


@pytest.mark.parametrize("split,count", [("train", 6), ("val", 3)])
def test_annotations_are_sane_coco(tiny_set, split, count):
    coco = json.loads((tiny_set / "annotations" / f"instances_{split}.json").read_text())
    assert [c["id"] for c in coco["categories"]] == [1, 2, 3, 4]
    assert [c["name"] for c in coco["categories"]] == list(CATEGORIES)
    images = {im["id"]: im for im in coco["images"]}
    assert len(images) == len(coco["images"]) == count  # unique image ids
    assert all((tiny_set / split / im["file_name"]).is_file() for im in coco["images"])
    ann_ids = [a["id"] for a in coco["annotations"]]
    assert len(set(ann_ids)) == len(ann_ids)
    per_image = {i: 0 for i in images}
    for ann in coco["annotations"]:
        im = images[ann["image_id"]]
        per_image[ann["image_id"]] += 1
        assert ann["category_id"] in {1, 2, 3, 4} and ann["iscrowd"] == 0
        x, y, w, h = ann["bbox"]
        assert w > 0 and h > 0 and ann["area"] > 0
        assert 0 <= x and 0 <= y and x + w <= im["width"] + 1e-6 and y + h <= im["height"] + 1e-6
        assert ann["area"] <= w * h + 1e-6
        for poly in ann["segmentation"]:
            assert len(poly) >= 6 and len(poly) % 2 == 0
            xs, ys = np.array(poly[0::2]), np.array(poly[1::2])
            assert xs.min() >= x - 1e-6 and xs.max() <= x + w + 1e-6
            assert ys.min() >= y - 1e-6 and ys.max() <= y + h + 1e-6
        # The area is that of the polygons (up to their rounding to 2 decimals).
        assert _geometry(ann["segmentation"]).area == pytest.approx(ann["area"], rel=0.01)
    assert all(1 <= n <= 5 for n in per_image.values())


def test_occlusion_leaves_disjoint_visible_regions():
    # Over a few dozen scenes, objects do overlap (boxes intersect), yet the annotated visible
    # regions of one image never do: each occluded object keeps only what later ones leave.
    overlapping_boxes = 0
    occluded = 0
    for index in range(40):
        pixels, objects = render_scene(scene_rng(0, "train", index), 160)
        assert pixels.shape == (160, 160, 3) and pixels.dtype == np.uint8
        geoms = [_geometry(o["segmentation"]) for o in objects]
        for i in range(len(objects)):
            for j in range(i + 1, len(objects)):
                assert geoms[i].intersection(geoms[j]).area < 0.5  # rounding slivers only
                bi, bj = objects[i]["bbox"], objects[j]["bbox"]
                overlapping_boxes += (
                    bi[0] < bj[0] + bj[2]
                    and bj[0] < bi[0] + bi[2]
                    and bi[1] < bj[1] + bj[3]
                    and bj[1] < bi[1] + bi[3]
                )
                # Object i lies under j: a convex shape cut by a later one loses convexity.
                occluded += geoms[i].convex_hull.area - geoms[i].area > 5.0
    assert overlapping_boxes >= 5 and occluded >= 3


def test_second_call_skips_and_refuses_foreign_folders(tmp_path):
    root = tmp_path / "coco"
    first = generate_coco_shapes(root, seed=0, num_train=2, num_val=1)
    again = generate_coco_shapes(root, seed=0, num_train=2, num_val=1)
    assert again["action"] == "skipped" and again["sha256"] == first["sha256"]
    other = generate_coco_shapes(root, seed=0, num_train=1, num_val=1)
    assert other["action"] == "regenerated" and other["num_files"] == 1 + 1 + 2

    foreign = root / "annotations" / "instances_test.json"
    foreign.write_text("{}")
    with pytest.raises(FileExistsError, match="did not write"):
        generate_coco_shapes(root, seed=1, num_train=1, num_val=1)
    assert foreign.read_text() == "{}"

    user = tmp_path / "user"
    (user / "train").mkdir(parents=True)
    with pytest.raises(FileExistsError, match="not a demo COCO shapes folder"):
        generate_coco_shapes(user, seed=0, num_train=1, num_val=1)


def test_mmdet_coco_dataset_loads_it_with_the_demo_test_pipeline(tiny_set):
    pytest.importorskip("mmdet")
    from mmdet.registry import DATASETS
    from mmdet.utils import register_all_modules
    from mmengine.config import Config

    register_all_modules()
    cfg = Config.fromfile(str(CONFIG))
    ds_cfg = cfg.test_dataloader.dataset
    ds_cfg.data_root = str(tiny_set) + "/"
    dataset = DATASETS.build(ds_cfg)
    assert dataset.metainfo["classes"] == CATEGORIES
    assert len(dataset) == 3
    coco = json.loads((tiny_set / "annotations" / "instances_val.json").read_text())
    for index in range(len(dataset)):
        item = dataset[index]
        assert tuple(item["inputs"].shape) == (3, 160, 160)
        sample = item["data_samples"]
        image_id = sample.img_id
        anns = [a for a in coco["annotations"] if a["image_id"] == image_id]
        gt = sample.gt_instances
        assert len(gt) == len(anns) >= 1
        assert gt.labels.tolist() == [a["category_id"] - 1 for a in anns]
        assert np.allclose(
            gt.bboxes.tensor.numpy(),
            [
                [
                    a["bbox"][0],
                    a["bbox"][1],
                    a["bbox"][0] + a["bbox"][2],
                    a["bbox"][1] + a["bbox"][3],
                ]
                for a in anns
            ],
            atol=1e-3,
        )
        # Masks rasterised by mmdet from the polygons: the annotated area, up to the edge pixels.
        masks = gt.masks.to_ndarray()
        assert masks.shape == (len(anns), 160, 160)
        for mask, ann in zip(masks, anns):
            assert abs(int(mask.sum()) - ann["area"]) <= 0.15 * ann["area"] + 10


@pytest.mark.parametrize("name", ["demo_mask_rcnn_swin_shapes", "demo_mask_rcnn_vitdet_shapes"])
def test_committed_checkpoint_matches_the_demo_config(name):
    # A committed demo detector: small, weights only, JSON-able meta, and every tensor fits the
    # model its config builds (strict: no missing or unexpected keys).
    pytest.importorskip("mmdet")
    from mmdet.registry import MODELS
    from mmdet.utils import register_all_modules
    from mmengine.config import Config

    import pfcr_mm.engine  # noqa: F401  (the pfcr scope of the ViTDet config)
    from pfcr_mm.engine.checkpoint import load_checkpoint_file, load_weights_strict

    path = ROOT / "checkpoints" / f"{name}.pth"
    if not path.is_file():
        pytest.skip(f"{path} not present (train it with tools/train/train_demo_detector.py)")
    assert path.stat().st_size <= 10 * 1024 * 1024
    checkpoint = load_checkpoint_file(path)
    assert sorted(checkpoint) == ["meta", "state_dict"]
    meta = checkpoint["meta"]
    assert json.loads(json.dumps(meta)) == meta
    assert meta["dataset_meta"]["classes"] == list(CATEGORIES)
    register_all_modules()
    model = MODELS.build(Config.fromfile(str(CONFIG.with_name(f"{name}.py"))).model)
    load_weights_strict(model, path)
