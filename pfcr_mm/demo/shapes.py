"""A deterministic synthetic image classification set ("demo shapes") in ImageNet folder layout.

``generate_shapes_dataset(root)`` writes ``<root>/train/<class>/<idx>.png`` and
``<root>/val/<class>/<idx>.png``: RGB images of ``image_size`` x ``image_size`` pixels, each
showing one of ten shapes (``CLASSES``) at a random position, scale, small rotation and colour,
over a gradient background with thin distractor strokes and dots and pixel noise.

Every image is drawn with numpy alone from its own random generator, seeded by
``(seed, split, class, index)``: the pixels do not depend on the counts asked for or on the
order of drawing, and a re-run gives bit-identical PNG files. ``manifest.json`` in ``root``
records the parameters and a sha256 over all files; it makes generation idempotent and marks the
folder as ours, so a folder holding anything else is never overwritten.

All classes are unchanged by a horizontal flip (and none by a 90 degree rotation: stripes_h vs
stripes_v, cross vs x_cross), which is what training augmentation may rely on.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
from PIL import Image

from pfcr_mm.demo.manifest import MANIFEST_NAME, generate_idempotent

# Bump when the drawing changes: the same seed then means different pixels, and a manifest written
# by another version no longer counts as a match.
GENERATOR_VERSION = 1
GENERATOR_NAME = "pfcr_mm.demo.shapes"
__all__ = ["CLASSES", "MANIFEST_NAME", "generate_shapes_dataset", "image_rng", "render_shape_image"]
SPLITS = ("train", "val")
# Sub-pixel samples per pixel along each axis: shapes are drawn at 4x and box-filtered down,
# which gives anti-aliased edges without any drawing library.
SUPERSAMPLE = 4
LUMA = np.array([0.299, 0.587, 0.114])  # ITU-R BT.601 weights

Mask = np.ndarray  # (H*S, W*S) bool, in local shape coordinates


# --- shapes in local coordinates --------------------------------------------------------------
# Each function gets local coordinates (x, y) of the sub-pixel grid, already translated to the
# shape centre, rotated and divided by the shape's half-size (so the shape lives in about
# [-1, 1]^2, y pointing down), plus the image's generator for the shape's own free parameters.


def _circle(x: np.ndarray, y: np.ndarray, rng: np.random.Generator) -> Mask:
    return x * x + y * y <= 1.0


def _ring(x: np.ndarray, y: np.ndarray, rng: np.random.Generator) -> Mask:
    inner = rng.uniform(0.45, 0.7)
    rho2 = x * x + y * y
    return (rho2 <= 1.0) & (rho2 >= inner * inner)


def _square(x: np.ndarray, y: np.ndarray, rng: np.random.Generator) -> Mask:
    return np.maximum(np.abs(x), np.abs(y)) <= 0.85


def _frame(x: np.ndarray, y: np.ndarray, rng: np.random.Generator) -> Mask:
    inner = 0.85 * rng.uniform(0.5, 0.7)
    cheb = np.maximum(np.abs(x), np.abs(y))
    return (cheb <= 0.85) & (cheb >= inner)


def _triangle(x: np.ndarray, y: np.ndarray, rng: np.random.Generator) -> Mask:
    # Equilateral, apex up at (0, -1), base at y = 0.5; the sides are sqrt(3)|x| - y = 1.
    return (y <= 0.5) & (np.sqrt(3.0) * np.abs(x) - y <= 1.0)


def _plus(x: np.ndarray, y: np.ndarray, rng: np.random.Generator) -> Mask:
    half_width = rng.uniform(0.2, 0.32)
    ax, ay = np.abs(x), np.abs(y)
    return ((ax <= half_width) & (ay <= 1.0)) | ((ay <= half_width) & (ax <= 1.0))


def _x_cross(x: np.ndarray, y: np.ndarray, rng: np.random.Generator) -> Mask:
    # A plus turned by 45 degrees; the arms reach the corners of the [-1, 1] box.
    u, v = (x + y) / np.sqrt(2.0), (x - y) / np.sqrt(2.0)
    return _plus(u / 1.2, v / 1.2, rng)


def _stripes(coord: np.ndarray, x: np.ndarray, y: np.ndarray, rng: np.random.Generator) -> Mask:
    # 2.5-3.5 periods over the patch: at the smallest allowed size a period is still >= 4 pixels.
    periods = rng.uniform(2.5, 3.5)
    phase = rng.uniform(0.0, 2.0 * np.pi)
    inside = np.maximum(np.abs(x), np.abs(y)) <= 0.9
    return inside & (np.sin(coord * np.pi * periods / 0.9 + phase) > 0.0)


def _stripes_h(x: np.ndarray, y: np.ndarray, rng: np.random.Generator) -> Mask:
    return _stripes(y, x, y, rng)


def _stripes_v(x: np.ndarray, y: np.ndarray, rng: np.random.Generator) -> Mask:
    return _stripes(x, x, y, rng)


def _checker(x: np.ndarray, y: np.ndarray, rng: np.random.Generator) -> Mask:
    cells = rng.uniform(1.5, 2.0)  # cells per half-side: 3-4 cells across
    phase_x, phase_y = rng.uniform(0.0, 2.0 * np.pi, size=2)
    inside = np.maximum(np.abs(x), np.abs(y)) <= 0.9
    sx = np.sin(x * np.pi * cells / 0.9 + phase_x)
    sy = np.sin(y * np.pi * cells / 0.9 + phase_y)
    return inside & (sx * sy > 0.0)


# name -> (mask function, (min, max) half-size in pixels at image_size 32)
SHAPES: dict[str, tuple[Callable[..., Mask], tuple[float, float]]] = {
    "circle": (_circle, (4.5, 11.0)),
    "ring": (_ring, (5.5, 11.0)),
    "square": (_square, (4.5, 11.0)),
    "frame": (_frame, (5.5, 11.0)),
    "triangle": (_triangle, (5.5, 12.0)),
    "cross": (_plus, (5.0, 11.0)),
    "x_cross": (_x_cross, (5.0, 11.0)),
    "stripes_h": (_stripes_h, (6.5, 12.0)),
    "stripes_v": (_stripes_v, (6.5, 12.0)),
    "checker": (_checker, (6.5, 12.0)),
}
CLASSES: tuple[str, ...] = tuple(sorted(SHAPES))  # the label order ImageFolderDataset will use


# --- drawing ----------------------------------------------------------------------------------


def _subpixel_grid(size: int) -> tuple[np.ndarray, np.ndarray]:
    """Pixel-unit coordinates (x, y) of the sub-pixel centres, each (size*S, size*S)."""
    c = (np.arange(size * SUPERSAMPLE) + 0.5) / SUPERSAMPLE
    return np.meshgrid(c, c, indexing="xy")


def _coverage(mask: Mask, size: int) -> np.ndarray:
    """(size*S, size*S) bool -> (size, size, 1) float coverage in [0, 1] (box filter)."""
    s = SUPERSAMPLE
    return mask.reshape(size, s, size, s).mean(axis=(1, 3))[..., None]


def _paint(img: np.ndarray, alpha: np.ndarray, colour: np.ndarray) -> None:
    """Alpha-blend ``colour`` (3,) into ``img`` (H, W, 3) in place."""
    img *= 1.0 - alpha
    img += alpha * colour


def _background(rng: np.random.Generator, size: int) -> np.ndarray:
    """A linear gradient between two nearby random colours in a random direction, (size, size, 3).

    The two ends differ by at most 0.3 per channel, so the shape's contrast, chosen against the
    background at its centre, holds over the whole shape.
    """
    c0 = rng.uniform(0.0, 1.0, size=3)
    c1 = np.clip(c0 + rng.uniform(-0.3, 0.3, size=3), 0.0, 1.0)
    angle = rng.uniform(0.0, 2.0 * np.pi)
    t = (np.arange(size) + 0.5) / size - 0.5
    ramp = np.cos(angle) * t[None, :] + np.sin(angle) * t[:, None]  # in about [-0.71, 0.71]
    ramp = (ramp - ramp.min()) / (ramp.max() - ramp.min())
    return c0 * (1.0 - ramp[..., None]) + c1 * ramp[..., None]


def _distractor(rng: np.random.Generator, gx: np.ndarray, gy: np.ndarray, size: int) -> Mask:
    """A thin stroke (distance to a segment <= width/2) or a small dot, in pixel units."""
    if rng.uniform() < 0.6:
        p = rng.uniform(0.0, size, size=2)
        angle = rng.uniform(0.0, 2.0 * np.pi)
        q = p + rng.uniform(4.0, 12.0) * np.array([np.cos(angle), np.sin(angle)])
        d = q - p
        t = np.clip(((gx - p[0]) * d[0] + (gy - p[1]) * d[1]) / (d @ d), 0.0, 1.0)
        dist2 = (gx - p[0] - t * d[0]) ** 2 + (gy - p[1] - t * d[1]) ** 2
        return dist2 <= (rng.uniform(0.6, 1.4) / 2.0) ** 2
    centre = rng.uniform(0.0, size, size=2)
    return (gx - centre[0]) ** 2 + (gy - centre[1]) ** 2 <= rng.uniform(0.8, 2.2) ** 2


def _contrasting_colour(rng: np.random.Generator, against: np.ndarray) -> np.ndarray:
    """A random RGB colour whose luma differs from that of ``against`` (3,) by >= 0.3.

    Hue and saturation are free and the sign of the luma step is random (dark on light or light
    on dark), so the shape is defined by its outline only. A bare RGB distance would also allow
    iso-luminant pairs, which a tiny ViT trained for minutes barely learns. Rejection sampling
    from the image's own generator stays deterministic.
    """
    against_luma = LUMA @ against
    for _ in range(100):
        colour = rng.uniform(0.0, 1.0, size=3)
        if abs(LUMA @ colour - against_luma) >= 0.3:
            return colour
    return 1.0 - against  # practically unreachable (the luma step is possible for any colour)


def render_shape_image(
    class_name: str, rng: np.random.Generator, image_size: int = 32
) -> np.ndarray:
    """Draw one image of ``class_name`` from ``rng``: (image_size, image_size, 3) uint8 RGB."""
    mask_fn, (r_min, r_max) = SHAPES[class_name]
    scale = image_size / 32.0  # sizes above are tuned for 32 pixels
    gx, gy = _subpixel_grid(image_size)

    img = _background(rng, image_size)
    # Clutter behind the shape; one more stroke may land on top of it (partial occlusion).
    for _ in range(rng.integers(0, 4)):
        colour = rng.uniform(0.0, 1.0, size=3)
        _paint(img, _coverage(_distractor(rng, gx, gy, image_size), image_size), colour)

    radius = rng.uniform(r_min, r_max) * scale
    # The centre keeps at least ~70% of the half-size inside the image: shapes may be clipped a
    # little at the border, as after a crop, but never mostly.
    margin = 0.7 * radius
    cx, cy = rng.uniform(margin, image_size - margin, size=2)
    theta = rng.uniform(-np.pi / 12.0, np.pi / 12.0)  # +-15 degrees keeps cross vs x_cross apart
    cos, sin = np.cos(theta), np.sin(theta)
    dx, dy = gx - cx, gy - cy
    lx, ly = (cos * dx + sin * dy) / radius, (-sin * dx + cos * dy) / radius
    centre_px = img[int(min(cy, image_size - 1)), int(min(cx, image_size - 1))]
    colour = _contrasting_colour(rng, centre_px)
    _paint(img, _coverage(mask_fn(lx, ly, rng), image_size), colour)

    if rng.uniform() < 0.25:
        colour = rng.uniform(0.0, 1.0, size=3)
        _paint(img, _coverage(_distractor(rng, gx, gy, image_size), image_size), colour)

    img += rng.normal(0.0, rng.uniform(0.01, 0.06), size=img.shape)
    return np.clip(np.rint(img * 255.0), 0, 255).astype(np.uint8)


def image_rng(seed: int, split: str, class_index: int, index: int) -> np.random.Generator:
    """The generator of one image, a function of its identity only (not of counts or order)."""
    return np.random.default_rng([seed, SPLITS.index(split), class_index, index])


# --- folder, manifest, idempotency (shared with the other demo generators) -------------------


def _requested(seed: int, train_per_class: int, val_per_class: int, image_size: int) -> dict:
    return {
        "generator": GENERATOR_NAME,
        "generator_version": GENERATOR_VERSION,
        "seed": seed,
        "image_size": image_size,
        "classes": list(CLASSES),
        "per_class": {"train": train_per_class, "val": val_per_class},
    }


def _is_ours(rel: Path, is_dir: bool) -> bool:
    """Whether ``rel`` (relative to the root) is a path this generator writes:
    ``<split>/<class>`` folders and ``<split>/<class>/*.png`` files."""
    parts = rel.parts
    if len(parts) < 2 or parts[0] not in SPLITS or parts[1] not in CLASSES:
        return False
    return (len(parts) == 2 and is_dir) or (len(parts) == 3 and not is_dir and rel.suffix == ".png")


def generate_shapes_dataset(
    root: str | Path,
    train_per_class: int = 500,
    val_per_class: int = 100,
    image_size: int = 32,
    seed: int = 0,
) -> dict:
    """Write the demo shapes set into ``root`` unless an identical one is already there.

    Returns the manifest (``seed``, ``image_size``, ``classes``, ``per_class``, ``num_files``,
    ``sha256``) plus ``action`` (``"generated"``, ``"regenerated"`` or ``"skipped"``),
    ``root`` and ``seconds``.

    Raises FileExistsError if ``root`` is a non-empty folder without a demo manifest, or if a demo
    folder holds files that the generator did not write.
    """
    if train_per_class < 1 or val_per_class < 1 or image_size < 16:
        raise ValueError(
            "need train_per_class >= 1, val_per_class >= 1 and image_size >= 16, got "
            f"{train_per_class}, {val_per_class}, {image_size}"
        )
    counts = {"train": train_per_class, "val": val_per_class}

    def write(root: Path) -> None:
        for split in SPLITS:
            for class_index, class_name in enumerate(CLASSES):
                folder = root / split / class_name
                folder.mkdir(parents=True, exist_ok=True)
                for index in range(counts[split]):
                    pixels = render_shape_image(
                        class_name, image_rng(seed, split, class_index, index), image_size
                    )
                    # Plain PNG, no metadata chunks: the bytes depend on the pixels only.
                    Image.fromarray(pixels).save(
                        folder / f"{index:05d}.png", format="PNG", compress_level=6
                    )

    return generate_idempotent(
        root,
        _requested(seed, train_per_class, val_per_class, image_size),
        folders=SPLITS,
        is_ours=_is_ours,
        write=write,
        description="demo shapes",
    )
