"""Generate the synthetic demo data sets from a seed: both by default, or one with --only.

    python tools/make_demo_data.py [--only {classification,detection}] [--seed 0]

- classification: the demo shapes set in ImageNet folder layout (``--root``, data/demo_shapes);
- detection: the demo COCO shapes instance segmentation set (``--coco-root``,
  data/demo_coco_shapes).

Idempotent: an identical set already in place (same manifest and file hash) is kept as is.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout, uninstalled

from pfcr_mm.demo.shapes import generate_shapes_dataset  # noqa: E402

TASKS = ("classification", "detection")


def make_classification(args: argparse.Namespace) -> dict:
    result = generate_shapes_dataset(
        args.root,
        train_per_class=args.train_per_class,
        val_per_class=args.val_per_class,
        image_size=args.image_size,
        seed=args.seed,
    )
    per = result["per_class"]
    print(
        f"classification: {result['action']} {result['root']}: {len(result['classes'])} classes "
        f"({', '.join(result['classes'])}), {per['train']} train + {per['val']} val per class, "
        f"{result['num_files']} images of {result['image_size']}x{result['image_size']}, "
        f"seed {result['seed']}, sha256 {result['sha256'][:16]}..., "
        f"{result['seconds']:.1f}s"
    )
    return result


def make_detection(args: argparse.Namespace) -> dict:
    # Imported here: the detection generator needs shapely, the classification one does not.
    from pfcr_mm.demo.coco_shapes import generate_coco_shapes

    result = generate_coco_shapes(
        args.coco_root,
        num_train=args.coco_train,
        num_val=args.coco_val,
        image_size=args.coco_image_size,
        seed=args.seed,
    )
    images, instances = result["num_images"], result["num_instances"]
    per_split = {s: sum(instances[s].values()) for s in images}
    print(
        f"detection: {result['action']} {result['root']}: COCO instances, "
        f"{len(result['categories'])} categories ({', '.join(result['categories'])}), "
        f"{images['train']} train images ({per_split['train']} objects) + {images['val']} val "
        f"images ({per_split['val']} objects) of {result['image_size']}x{result['image_size']}, "
        f"seed {result['seed']}, sha256 {result['sha256'][:16]}..., {result['seconds']:.1f}s"
    )
    return result


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description="Generate the synthetic demo data sets.")
    p.add_argument(
        "--only", choices=TASKS, default=None, help="generate one set only (default: both)"
    )
    p.add_argument("--seed", type=int, default=0)
    g = p.add_argument_group("classification (demo shapes, ImageNet folder layout)")
    g.add_argument("--root", default="data/demo_shapes")
    g.add_argument("--train-per-class", type=int, default=500)
    g.add_argument("--val-per-class", type=int, default=100)
    g.add_argument("--image-size", type=int, default=32)
    g = p.add_argument_group("detection (demo COCO shapes, COCO instances)")
    g.add_argument("--coco-root", default="data/demo_coco_shapes")
    g.add_argument("--coco-train", type=int, default=600, help="train images")
    g.add_argument("--coco-val", type=int, default=100, help="val images")
    g.add_argument("--coco-image-size", type=int, default=160)
    args = p.parse_args(argv)

    tasks = TASKS if args.only is None else (args.only,)
    makers = {"classification": make_classification, "detection": make_detection}
    results = {}
    try:
        for task in tasks:
            results[task] = makers[task](args)
    except FileExistsError as err:
        raise SystemExit(f"error: {err}") from None
    return results


if __name__ == "__main__":
    main()
