"""Post-training quantization of a Runner's model: settings, calibration data, results.

The ``ptq`` section of a config::

    ptq = dict(
        method='pfcr',                       # 'calib' | 'block' | 'pfcr' (see below)
        quant=dict(w_bits=4, a_bits=4, post_softmax='log2', ...),   # see QuantConfig
        scope='backbone+neck',               # sub-modules of runner.model joined by '+', or 'all'
        calib=dict(num_images=256, seed=0, batch_size=32, num_workers=2,
                   dataset=dict(split='train')),  # overrides of the test dataset config
        eval_fp=True,                        # evaluate the FP model first
        recon=dict(iters=2000, batch_size=32, pos='none', max_level='top', ...),
    )

Methods, all on the same calibration images: ``calib`` calibrates the ranges only (a
RepQ-ViT-like baseline); ``block`` then reconstructs every transformer block (one fixed
granularity, QDrop/BRECQ-like); ``pfcr`` reconstructs fine to coarse (MHSA and MLP units, then
blocks, then groups of blocks). ``recon.iters`` is the budget per block: ``block`` gives each
block ``iters`` iterations, ``pfcr`` spreads the same total (``iters`` x number of blocks) over
its levels and units (:func:`pfcr_mm.recon.driver.unit_iterations`; ``recon.pos`` picks the
progressive optimization strategy). ``recon`` takes the fields of
:class:`pfcr_mm.recon.ReconSettings` and ``max_level`` (``'top'`` or an int).
"""

from __future__ import annotations

import copy
import json
import platform
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from mmengine.logging import print_log
from mmengine.model import is_model_wrapper
from mmengine.registry import DATASETS, FUNCTIONS
from torch.utils.data import DataLoader, Subset

from ..adapters import QuantPlan, prepare, quantize
from ..quant.calibrate import write_quant_summary
from ..quant.config import QuantConfig
from ..quant.modules import QuantConv2d, QuantLinear
from ..recon import (
    ChainDataSource,
    FineToCoarseSchedule,
    LayerUnit,
    ReconSettings,
    quantizer_states,
    run_reconstruction,
)
from .checkpoint import load_checkpoint_file

QUANTIZED_FORMAT = "pfcr_mm.quantized_model.v1"

METHODS = ("calib", "block", "pfcr")
# keys of ``ptq.recon`` that shape the run rather than a unit (the others are ReconSettings')
RECON_RUN_KEYS = ("max_level", "non_block")
NON_BLOCK = ("calib", "layerwise")


@dataclass
class PTQSettings:
    """The parsed ``ptq`` config section."""

    quant: QuantConfig
    method: str = "calib"
    scope: str = "all"
    calib: dict = field(default_factory=dict)
    eval_fp: bool = True
    recon: dict = field(default_factory=dict)

    @classmethod
    def from_cfg(cls, ptq: dict) -> PTQSettings:
        ptq = dict(ptq)
        known = {"quant", "method", "scope", "calib", "eval_fp", "recon"}
        unknown = sorted(set(ptq) - known)
        if unknown:
            raise KeyError(
                f"unknown key(s) {unknown} in the ptq config section; known: " f"{sorted(known)}"
            )
        quant = QuantConfig.from_dict(dict(ptq.pop("quant", {})))
        settings = cls(quant=quant, **ptq)
        if not isinstance(settings.scope, str):
            raise ValueError(
                f"ptq.scope must be a string like 'backbone+neck' or 'all', got "
                f"{settings.scope!r}"
            )
        if settings.method not in METHODS:
            raise ValueError(f"ptq.method must be one of {METHODS}, got {settings.method!r}")
        settings.recon_settings()  # fails now on a bad key, not after calibration
        if settings.non_block not in NON_BLOCK:
            raise ValueError(
                f"ptq.recon.non_block must be one of {NON_BLOCK}, got {settings.non_block!r}"
            )
        calib_known = {"num_images", "seed", "batch_size", "num_workers", "dataset"}
        unknown = sorted(set(settings.calib) - calib_known)
        if unknown:
            raise KeyError(f"unknown key(s) {unknown} in ptq.calib; known: {sorted(calib_known)}")
        return settings

    def recon_settings(self) -> ReconSettings:
        return ReconSettings.from_dict(
            {k: v for k, v in self.recon.items() if k not in RECON_RUN_KEYS}
        )

    @property
    def non_block(self) -> str:
        """``recon.non_block``: how layers outside the blocks are treated (``NON_BLOCK``)."""
        return self.recon.get("non_block", "calib")

    def calib_dataset_cfg(self, test_dataset_cfg: dict) -> dict:
        """The calibration dataset config: the test one with ``calib.dataset`` merged in."""
        if not self.calib.get("dataset"):
            raise KeyError(
                "ptq.calib.dataset is required: overrides of the test dataset config that select "
                "the calibration split, e.g. dict(split='train') or COCO train2017's "
                "ann_file/data_prefix"
            )
        return _merge(test_dataset_cfg, self.calib["dataset"])

    @property
    def scope_modules(self) -> list[str] | None:
        """The sub-module names of ``scope`` (``None``: the whole model)."""
        return None if self.scope == "all" else self.scope.split("+")


