"""Train the demo classifier: a tiny timm ViT on the synthetic shapes set, on CPU, deterministic.

    python tools/make_demo_data.py --only classification  # data/demo_shapes (once)
    python tools/train/train_demo_classifier.py           # checkpoints/demo_vit_shapes.{pth,json}

The whole set is decoded once into tensors through the project's ``ImageFolderDataset`` with the
demo's evaluation preprocessing (resize 32, crop 32, mean = std = 0.5, bilinear), so training sees
exactly the inputs the evaluation config will feed. Augmentation works on those tensors: a random
shift of up to ``--pad`` pixels (crop with zero padding, i.e. mid-grey) and a horizontal flip,
which leaves every demo class unchanged. The checkpoint is a plain float32 ``state_dict``; the
JSON next to it holds the settings, per-epoch history (train loss is the mean over the epoch's
augmented batches), val top-1, wall time and versions. Two runs with the same arguments and thread
count give bit-identical weights (deterministic algorithms, one seeded generator for everything).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # run from a checkout, uninstalled

from pfcr_mm.demo.shapes import CLASSES, MANIFEST_NAME  # noqa: E402
from pfcr_mm.engine.classification import ImageFolderDataset, create_timm_model  # noqa: E402
from pfcr_mm.provenance import file_sha256, package_versions, write_json  # noqa: E402

ARCH = "vit_tiny_patch16_224"
# 32x32 inputs in 4x4 patches: 64 tokens + cls. Width 96 with 3 heads of 32 and depth 6 keep the
# model a real (if tiny) ViT with every block type the quantizer handles, at ~0.68 M parameters
# (~2.7 MB float32), small enough to train in minutes on two CPU cores.
MODEL_KWARGS = dict(img_size=32, patch_size=4, embed_dim=96, depth=6, num_heads=3, num_classes=10)
PREPROCESS = dict(
    resize=32, crop_size=32, mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5), interpolation="bilinear"
)
MAX_CHECKPOINT_BYTES = 5 * 1024 * 1024


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--data-root", default="data/demo_shapes")
    p.add_argument(
        "--out",
        default="checkpoints/demo_vit_shapes.pth",
        help="checkpoint path; the JSON report goes next to it (.json)",
    )
    p.add_argument("--epochs", type=int, default=20)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--lr", type=float, default=1e-3, help="peak AdamW learning rate")
    p.add_argument("--min-lr", type=float, default=1e-5, help="cosine floor")
    p.add_argument("--weight-decay", type=float, default=0.05)
    p.add_argument("--warmup-epochs", type=float, default=1.0)
    p.add_argument("--label-smoothing", type=float, default=0.0)
    p.add_argument("--pad", type=int, default=3, help="random shift, pixels (0: none)")
    p.add_argument("--no-flip", action="store_true", help="disable the horizontal flip")
    p.add_argument(
        "--model-kwargs",
        type=json.loads,
        default={},
        help="JSON dict merged over the default timm kwargs (experiments only: the "
        "evaluation config must then use the same kwargs)",
    )
    p.add_argument("--seed", type=int, default=0)
    # CPU results are bit-for-bit reproducible only for a fixed thread count (it sets the
    # reduction order in matmuls), so the default is a fixed number, not the core count.
    p.add_argument("--threads", type=int, default=1)
    return p.parse_args()


def load_split(data_root: str, split: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Decode a split once: inputs (N, 3, 32, 32) float32, labels (N,) int64."""
    ds = ImageFolderDataset(data_root, split, **PREPROCESS)
    if tuple(ds.classes) != CLASSES:
        raise ValueError(f"{data_root}/{split} has classes {ds.classes}, expected {CLASSES}")
    items = [ds[i] for i in range(len(ds))]
    inputs = torch.stack([it["inputs"] for it in items])
    labels = torch.tensor([it["data_samples"]["gt_label"] for it in items], dtype=torch.long)
    return inputs, labels


