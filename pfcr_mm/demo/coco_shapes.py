"""A deterministic synthetic instance segmentation set ("demo COCO shapes") in COCO format.

``generate_coco_shapes(root)`` writes ``<root>/train/<id>.png``, ``<root>/val/<id>.png`` and
``<root>/annotations/instances_{train,val}.json``: RGB scenes of ``image_size`` x ``image_size``
pixels, each with 1-5 objects of four categories (``CATEGORIES``: ellipse, rectangle, triangle,
star) at a random size, rotation, position and colour, over a textured background (smooth colour
noise, fine grain, thin strokes and dots, pixel noise).

Objects are polygons (an ellipse is a 40-gon), painted in order with anti-aliasing, so a later
object occludes the earlier ones. The annotation of an object is its *visible* region, computed
exactly with shapely: its polygon clipped to the image, minus every later polygon. Placements that
would leave an earlier object less than half visible, split off a sliver, or punch a hole in it
(COCO polygons cannot hold holes) are re-drawn; an object that finds no such place is left out
of both the image and the annotations. The masks that pycocotools/mmdet rasterise from the
polygons therefore match the painted pixels up to the anti-aliased edge.

Every image is drawn from its own random generator, seeded by ``(seed, split, index)``: pixels
and annotations do not depend on the counts asked for, and a re-run gives bit-identical files.
Idempotency and the refusal to overwrite foreign folders come from ``pfcr_mm.demo.manifest``.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw
from shapely import affinity
from shapely.geometry import Polygon, box
from shapely.geometry.base import BaseGeometry

from pfcr_mm.demo.manifest import MANIFEST_NAME, generate_idempotent

__all__ = [
    "CATEGORIES",
    "MANIFEST_NAME",
    "generate_coco_shapes",
    "render_scene",
    "scene_rng",
]

# Bump when the drawing changes: the same seed then means different pixels, and a manifest written
# by another version no longer counts as a match.
GENERATOR_VERSION = 1
GENERATOR_NAME = "pfcr_mm.demo.coco_shapes"
SPLITS = ("train", "val")
FOLDERS = ("train", "val", "annotations")
CATEGORIES: tuple[str, ...] = ("ellipse", "rectangle", "triangle", "star")  # COCO ids 1..4
SUPERSAMPLE = 4  # sub-pixels per pixel along each axis, for anti-aliased edges
LUMA = np.array([0.299, 0.587, 0.114])  # ITU-R BT.601 weights
REFERENCE_SIZE = 160  # the sizes below are in pixels at this image size and scale with it
RADIUS_RANGE = (9.0, 28.0)  # half-extent of an object
MAX_OBJECTS = 5
PLACEMENT_TRIES = 30
MIN_INSIDE_FRACTION = 0.75  # of an object's polygon that must lie inside the image
MIN_VISIBLE_FRACTION = 0.5  # of an object's in-image area that later objects must leave visible
MIN_PART_AREA = 20.0  # px^2 at the reference size; smaller visible pieces are not allowed


# --- polygons in local coordinates (centred at 0, before rotation), (K, 2) float64 -------------


def _ellipse(rng: np.random.Generator, r: float) -> np.ndarray:
    t = np.linspace(0.0, 2.0 * np.pi, 40, endpoint=False)
    return np.stack([r * np.cos(t), r * rng.uniform(0.55, 1.0) * np.sin(t)], axis=1)


def _rectangle(rng: np.random.Generator, r: float) -> np.ndarray:
    w, h = r, r * rng.uniform(0.45, 1.0)
    return np.array([[-w, -h], [w, -h], [w, h], [-w, h]])


def _triangle(rng: np.random.Generator, r: float) -> np.ndarray:
    # An equilateral triangle with jittered corner angles and radii: varied, never degenerate
    # (each corner stays within 0.35 rad of its 120 degree slot).
    angles = -np.pi / 2 + 2.0 * np.pi / 3.0 * np.arange(3) + rng.uniform(-0.35, 0.35, size=3)
    radii = r * rng.uniform(0.85, 1.1, size=3)
    return np.stack([radii * np.cos(angles), radii * np.sin(angles)], axis=1)


def _star(rng: np.random.Generator, r: float) -> np.ndarray:
    inner = rng.uniform(0.4, 0.55)  # thick enough arms to stay visible at the smallest size
    angles = -np.pi / 2 + np.pi / 5.0 * np.arange(10)
    radii = r * np.where(np.arange(10) % 2 == 0, 1.0, inner)
    return np.stack([radii * np.cos(angles), radii * np.sin(angles)], axis=1)


SHAPES: dict[str, Callable[[np.random.Generator, float], np.ndarray]] = {
    "ellipse": _ellipse,
    "rectangle": _rectangle,
    "triangle": _triangle,
    "star": _star,
}


# --- drawing ----------------------------------------------------------------------------------


def _coverage(poly: Polygon, size: int) -> tuple[np.ndarray, tuple[slice, slice]]:
    """Anti-aliased coverage of ``poly`` (pixel units, pixel (i, j) spans [j, j+1) x [i, i+1)).

    Returns the coverage in [0, 1] over the polygon's pixel window, (h, w, 1) float64, and the
    (rows, cols) slices of that window in the image. Drawn with PIL at SUPERSAMPLE x resolution in
    the window only and box-filtered down.
    """
    s = SUPERSAMPLE
    minx, miny, maxx, maxy = poly.bounds
    x0, y0 = max(int(np.floor(minx)), 0), max(int(np.floor(miny)), 0)
    x1, y1 = min(int(np.ceil(maxx)), size), min(int(np.ceil(maxy)), size)
    w, h = max(x1 - x0, 1), max(y1 - y0, 1)
    canvas = Image.new("L", (w * s, h * s), 0)
    # PIL puts sub-pixel m's centre at integer m, i.e. at continuous (m + 0.5) / s: shift by 0.5.
    xy = [((x - x0) * s - 0.5, (y - y0) * s - 0.5) for x, y in poly.exterior.coords[:-1]]
    ImageDraw.Draw(canvas).polygon(xy, fill=1)
    cover = np.asarray(canvas, dtype=np.float64).reshape(h, s, w, s).mean(axis=(1, 3))
    return cover[..., None], (slice(y0, y0 + h), slice(x0, x0 + w))


def _paint(img: np.ndarray, poly: Polygon, colour: np.ndarray | Callable) -> np.ndarray:
    """Alpha-blend ``poly`` into ``img`` (H, W, 3) in place; returns its coverage window.

    ``colour`` is an RGB (3,) or a function of the window's pixel grid (ys, xs) -> (h, w, 3).
    """
    alpha, (rows, cols) = _coverage(poly, img.shape[0])
    if callable(colour):
        ys, xs = np.mgrid[rows, cols].astype(np.float64) + 0.5
        colour = colour(ys, xs)
    window = img[rows, cols]
    window *= 1.0 - alpha
    window += alpha * colour
    return alpha


def _value_noise(rng: np.random.Generator, size: int, cells: int, channels: int) -> np.ndarray:
    """Bilinearly interpolated random grid in [-1, 1]: (size, size, channels), ``cells`` periods."""
    grid = rng.uniform(-1.0, 1.0, size=(cells + 1, cells + 1, channels))
    u = (np.arange(size) + 0.5) / size * cells
    i = np.minimum(u.astype(int), cells - 1)
    f = (u - i)[:, None]
    rows = grid[i] * (1.0 - f[..., None]) + grid[i + 1] * f[..., None]  # (size, cells+1, C)
    fx = f.T[..., None]  # (1, size, 1)
    return rows[:, i] * (1.0 - fx) + rows[:, i + 1] * fx


def _background(rng: np.random.Generator, size: int) -> np.ndarray:
    """Smooth colour blotches plus fine grey grain around a random colour: (size, size, 3)."""
    base = rng.uniform(0.2, 0.8, size=3)
    blotches = rng.uniform(0.08, 0.25) * _value_noise(rng, size, int(rng.integers(2, 5)), 3)
    grain = rng.uniform(0.02, 0.10) * _value_noise(rng, size, int(rng.integers(16, 40)), 1)
    return np.clip(base + blotches + grain, 0.0, 1.0)


def _clutter(rng: np.random.Generator, size: int) -> Polygon:
    """A thin stroke (a long narrow rectangle) or a small dot, smaller than any object."""
    scale = size / REFERENCE_SIZE
    centre = rng.uniform(0.0, size, size=2)
    if rng.uniform() < 0.6:
        half_len, half_width = rng.uniform(6.0, 30.0) * scale, rng.uniform(0.4, 1.0) * scale
        local = np.array([[-half_len, -half_width], [half_len, -half_width]])
        local = np.concatenate([local, -local])
    else:
        t = np.linspace(0.0, 2.0 * np.pi, 12, endpoint=False)
        local = rng.uniform(1.0, 3.0) * scale * np.stack([np.cos(t), np.sin(t)], axis=1)
    poly = Polygon(local)
    return affinity.translate(
        affinity.rotate(poly, rng.uniform(0.0, np.pi), origin=(0, 0), use_radians=True),
        *centre,
    )


def _parts(geom: BaseGeometry) -> list[Polygon]:
    """The polygons of a shapely result (Polygon, MultiPolygon or collection); lines dropped."""
    if geom.is_empty:
        return []
    if isinstance(geom, Polygon):
        return [geom]
    return [p for g in getattr(geom, "geoms", []) for p in _parts(g)]


def _annotatable(geom: BaseGeometry, min_area: float, min_part_area: float) -> bool:
    """Whether a visible region is fit for COCO polygons: big enough, no holes, no slivers."""
    parts = _parts(geom)
    return (
        bool(parts)
        and sum(p.area for p in parts) >= min_area
        and all(len(p.interiors) == 0 and p.area >= min_part_area for p in parts)
    )


def _contrasting_colour(
    rng: np.random.Generator, against: list[np.ndarray], min_step: list[float]
) -> np.ndarray:
    """A random RGB colour whose luma differs from each ``against[k]`` by >= ``min_step[k]``.

    Rejection sampling from the image's own generator (deterministic); if nothing qualifies in 100
    draws, the draw with the largest worst-case margin.
    """
    best, best_margin = None, -np.inf
    for _ in range(100):
        colour = rng.uniform(0.0, 1.0, size=3)
        margin = min(abs(LUMA @ (colour - a)) - m for a, m in zip(against, min_step))
        if margin >= 0.0:
            return colour
        if margin > best_margin:
            best, best_margin = colour, margin
    return best


@dataclass
class _Instance:
    category: int  # index into CATEGORIES
    polygon: Polygon  # full polygon clipped to the image
    visible: BaseGeometry  # what later objects leave of it
    colour: np.ndarray  # (3,) base colour


def render_scene(rng: np.random.Generator, image_size: int = 160) -> tuple[np.ndarray, list[dict]]:
    """Draw one scene from ``rng``.

    Returns the image, (image_size, image_size, 3) uint8 RGB, and its objects in painting order
    (bottom first), each a dict with ``category_id`` (1-based), ``segmentation`` (list of flat
    [x1, y1, x2, y2, ...] polygons, pixel units, 2 decimals), ``bbox`` ([x, y, w, h] of those
    polygons), ``area`` (of the visible region, px^2).
    """
    size = image_size
    scale = size / REFERENCE_SIZE
    frame = box(0.0, 0.0, float(size), float(size))
    img = _background(rng, size)
    for _ in range(int(rng.integers(2, 9))):
        _paint(img, _clutter(rng, size).intersection(frame), rng.uniform(0.0, 1.0, size=3))

    instances: list[_Instance] = []
    for _ in range(int(rng.integers(1, MAX_OBJECTS + 1))):
        category = int(rng.integers(len(CATEGORIES)))
        radius = rng.uniform(*RADIUS_RANGE) * scale
        local = Polygon(SHAPES[CATEGORIES[category]](rng, radius))
        placed = None
        for attempt in range(PLACEMENT_TRIES):
            theta = rng.uniform(0.0, 2.0 * np.pi)
            centre = rng.uniform(0.6 * radius, size - 0.6 * radius, size=2)
            if attempt == PLACEMENT_TRIES - 1 and not instances:
                centre = np.array([size / 2.0, size / 2.0])  # the first object always fits here
            poly = affinity.translate(
                affinity.rotate(local, theta, origin=(0, 0), use_radians=True), *centre
            )
            clipped = poly.intersection(frame)
            if clipped.area < MIN_INSIDE_FRACTION * poly.area or not isinstance(clipped, Polygon):
                continue
            # Later objects occlude earlier ones: every earlier object must stay annotatable.
            remaining = [inst.visible.difference(clipped) for inst in instances]
            if all(
                _annotatable(
                    rem,
                    MIN_VISIBLE_FRACTION * inst.polygon.area,
                    MIN_PART_AREA * scale * scale,
                )
                for rem, inst in zip(remaining, instances)
            ):
                placed = clipped, remaining
                break
        if placed is None:
            continue  # no place found: the object is left out of image and annotations alike
        clipped, remaining = placed
        for inst, rem in zip(instances, remaining):
            inst.visible = rem

        # Contrast against the background under the object and against the objects it covers,
        # so that every visible boundary is visible in the pixels too.
        alpha, (rows, cols) = _coverage(clipped, size)
        under = (img[rows, cols] * alpha).sum(axis=(0, 1)) / max(alpha.sum(), 1e-9)
        covered = [inst.colour for inst in instances if inst.polygon.intersects(clipped)]
        colour = _contrasting_colour(rng, [under, *covered], [0.25] + [0.15] * len(covered))
        # A mild linear shading across the object, so that objects are not flat colour blobs.
        phi, strength = rng.uniform(0.0, 2.0 * np.pi), rng.uniform(-0.2, 0.2)
        cx, cy = centre

        def shaded(ys, xs, colour=colour, phi=phi, strength=strength, cx=cx, cy=cy, r=radius):
            ramp = ((xs - cx) * np.cos(phi) + (ys - cy) * np.sin(phi)) / r
            return np.clip(colour * (1.0 + strength * ramp)[..., None], 0.0, 1.0)

        _paint(img, clipped, shaded)
        instances.append(_Instance(category, clipped, clipped, colour))

    img += rng.normal(0.0, rng.uniform(0.01, 0.05), size=img.shape)
    pixels = np.clip(np.rint(img * 255.0), 0, 255).astype(np.uint8)
    return pixels, [_annotation(inst) for inst in instances]


def _annotation(inst: _Instance) -> dict:
    """COCO fields of one instance from its visible region (rounded to 2 decimals)."""
    segmentation = []
    for part in _parts(inst.visible):
        coords = np.round(np.asarray(part.exterior.coords[:-1]), 2)
        segmentation.append([float(v) for v in coords.reshape(-1)])
    xs = np.concatenate([np.asarray(s[0::2]) for s in segmentation])
    ys = np.concatenate([np.asarray(s[1::2]) for s in segmentation])
    x0, y0 = float(xs.min()), float(ys.min())
    return {
        "category_id": inst.category + 1,
        "segmentation": segmentation,
        "bbox": [x0, y0, round(float(xs.max()) - x0, 2), round(float(ys.max()) - y0, 2)],
        "area": round(float(inst.visible.area), 2),
    }


def scene_rng(seed: int, split: str, index: int) -> np.random.Generator:
    """The generator of one scene, a function of its identity only (not of counts or order)."""
    # A leading tag keeps these streams apart from the classification set's (seed, split, ...).
    return np.random.default_rng([seed, SPLITS.index(split), index, 0xC0C0])


def _is_ours(rel: Path, is_dir: bool) -> bool:
    """Whether ``rel`` (relative to the root) is a path this generator writes."""
    parts = rel.parts
    if is_dir:
        return False  # the three folders hold files only
    if len(parts) == 2 and parts[0] in SPLITS:
        return rel.suffix == ".png"
    return (
        len(parts) == 2
        and parts[0] == "annotations"
        and parts[1] in {f"instances_{split}.json" for split in SPLITS}
    )


def generate_coco_shapes(
    root: str | Path,
    num_train: int = 600,
    num_val: int = 100,
    image_size: int = 160,
    seed: int = 0,
) -> dict:
    """Write the demo COCO shapes set into ``root`` unless an identical one is already there.

    Returns the manifest (``seed``, ``image_size``, ``categories``, ``num_images``,
    ``num_instances`` per split and category, ``num_files``, ``sha256``) plus ``action``
    (``"generated"``, ``"regenerated"`` or ``"skipped"``), ``root`` and ``seconds``.

    Raises FileExistsError if ``root`` is a non-empty folder without a demo manifest, or if a demo
    folder holds files that the generator did not write.
    """
    if num_train < 1 or num_val < 1 or image_size < 64:
        raise ValueError(
            "need num_train >= 1, num_val >= 1 and image_size >= 64, got "
            f"{num_train}, {num_val}, {image_size}"
        )
    counts = {"train": num_train, "val": num_val}
    requested = {
        "generator": GENERATOR_NAME,
        "generator_version": GENERATOR_VERSION,
        "seed": seed,
        "image_size": image_size,
        "categories": list(CATEGORIES),
        "num_images": counts,
    }
    categories = [
        {"id": k + 1, "name": name, "supercategory": "shape"} for k, name in enumerate(CATEGORIES)
    ]

    def write(root: Path) -> dict:
        (root / "annotations").mkdir(parents=True, exist_ok=True)
        num_instances = {}
        for split in SPLITS:
            folder = root / split
            folder.mkdir(parents=True, exist_ok=True)
            images, annotations = [], []
            for index in range(counts[split]):
                pixels, objects = render_scene(scene_rng(seed, split, index), image_size)
                file_name = f"{index:05d}.png"
                # Plain PNG, no metadata chunks: the bytes depend on the pixels only.
                Image.fromarray(pixels).save(folder / file_name, format="PNG", compress_level=6)
                image_id = index + 1  # COCO ids from 1: 0 reads as "missing" in some tools
                images.append(
                    {
                        "id": image_id,
                        "file_name": file_name,
                        "width": image_size,
                        "height": image_size,
                    }
                )
                for obj in objects:
                    annotations.append(
                        {"id": len(annotations) + 1, "image_id": image_id, **obj, "iscrowd": 0}
                    )
            coco = {
                "info": {
                    "description": f"pfcr_mm demo COCO shapes, {split}",
                    "generator": GENERATOR_NAME,
                    "generator_version": GENERATOR_VERSION,
                    "seed": seed,
                },
                "licenses": [],
                "images": images,
                "annotations": annotations,
                "categories": categories,
            }
            path = root / "annotations" / f"instances_{split}.json"
            path.write_text(json.dumps(coco, separators=(",", ":")) + "\n")
            num_instances[split] = {
                name: sum(a["category_id"] == k + 1 for a in annotations)
                for k, name in enumerate(CATEGORIES)
            }
        return {"num_instances": num_instances}

    return generate_idempotent(
        root,
        requested,
        folders=FOLDERS,
        is_ours=_is_ours,
        write=write,
        description="demo COCO shapes",
    )