def calibration_loader(
    settings: PTQSettings, test_dataloader_cfg: dict, work_dir: Path
) -> tuple[DataLoader, list[int]]:
    """A loader over ``num_images`` seeded random images of the calibration dataset.

    ``ptq.calib.dataset`` holds overrides of the test dataset config (merged key by key), so the
    calibration images go through the test pipeline but come from another split: for example
    ``dict(split='train')`` for a folder dataset, or ``dict(ann_file=..., data_prefix=...)`` of
    COCO train2017. It is required: calibrating on the evaluation images would leak them. The
    indices are written to ``work_dir/calib_indices.json``.
    """
    calib = settings.calib
    dataset_cfg = settings.calib_dataset_cfg(test_dataloader_cfg["dataset"])
    dataset = DATASETS.build(dataset_cfg)
    if len(dataset) == 0:
        raise ValueError(f"the calibration dataset is empty: {dataset_cfg}")
    num = int(calib.get("num_images", 256))
    if num <= 0:
        raise ValueError(f"ptq.calib.num_images must be positive, got {num}")
    num = min(num, len(dataset))
    gen = torch.Generator().manual_seed(int(calib.get("seed", 0)))
    indices = sorted(torch.randperm(len(dataset), generator=gen)[:num].tolist())
    (work_dir / "calib_indices.json").write_text(
        json.dumps({"seed": int(calib.get("seed", 0)), "dataset": dataset_cfg, "indices": indices})
    )
    collate_cfg = test_dataloader_cfg.get("collate_fn", {"type": "pseudo_collate"})
    collate = FUNCTIONS.get(collate_cfg["type"])
    if collate is None:
        raise KeyError(f"unknown collate_fn {collate_cfg['type']!r} in test_dataloader")
    loader = DataLoader(
        Subset(dataset, indices),
        batch_size=int(calib.get("batch_size", 32)),
        shuffle=False,
        num_workers=int(calib.get("num_workers", 0)),
        collate_fn=collate,
    )
    return loader, indices