def augment(x: torch.Tensor, pad: int, flip: bool, gen: torch.Generator) -> torch.Tensor:
    """Random shift by up to ``pad`` pixels (zero fill) and horizontal flip; (B,3,H,W) -> same."""
    b, _, h, w = x.shape
    if pad > 0:
        padded = F.pad(x, (pad, pad, pad, pad))  # 0 is mid-grey after normalisation
        dy = torch.randint(0, 2 * pad + 1, (b,), generator=gen)
        dx = torch.randint(0, 2 * pad + 1, (b,), generator=gen)
        # Gather per-sample crops with index arithmetic: one op, no Python loop over the batch.
        c, wp = x.shape[1], w + 2 * pad
        rows = (dy[:, None] + torch.arange(h))[:, None, :, None].expand(b, c, h, wp)
        cols = (dx[:, None] + torch.arange(w))[:, None, None, :].expand(b, c, h, w)
        x = padded.gather(2, rows).gather(3, cols)
    if flip:
        mask = torch.rand(b, generator=gen) < 0.5
        x = torch.where(mask[:, None, None, None], x.flip(3), x)
    return x


@torch.no_grad()
def evaluate(
    model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, batch_size: int = 250
) -> float:
    """Top-1 accuracy in percent."""
    model.eval()
    correct = sum(
        int((model(x[i : i + batch_size]).argmax(1) == y[i : i + batch_size]).sum())
        for i in range(0, len(x), batch_size)
    )
    return 100.0 * correct / len(x)


def lr_at(step: int, total: int, warmup: int, peak: float, floor: float) -> float:
    """Linear warm-up to ``peak`` then cosine decay to ``floor``."""
    if step < warmup:
        return peak * (step + 1) / warmup
    t = (step - warmup) / max(1, total - warmup)
    return floor + 0.5 * (peak - floor) * (1.0 + math.cos(math.pi * t))


