"""Evaluating a subset of COCO images uses the annotations of that subset only."""

import json

from pfcr_mm.engine.detection import write_subset_annotations


def test_subset_keeps_only_its_images_and_annotations(tmp_path):
    coco = {
        "images": [{"id": i, "file_name": f"{i}.png", "height": 8, "width": 8} for i in (5, 1, 3)],
        "annotations": [
            {
                "id": 10 + i,
                "image_id": i % 6,
                "category_id": 1,
                "bbox": [0, 0, 2, 2],
                "area": 4,
                "iscrowd": 0,
            }
            for i in range(8)
        ],
        "categories": [{"id": 1, "name": "x"}],
    }
    src = tmp_path / "full.json"
    src.write_text(json.dumps(coco))
    ids = write_subset_annotations(src, 2, tmp_path / "sub.json")
    sub = json.loads((tmp_path / "sub.json").read_text())
    assert ids == [1, 3]
    assert [im["id"] for im in sub["images"]] == [1, 3]
    assert sorted(a["image_id"] for a in sub["annotations"]) == [1, 1, 3]
    assert sub["categories"] == coco["categories"]