def reconstruct(
    model: torch.nn.Module,
    plan: QuantPlan,
    loader: DataLoader,
    settings: PTQSettings,
    log_dir: Path,
) -> dict:
    """Reconstruct the calibrated model on the calibration images (``block`` or ``pfcr``);
    returns what was done, for the results: levels, layer-wise and calibration-only layers."""
    recon = settings.recon_settings()
    if settings.method == "block":
        schedule, budget = FineToCoarseSchedule.block(plan.units), None
    else:
        schedule = FineToCoarseSchedule(
            plan.units, max_level=settings.recon.get("max_level", "top")
        )
        budget = recon.iters * len(schedule.blocks)
    batches = [model.data_preprocessor(b, False)["inputs"] for b in loader]
    # A detector's layers are reached through its features (heads need data samples).
    feats = getattr(model, "extract_feat", None)
    run_batch = (lambda m, x: feats(x)) if feats else (lambda m, x: m(x, mode="tensor"))
    before, after, calib_only = [], [], [name for name, _, _ in plan.layers]
    if settings.non_block == "layerwise":
        reached = _layers_reached(model, plan, run_batch, batches[0])
        for name, layer, is_before in plan.layers:
            if id(layer) in reached:
                (before if is_before else after).append(LayerUnit(name, layer))
        calib_only = [name for name, layer, _ in plan.layers if id(layer) not in reached]
    source = ChainDataSource(
        model, plan.units, batches, run_batch=run_batch, cache_dtype=recon.cache_dtype
    )
    records = run_reconstruction(
        schedule,
        source,
        recon,
        log_dir=log_dir,
        print_fn=lambda s: print_log(s, logger="current"),
        budget=budget,
        layers_before=before,
        layers_after=after,
    )
    return {
        "settings": recon.to_dict(),
        "max_level": settings.recon.get("max_level", "top"),
        "levels_run": sorted({r.level for r in records if r.level >= 0}),
        "units": len(records),
        "iterations": sum(r.iters for r in records),
        "seconds": sum(r.seconds for r in records),
        "non_block": settings.non_block,
        "layerwise_layers": [u.name for u in before + after],
        "calib_only_layers": calib_only,
        "log": str(log_dir / "recon_log.json"),
    }


def _layers_reached(model, plan: QuantPlan, run_batch, batch) -> set[int]:
    """Which of the plan's non-block layers one calibration forward calls."""
    called: set[int] = set()
    hooks = [
        layer.register_forward_pre_hook(lambda m, a: called.add(id(m)))
        for _, layer, _ in plan.layers
    ]
    try:
        with torch.no_grad():
            run_batch(model, batch)
    finally:
        for h in hooks:
            h.remove()
    return called


def _merge(base: dict, override: dict) -> dict:
    out = copy.deepcopy(dict(base))
    for key, value in override.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def make_forward_loop(loader: DataLoader):
    """A forward loop over ``loader`` through the model's data preprocessor, with progress."""

    def forward_loop(model: torch.nn.Module) -> None:
        seen, total = 0, len(loader.dataset)
        for batch in loader:
            data = model.data_preprocessor(batch, False)
            model(**data, mode="tensor")
            seen += len(data["inputs"])
            print_log(f"calibration: {seen}/{total} images", logger="current")

    return forward_loop


def output_error(model: torch.nn.Module, loader, max_images: int = 32) -> dict:
    """How far the quantized model's outputs are from the FP model's, on the first
    ``max_images`` images of ``loader`` (the evaluation images: held out from calibration and
    reconstruction). Outputs: a detector's features (``extract_feat``: backbone and neck), a
    classifier's logits. Returns ``sum ||q - fp||^2 / sum ||fp||^2`` over all of them."""
    feats = getattr(model, "extract_feat", None)
    forward = feats if feats else (lambda x: model(x, mode="tensor"))
    err = ref = 0.0
    seen = 0
    with torch.no_grad():
        for batch in loader:
            x = model.data_preprocessor(batch, False)["inputs"]
            with quantizer_states(model, weights=False, activations=False):
                fp = forward(x)
            q = forward(x)
            fp, q = (fp, q) if isinstance(fp, (tuple, list)) else ((fp,), (q,))
            err += sum(float((a - b).pow(2).sum()) for a, b in zip(q, fp))
            ref += sum(float(b.pow(2).sum()) for b in fp)
            seen += len(x)
            if seen >= max_images:
                break
    where = "backbone and neck features" if feats else "logits"
    return {"outputs": where, "images": seen, "relative_mse": err / max(ref, 1e-30)}


def unwrap_model(model: torch.nn.Module) -> torch.nn.Module:
    """The model inside an MMEngine wrapper (DDP and the like), or the model itself."""
    return model.module if is_model_wrapper(model) else model


def _model_and_head(runner, settings: PTQSettings):
    model = unwrap_model(runner.model)
    # a classifier names its head, so QuantConfig.head_bits can apply to it
    head = model.classifier_head() if hasattr(model, "classifier_head") else None
    if settings.quant.head_bits is not None and head is None:
        raise ValueError("ptq.quant.head_bits is set but the model has no classification head")
    return model, head