def main() -> None:
    args = parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    np.random.seed(args.seed)
    try:
        torch.use_deterministic_algorithms(True)
        # Deterministic mode also fills every new tensor with NaN/int-max (~15% of the step time
        # here). That fill only matters for ops that read memory they did not write; none here do,
        # as two runs giving bit-identical weights confirm.
        torch.utils.deterministic.fill_uninitialized_memory = False
        deterministic = True
    except Exception as err:  # noqa: BLE001 - report and go on; the run stays seeded
        print(f"warning: deterministic algorithms unavailable ({err})")
        deterministic = False

    manifest_path = Path(args.data_root) / MANIFEST_NAME
    if not manifest_path.is_file():
        raise SystemExit(
            f"no demo data at {args.data_root} ({MANIFEST_NAME} missing); run "
            f"`python tools/make_demo_data.py --only classification --root {args.data_root}` first"
        )
    manifest = json.loads(manifest_path.read_text())

    t0 = time.perf_counter()
    x_train, y_train = load_split(args.data_root, "train")
    x_val, y_val = load_split(args.data_root, "val")
    print(
        f"data: train {tuple(x_train.shape)}, val {tuple(x_val.shape)}, "
        f"{len(CLASSES)} classes, decoded in {time.perf_counter() - t0:.1f}s"
    )

    model_kwargs = {**MODEL_KWARGS, **args.model_kwargs}
    model = create_timm_model(ARCH, model_kwargs)
    n_params = sum(p.numel() for p in model.parameters())
    # No weight decay on biases, norms, cls token and position embedding (1-D or token params).
    decay = [
        p
        for n, p in model.named_parameters()
        if p.ndim >= 2 and "pos_embed" not in n and "cls_token" not in n
    ]
    no_decay = [
        p
        for n, p in model.named_parameters()
        if not (p.ndim >= 2 and "pos_embed" not in n and "cls_token" not in n)
    ]
    optimizer = torch.optim.AdamW(
        [
            {"params": decay, "weight_decay": args.weight_decay},
            {"params": no_decay, "weight_decay": 0.0},
        ],
        lr=args.lr,
    )
    print(
        f"model: {ARCH} {model_kwargs}, {n_params / 1e6:.3f} M parameters, "
        f"{args.threads} threads, deterministic={deterministic}"
    )

    gen = torch.Generator().manual_seed(args.seed)
    steps_per_epoch = math.ceil(len(x_train) / args.batch_size)
    total_steps = args.epochs * steps_per_epoch
    warmup_steps = int(args.warmup_epochs * steps_per_epoch)
    history = []
    step = 0
    train_start = time.perf_counter()
    for epoch in range(1, args.epochs + 1):
        model.train()
        epoch_start = time.perf_counter()
        order = torch.randperm(len(x_train), generator=gen)
        loss_sum, correct, seen = 0.0, 0, 0
        for i in range(0, len(order), args.batch_size):
            idx = order[i : i + args.batch_size]
            x = augment(x_train[idx], args.pad, not args.no_flip, gen)
            y = y_train[idx]
            lr = lr_at(step, total_steps, warmup_steps, args.lr, args.min_lr)
            for group in optimizer.param_groups:
                group["lr"] = lr
            logits = model(x)
            loss = F.cross_entropy(logits, y, label_smoothing=args.label_smoothing)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            step += 1
            loss_sum += float(loss.detach()) * len(idx)
            correct += int((logits.argmax(1) == y).sum())
            seen += len(idx)
        val_top1 = evaluate(model, x_val, y_val)
        record = {
            "epoch": epoch,
            "train_loss": loss_sum / seen,
            "train_top1": 100.0 * correct / seen,
            "val_top1": val_top1,
            "lr_end": lr,
            "seconds": time.perf_counter() - epoch_start,
        }
        history.append(record)
        print(
            f"epoch {epoch:3d}/{args.epochs}  loss {record['train_loss']:.4f}  "
            f"train top1 {record['train_top1']:6.2f}  val top1 {val_top1:6.2f}  "
            f"lr {lr:.2e}  {record['seconds']:.1f}s",
            flush=True,
        )
    wall = time.perf_counter() - train_start

    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().to(torch.float32).contiguous() for k, v in model.state_dict().items()}
    torch.save(state, out)
    size = out.stat().st_size
    if size > MAX_CHECKPOINT_BYTES:
        raise SystemExit(f"checkpoint {out} is {size} bytes, over the {MAX_CHECKPOINT_BYTES} limit")

    report = {
        "checkpoint": out.name,
        "checkpoint_bytes": size,
        "checkpoint_sha256": file_sha256(out),
        "arch": ARCH,
        "model_kwargs": model_kwargs,
        "num_parameters": n_params,
        "preprocess": PREPROCESS,
        "classes": list(CLASSES),
        "data": {
            "root": args.data_root,
            "seed": manifest.get("seed"),
            "per_class": manifest.get("per_class"),
            "sha256": manifest.get("sha256"),
            "generator_version": manifest.get("generator_version"),
        },
        "settings": {
            **vars(args),
            "optimizer": "AdamW",
            "schedule": "linear warmup + cosine",
            "augmentation": f"random shift <= {args.pad}px (zero pad), "
            f"hflip={not args.no_flip}",
            "deterministic_algorithms": deterministic,
        },
        "epochs": args.epochs,
        "final_train_loss": history[-1]["train_loss"],
        "val_top1": history[-1]["val_top1"],
        "train_wall_seconds": wall,
        "history": history,
        "versions": package_versions(("torch", "timm", "numpy")),
    }
    write_json(out.with_suffix(".json"), report, indent=2)
    print(
        f"saved {out} ({size} bytes) and {out.with_suffix('.json')}: val top1 "
        f"{report['val_top1']:.2f}%, train loss {report['final_train_loss']:.4f}, "
        f"{wall:.0f}s training"
    )


if __name__ == "__main__":
    main()
