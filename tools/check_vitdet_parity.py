"""Check our ViTDet Mask R-CNN config against MMDetection's own ViTDet code, from a source checkout.

    python tools/check_vitdet_parity.py MMDET_ROOT [--config CONFIG] [--sizes 1024x1024 640x896]
                                        [--out DIR] [--force]

MMDET_ROOT is a checkout of MMDetection 3.x (the pip package does not install its
``projects/ViTDet``). The check builds the detector of MMDetection's
``projects/ViTDet/configs/vitdet_mask-rcnn_vit-b-mae_lsj-100e.py`` with MMDetection's modules,
gives every parameter random values (relative positions and norms too, so that a swapped or
misread tensor shows), saves it as a checkpoint like the released one, loads that file strictly
into the FP detector of CONFIG (``configs/pfcr_mask_rcnn_vitdet_b_w4a4.py``: our
``pfcr.ViTDet``, ``pfcr.SimpleFPN``, ``pfcr.LN2d``) with the loader ``tools/ptq.py`` uses, and
compares the backbone map, the five neck maps and the detector's predictions on a random image
of each size. Nothing is downloaded; MMDetection's MAE pretraining file is not needed.

Writes ``DIR/benchmark.json`` (with the table ``DIR/benchmark.md``) and prints the table. Exit
code 1 when the outputs differ beyond float rounding, 2 on bad input.
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
from mmdet.registry import MODELS  # noqa: E402
from mmdet.structures import DetDataSample  # noqa: E402
from mmengine.config import Config  # noqa: E402
from mmengine.registry import init_default_scope  # noqa: E402

import pfcr_mm.engine.registry  # noqa: E402,F401  (registers pfcr.ViTDet, SimpleFPN, LN2d)
from pfcr_mm.atomic import atomic_path  # noqa: E402
from pfcr_mm.benchmark_tables import vitdet_parity_table  # noqa: E402
from pfcr_mm.engine.checkpoint import load_weights_strict  # noqa: E402

PEER_CONFIG = "projects/ViTDet/configs/vitdet_mask-rcnn_vit-b-mae_lsj-100e.py"
# beyond float32 rounding of a ViT-B at 1024x1024 (measured: 5e-7 backbone, 1e-6 neck); every
# detection must have its twin within 0.01 px
MAX_FEATURE_REL_DIFF = 1e-4


def _size(text: str) -> tuple[int, int]:
    try:
        h, w = (int(v) for v in text.lower().split("x"))
    except ValueError:
        message = f"size {text!r}: write HEIGHTxWIDTH, e.g. 640x896"
        raise argparse.ArgumentTypeError(message) from None
    if h < 32 or w < 32:
        raise argparse.ArgumentTypeError(f"size {text!r}: both sides must be >= 32")
    return h, w


def _checked_root(root: Path) -> Path:
    if not (root / PEER_CONFIG).is_file() or not (root / "projects/ViTDet/vitdet").is_dir():
        raise FileNotFoundError(
            f"{root} is not an MMDetection 3.x source checkout: {PEER_CONFIG} or "
            "projects/ViTDet/vitdet is missing (git clone "
            "https://github.com/open-mmlab/mmdetection and pass its folder)"
        )
    return root.resolve()


def _commit(root: Path) -> str | None:
    done = subprocess.run(
        ["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True, text=True
    )
    return done.stdout.strip() if done.returncode == 0 else None


def _randomized(model: torch.nn.Module, seed: int) -> torch.nn.Module:
    """Every parameter moved off its initialization (relative positions and norm affines, which
    start at zero or one, by more)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            scale = 0.05 if ("norm" in name or "rel_pos" in name) else 0.02
            p.add_(scale * torch.randn(p.shape, generator=gen))
    return model


def _rel(ours: torch.Tensor, theirs: torch.Tensor) -> float:
    return float((ours - theirs).norm() / theirs.norm())


def _compare(theirs, ours, size: tuple[int, int], seed: int) -> dict:
    """The backbone map, the neck maps and the predictions of both detectors on one image."""
    h, w = size
    image = torch.randn(1, 3, h, w, generator=torch.Generator().manual_seed(seed))
    meta = dict(img_shape=size, ori_shape=size, pad_shape=size, batch_input_shape=size)
    meta["scale_factor"] = (1.0, 1.0)
    start = time.perf_counter()
    with torch.no_grad():
        b_theirs, b_ours = theirs.backbone(image), ours.backbone(image)
        b_theirs = b_theirs[0] if isinstance(b_theirs, (tuple, list)) else b_theirs
        b_ours = b_ours[0] if isinstance(b_ours, (tuple, list)) else b_ours
        n_theirs, n_ours = theirs.neck(b_theirs), ours.neck(b_ours)
        p_theirs = theirs.predict(image, [DetDataSample(metainfo=meta)])[0].pred_instances
        p_ours = ours.predict(image, [DetDataSample(metainfo=meta)])[0].pred_instances
    row = {
        "size": [h, w],
        "backbone_shape": list(b_ours.shape),
        "backbone_rel_diff": _rel(b_ours, b_theirs),
        "neck_rel_diff": [_rel(a, b) for a, b in zip(n_ours, n_theirs)],
        "detections": [len(p_theirs), len(p_ours)],
    }
    if len(p_theirs) and len(p_ours):
        row.update(_matched(p_theirs, p_ours))
    row["seconds"] = round(time.perf_counter() - start, 1)
    return row


