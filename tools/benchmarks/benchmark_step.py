"""Step micro-benchmark of the reconstruction on the embedded demo ViT.

For each unit type of a fine-to-coarse run (level 0: an MHSA unit ``attn`` and an MLP unit
``mlp``; level 1: a block; level k >= 2: a group of ``2^(k-1)`` blocks, up to the whole encoder),
measured on the first unit of that type the run reconstructs, side by side:

* **FP fwd+bwd**: the same unit with every quantizer off, forward on one batch of
  ``--batch-size`` cached FP inputs, the reconstruction loss against the FP targets, and the
  backward to the unit's weights (``torch.autograd.grad``); median of ``--repeats`` runs after
  ``--warmup`` runs. This is the quantized modules' own forward with identity quantizers, so
  the attention is the unfused matmul-softmax-matmul of the quantized path, not timm's SDPA.
* **step**: one optimizer step of :func:`pfcr_mm.recon.unit.reconstruct_unit` (batch drawn
  from the caches, QDrop mix, forward, loss and AdaRound regularizer, backward, Adam on the
  rounding variables and step sizes), run with ``UnitRecipe(iters=--iters)``: the time between
  consecutive steps, taken from its progress callback (called after every step), median over
  the ``iters - 1`` intervals. The first step serves as warm-up: its start is not observable
  from outside, and it allocates the optimizer state.
* the ratio step / FP, and the unit's cost in block passes (:func:`pfcr_mm.recon.pos.block_passes`,
  the unit of the reconstruction budget): an MHSA or MLP unit counts 1/2 of a block, a unit
  spanning n blocks counts n.

The model is the committed demo checkpoint (``checkpoints/demo_vit_shapes.pth`` and its
``.json``: architecture and preprocessing), quantized by :func:`pfcr_mm.quantize` with
``method="calib"`` on ``--calib-images`` seeded images of the train split of
``data/demo_shapes``; the caches come from :class:`pfcr_mm.recon.ChainDataSource`. Writes
``<out>/benchmark.json`` (rows and the settings, torch version, threads, CPU, and the load
average at the start: other work on the cores inflates the times) and ``<out>/benchmark.md`` (a
table made from the JSON), replacing earlier ones.

    python tools/benchmarks/benchmark_step.py [--bits 4] [--iters 20] [--repeats 10] [--threads 1]
        [--levels 0 1 2 ...] [--out benchmarks/step]

Relative paths are taken from the repository root. About a minute on one CPU core.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import nn

from pfcr_mm import PTQConfig, QuantConfig, ReconSettings, quantize
from pfcr_mm.benchmark_tables import step_table
from pfcr_mm.demo.shapes import MANIFEST_NAME
from pfcr_mm.engine.checkpoint import load_weights_strict
from pfcr_mm.engine.classification import ImageFolderDataset, create_timm_model
from pfcr_mm.provenance import cpu_model, package_versions, write_benchmark
from pfcr_mm.quant.calibrate import quantizer_states
from pfcr_mm.quant.quantizers import BaseQuantizer
from pfcr_mm.recon import (
    ChainDataSource,
    FineToCoarseSchedule,
    UnitCaches,
    UnitRecipe,
    leaves,
    reconstruct_unit,
)
from pfcr_mm.recon.loss import reconstruction_loss
from pfcr_mm.recon.pos import block_passes
from pfcr_mm.recon.unit import eval_mode

ROOT = Path(__file__).resolve().parents[2]


class InputError(Exception):
    """Bad input: reported in one line, exit code 2."""


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--checkpoint", default="checkpoints/demo_vit_shapes.pth")
    p.add_argument("--data-root", default="data/demo_shapes")
    p.add_argument("--bits", type=int, default=4, help="weight and activation bits (2-8)")
    p.add_argument("--iters", type=int, default=20, help="reconstruction steps per unit (>= 2)")
    p.add_argument("--repeats", type=int, default=10, help="timed FP forward+backward runs")
    p.add_argument("--warmup", type=int, default=3, help="untimed FP runs before them")
    p.add_argument("--threads", type=int, default=1, help="torch.set_num_threads")
    p.add_argument("--batch-size", type=int, default=32, help="samples per step and FP batch")
    p.add_argument("--calib-images", type=int, default=64, help="calibration images (cached)")
    p.add_argument("--seed", type=int, default=0, help="which calibration images")
    p.add_argument(
        "--levels", type=int, nargs="+", help="levels to measure (default: all of the run)"
    )
    p.add_argument("--out", default="benchmarks/step", help="output folder")
    return p.parse_args(argv)


def check_args(args: argparse.Namespace) -> None:
    """Raise :class:`InputError` on settings out of range (the bits are QuantConfig's)."""
    for name, low in (("iters", 2), ("repeats", 1), ("warmup", 0), ("threads", 1)):
        if getattr(args, name) < low:
            raise InputError(f"--{name} must be >= {low}, got {getattr(args, name)}")
    if args.batch_size < 1 or args.calib_images < args.batch_size:
        raise InputError(
            f"need 1 <= --batch-size <= --calib-images, got {args.batch_size} and "
            f"{args.calib_images}"
        )
    out = ROOT / args.out
    if out.exists() and not out.is_dir():
        raise InputError(f"--out {out} exists and is not a folder")


def load_demo(args: argparse.Namespace) -> tuple[nn.Module, dict, list[torch.Tensor]]:
    """The FP demo ViT, its checkpoint report (``.json``) and the calibration batches."""
    checkpoint = ROOT / args.checkpoint
    report_path = checkpoint.with_suffix(".json")
    if not checkpoint.is_file() or not report_path.is_file():
        missing = checkpoint if not checkpoint.is_file() else report_path
        raise InputError(
            f"{missing} not found: restore the committed demo checkpoint (git checkout "
            "checkpoints/) or retrain it with `python tools/train/train_demo_classifier.py`"
        )
    data_root = ROOT / args.data_root
    if not (data_root / MANIFEST_NAME).is_file():
        raise InputError(
            f"no demo data at {data_root} ({MANIFEST_NAME} missing): run "
            f"`python tools/make_demo_data.py --only classification --root {data_root}`"
        )
    report = json.loads(report_path.read_text())
    model = create_timm_model(report["arch"], report["model_kwargs"]).eval()
    load_weights_strict(model, checkpoint)
    dataset = ImageFolderDataset(str(data_root), "train", **report["preprocess"])
    if len(dataset) < args.calib_images:
        raise InputError(f"--calib-images {args.calib_images}: {data_root} has {len(dataset)}")
    order = torch.randperm(len(dataset), generator=torch.Generator().manual_seed(args.seed))
    images = torch.stack([dataset[i]["inputs"] for i in order[: args.calib_images].tolist()])
    return model, report, list(images.split(args.batch_size))


def unit_type(level: int, unit: nn.Module) -> str:
    """``attn`` / ``mlp`` at level 0, ``block``, or ``<n> blocks``."""
    if level == 0:
        return unit.kind
    n = blocks_spanned(unit)
    return "block" if n == 1 else f"{n} blocks"


def blocks_spanned(unit: nn.Module) -> int:
    return len({id(leaf.block) for leaf in leaves(unit)})


def units_to_measure(
    schedule: FineToCoarseSchedule, levels: Sequence[int] | None
) -> list[tuple[int, nn.Module]]:
    """The first unit of each (level, unit type) the run reconstructs, finest first."""
    run = list(schedule)
    available = [k for k, _ in run]
    unknown = sorted(set(levels or ()) - set(available))
    if unknown:
        raise InputError(f"--levels {unknown}: the run of this model has levels {available}")
    picked: dict[tuple[int, str], nn.Module] = {}
    for level, units in run:
        if levels is None or level in levels:
            for unit in units:
                picked.setdefault((level, unit_type(level, unit)), unit)
    return [(level, unit) for (level, _), unit in picked.items()]


def median_ms(times: Sequence[float]) -> float:
    return 1e3 * statistics.median(times)


def time_fp_fwd_bwd(
    model: nn.Module,
    unit: nn.Module,
    x: torch.Tensor,
    target: torch.Tensor,
    extra: tuple,
    warmup: int,
    repeats: int,
) -> float:
    """Median milliseconds of the FP unit's forward, loss and backward to its weights."""
    quantizers = [m for m in unit.modules() if isinstance(m, BaseQuantizer)]
    learned = {id(p) for q in quantizers for p in q.parameters()}  # step sizes, AdaRound V
    weights = [p for p in unit.parameters() if id(p) not in learned]
    for p in weights:
        p.requires_grad_(True)
    times = []
    with quantizer_states(model, weights=False, activations=False), eval_mode(unit):
        with torch.enable_grad():
            for _ in range(warmup + repeats):
                start = time.perf_counter()
                loss = reconstruction_loss(unit(x, *extra), target)
                torch.autograd.grad(loss, weights, allow_unused=True)
                times.append(time.perf_counter() - start)
    return median_ms(times[warmup:])


def measure(
    model: nn.Module,
    source: ChainDataSource,
    level: int,
    unit: nn.Module,
    args: argparse.Namespace,
) -> dict:
    """One row: the unit's FP forward+backward and reconstruction step times."""
    fp_inputs, fp_targets, extra_args = source.fp_io(unit)
    q_inputs = source.quant_input(unit)
    x, target = fp_inputs[0][: args.batch_size], fp_targets[0][: args.batch_size]
    fp_ms = time_fp_fwd_bwd(model, unit, x, target, extra_args[0], args.warmup, args.repeats)
    settings = ReconSettings(iters=args.iters, batch_size=args.batch_size, log_every=1)
    recipe = UnitRecipe(iters=args.iters)
    stamps: list[float] = []

    def on_step(it: int, loss: float) -> None:
        stamps.append(time.perf_counter())

    caches = UnitCaches(q_inputs, fp_inputs, fp_targets, extra_args)
    record = reconstruct_unit(unit, caches, settings, recipe, progress=on_step)
    step_ms = median_ms([b - a for a, b in zip(stamps, stamps[1:])])
    return {
        "unit_type": unit_type(level, unit),
        "level": level,
        "name": unit.name,
        "blocks": blocks_spanned(unit),
        "block_passes": block_passes(unit),
        "batch_shape": list(x.shape),
        "fp_fwd_bwd_ms": fp_ms,
        "step_ms": step_ms,
        "ratio": step_ms / fp_ms,
        "weight_quantizers": record.n_weight_quantizers,
        "step_size_quantizers": record.n_act_quantizers,
    }


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    start = time.perf_counter()
    load = os.getloadavg()[0]  # other work on the cores inflates the times: recorded
    try:
        check_args(args)
        config = PTQConfig(  # calibration alone: the units start as block and pfcr start them
            method="calib",
            quant=QuantConfig(w_bits=args.bits, a_bits=args.bits),
            recon=ReconSettings(compensate="none"),
        )
        model, report, batches = load_demo(args)
        print(f"calibrating {report['arch']} {report['model_kwargs']} at W{args.bits}A{args.bits}")
        plan = quantize(model, config, batches).plan
        picked = units_to_measure(FineToCoarseSchedule(plan.units), args.levels)
    except (InputError, FileNotFoundError, KeyError, ValueError) as err:
        message = err.args[0] if isinstance(err, KeyError) and err.args else err
        print(f"error: {message}", file=sys.stderr)
        return 2
    source = ChainDataSource(model, plan.units, batches)
    rows = []
    for i, (level, unit) in enumerate(picked, 1):
        row = measure(model, source, level, unit, args)
        rows.append(row)
        print(
            f"({i}/{len(picked)}) level {level} {row['unit_type']} {row['name']}: FP fwd+bwd "
            f"{row['fp_fwd_bwd_ms']:.2f} ms, step {row['step_ms']:.2f} ms, "
            f"x{row['ratio']:.2f}",
            flush=True,
        )
    meta = {
        "model": f"{report['arch']} {report['model_kwargs']}",
        "checkpoint": args.checkpoint,
        "bits": args.bits,
        "iters": args.iters,
        "repeats": args.repeats,
        "warmup": args.warmup,
        "batch_size": args.batch_size,
        "calib_images": args.calib_images,
        "seed": args.seed,
        "threads": args.threads,
        **package_versions(("torch", "timm")),
        "cpu": cpu_model(),
        "load_average_at_start": load,
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "seconds": round(time.perf_counter() - start, 1),
    }
    data = {"meta": meta, "rows": rows}
    print(write_benchmark(ROOT / args.out, data, step_table(data)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