def quantize_runner_model(runner, settings: PTQSettings) -> tuple[QuantPlan, list[int], dict]:
    """Quantize ``runner.model`` in place (calibration, then reconstruction unless the method is
    ``calib``) and write the summary; returns the plan, the calibration indices and what the
    reconstruction did (empty for ``calib``)."""
    model, head = _model_and_head(runner, settings)
    work_dir = Path(runner.work_dir)
    loader, indices = calibration_loader(settings, runner.cfg.test_dataloader, work_dir)
    plan = quantize(model, settings.quant, make_forward_loop(loader), settings.scope_modules, head)
    done = {}
    if settings.method != "calib":
        done = reconstruct(model, plan, loader, settings, work_dir / "recon")
    fp_parts = list(plan.fp_parts)
    if runner.cfg.get("task") == "detection":  # functional ops, invisible as modules
        fp_parts += ["NMS", "box and mask post-processing"]
    write_quant_summary(model, work_dir / "quant_summary.json", fp_parts)
    print_log(
        f"quantized {len(plan.quantized_modules)} modules, {len(plan.units)} units; "
        f"summary in {work_dir / 'quant_summary.txt'}",
        logger="current",
    )
    return plan, indices, done


def save_quantized_model(
    runner, settings: PTQSettings, indices: list[int], recon: dict, path: Path
) -> Path:
    """Write the quantized model: the full state (re-parameterized weights, every quantizer's
    range and flags), the integer weight codes of every quantized layer, the settings, the
    calibration indices and the resolved config. :func:`load_quantized_model` restores it."""
    model, _ = _model_and_head(runner, settings)
    integer = {
        name: m.weight_quantizer.integer_weight(m.weight.detach()).to(torch.uint8)
        for name, m in model.named_modules()
        if isinstance(m, (QuantLinear, QuantConv2d))
    }
    torch.save(
        {
            "format": QUANTIZED_FORMAT,
            "method": settings.method,
            "quant_config": settings.quant.to_dict(),
            "scope": settings.scope,
            "calib_indices": indices,
            "recon": recon,
            "state_dict": model.state_dict(),
            "integer_weights": integer,
            "config": runner.cfg.pretty_text,
        },
        path,
    )
    return path


def load_quantized_model(runner, settings: PTQSettings, path: str | Path) -> tuple[QuantPlan, dict]:
    """Rebuild the quantized structure on ``runner.model`` and load a saved quantized model."""
    saved = load_checkpoint_file(path)
    if saved.get("format") != QUANTIZED_FORMAT:
        raise ValueError(f"{path} is not a quantized model written by tools/ptq.py")
    if saved["quant_config"] != settings.quant.to_dict() or saved["scope"] != settings.scope:
        raise ValueError(
            f"{path} was quantized with quant={saved['quant_config']} scope={saved['scope']}, "
            f"but the config asks for quant={settings.quant.to_dict()} scope={settings.scope}"
        )
    model, head = _model_and_head(runner, settings)
    plan = prepare(model, settings.quant, settings.scope_modules, head)
    result = model.load_state_dict(saved["state_dict"], strict=False)
    if result.missing_keys or result.unexpected_keys:
        raise KeyError(
            f"{path} does not match the model: missing {result.missing_keys[:8]}, "
            f"unexpected {result.unexpected_keys[:8]}"
        )
    return plan, saved


def package_versions() -> dict:
    import importlib.metadata as md

    out = {"python": platform.python_version()}
    for pkg in ("torch", "torchvision", "timm", "mmengine", "mmcv", "mmdet", "pfcr_mm"):
        try:
            out[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            out[pkg] = None
    return out


def write_results(path: Path, results: dict) -> Path:
    """Write ``results`` as JSON; an existing file is kept under a timestamped name."""
    if path.exists():
        stamp = time.strftime("%Y%m%d_%H%M%S", time.localtime(path.stat().st_mtime))
        kept = path.with_name(f"{path.stem}.{stamp}{path.suffix}")
        path.rename(kept)
        print_log(f"kept the previous results as {kept}", logger="current")
    path.write_text(json.dumps(results, indent=1))
    return path