def _matched(theirs, ours) -> dict:
    """Each of MMDetection's detections paired with our detection of the same class whose box is
    nearest (in the largest coordinate difference): detections of near-equal scores may come in
    another order."""
    dist = (theirs.bboxes[:, None, :] - ours.bboxes[None, :, :]).abs().amax(-1)
    dist[theirs.labels[:, None] != ours.labels[None, :]] = float("inf")
    nearest, index = dist.min(1)
    return {
        "matched_within_0.01px": int((nearest < 0.01).sum()),
        "boxes_max_abs_diff_px": float(nearest.max()),
        "scores_max_abs_diff": float((theirs.scores - ours.scores[index]).abs().max()),
        "mask_pixels_differing": float((theirs.masks != ours.masks[index]).float().mean()),
    }


def _passed(row: dict) -> bool:
    features = [row["backbone_rel_diff"], *row["neck_rel_diff"]]
    everyone = row.get("matched_within_0.01px") == row["detections"][0] == row["detections"][1]
    return max(features) < MAX_FEATURE_REL_DIFF and everyone


def run(args: argparse.Namespace) -> dict:
    root = _checked_root(Path(args.mmdet_root))
    if not Path(args.config).is_file():
        raise FileNotFoundError(f"config not found: {args.config}")
    sys.path.insert(0, str(root))  # the peer config's custom_imports: projects.ViTDet.vitdet
    init_default_scope("mmdet")
    theirs = _randomized(MODELS.build(Config.fromfile(str(root / PEER_CONFIG)).model), args.seed)
    ours = MODELS.build(Config.fromfile(args.config).model)
    state = theirs.state_dict()
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "mmdet_vitdet_random.pth"
        torch.save(
            {"meta": {"note": "random weights, MMDetection's modules"}, "state_dict": state}, path
        )
        load_weights_strict(ours, path)
    theirs.eval(), ours.eval()
    rows = []
    for size in args.sizes:
        rows.append(_compare(theirs, ours, size, args.seed))
        print(f"{size[0]}x{size[1]}: {json.dumps(rows[-1])}", flush=True)
    return {
        "parity": rows,
        "mmdet_root_commit": _commit(root),
        "peer_config": PEER_CONFIG,
        "config": args.config,
        "checkpoint_keys": len(state),
        "checkpoint_parameters": sum(v.numel() for v in state.values()),
        "seed": args.seed,
        "threads": torch.get_num_threads(),
        "versions": {"torch": torch.__version__, "python": platform.python_version()},
    }


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("mmdet_root", help="an MMDetection 3.x source checkout (with projects/ViTDet)")
    p.add_argument("--config", default="configs/pfcr_mask_rcnn_vitdet_b_w4a4.py")
    p.add_argument("--sizes", type=_size, nargs="+", default=[(1024, 1024), (640, 896)])
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="work_dirs/vitdet_parity", help="folder for benchmark.json")
    p.add_argument("--force", action="store_true", help="overwrite an existing DIR/benchmark.json")
    args = p.parse_args(argv)
    out = Path(args.out)
    try:
        if (out / "benchmark.json").exists() and not args.force:
            raise FileExistsError(f"{out / 'benchmark.json'} exists; pass --force to overwrite it")
        result = run(args)
    except (FileNotFoundError, FileExistsError, KeyError) as err:
        message = err.args[0] if isinstance(err, KeyError) and err.args else err
        print(f"error: {message}", file=sys.stderr)
        return 2
    out.mkdir(parents=True, exist_ok=True)
    table = vitdet_parity_table(result)
    for name, text in (
        ("benchmark.json", json.dumps(result, indent=1) + "\n"),
        ("benchmark.md", table),
    ):
        with atomic_path(out / name) as tmp:
            tmp.write_text(text)
    print(table)
    return 0 if all(_passed(r) for r in result["parity"]) else 1


if __name__ == "__main__":
    sys.exit(main())
