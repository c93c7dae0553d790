"""The MMEngine side of a PTQ run: a Runner's model and data turned into ``calib_data`` and
``run_batch`` for :func:`pfcr_mm.quantize`, the saved quantized model and the results.

The ``ptq`` section of a config is a :class:`pfcr_mm.PTQConfig`::

    ptq = dict(
        method='pfcr',                       # 'calib' | 'block' | 'pfcr'
        quant=dict(w_bits=4, a_bits=4, post_softmax='log2', ...),   # QuantConfig
        scope='backbone+neck',               # sub-modules of runner.model joined by '+', or 'all'
        calib=dict(num_images=256, seed=0, batch_size=32, num_workers=2,
                   dataset=dict(split='train')),  # overrides of the test dataset config
        eval_fp=True,                        # evaluate the FP model first
        recon=dict(iters=2000, batch_size=32, pos='anneal', max_level='top', ...),  # ReconSettings
    )

:class:`pfcr_mm.engine.loop.PTQLoop` (``tools/ptq.py``) and :class:`pfcr_mm.engine.hooks.PFCRHook`
(stock test scripts) both go through :func:`quantize_and_save` and :func:`record_results`.
"""

from __future__ import annotations

import copy
import hashlib
import json
import platform
from collections.abc import Callable
from pathlib import Path

import torch
from mmengine.dist import get_dist_info, is_main_process
from mmengine.logging import print_log
from mmengine.model import is_model_wrapper
from mmengine.registry import DATASETS, FUNCTIONS
from torch.utils.data import DataLoader, Subset

from ..adapters import QuantPlan, prepare
from ..atomic import atomic_path
from ..core import PTQConfig, QuantResult, ResumeState, quantize
from ..quant.calibrate import quantizer_states, write_quant_summary
from ..quant.modules import QuantConv2d, QuantLinear
from ..recon import peak_memory_mb
from .checkpoint import load_checkpoint_file

# v2: the post-softmax quantizer chosen per attention is part of the state
QUANTIZED_FORMAT = "pfcr_mm.quantized_model.v2"
# in the work dir: the name of the folder of the last run that wrote its results
LAST_RUN = "last_run"
QUANTIZED_NAME = "quantized_model.pth"
RESULTS_NAME = "ptq_results.json"


def run_dir(runner) -> Path:
    """The folder of this run's files: MMEngine's ``<work_dir>/<YYYYmmdd_HHMMSS>`` (the
    Runner's ``log_dir``, which also holds its log), so a run never touches an earlier one's;
    for ``tools/ptq.py --resume``, the folder of the run it continues (``test_cfg.resume``)."""
    return Path(runner.cfg.get("test_cfg", {}).get("resume") or runner.log_dir)


def last_run_dir(work_dir: str | Path) -> Path:
    """The folder of the last run in ``work_dir`` that wrote its results (named by the
    ``last_run`` file)."""
    pointer = Path(work_dir) / LAST_RUN
    if not pointer.is_file():
        raise FileNotFoundError(f"no finished run in {work_dir} (no {LAST_RUN} file)")
    return Path(work_dir) / pointer.read_text().strip()


def differing_keys(was: dict, now: dict, keys, first: str) -> list[str]:
    """The ``keys`` whose values differ between two flat settings dicts: those starting with
    ``first`` first, then by name."""
    differ = (k for k in keys if was.get(k) != now.get(k))
    return sorted(differ, key=lambda k: (not k.startswith(first), k))


def saved_model_path(path: str | Path) -> Path:
    """``path`` itself, or for a work dir the quantized model of its last run."""
    path = Path(path)
    return last_run_dir(path) / QUANTIZED_NAME if path.is_dir() else path


def calib_dataset_cfg(config: PTQConfig, test_dataset_cfg: dict) -> dict:
    """The calibration dataset config: the test one with ``calib.dataset`` merged in."""
    if not config.calib.dataset:
        raise KeyError(
            "ptq.calib.dataset is required: overrides of the test dataset config that select "
            "the calibration split, e.g. dict(split='train') or COCO train2017's "
            "ann_file/data_prefix"
        )
    return _merge(test_dataset_cfg, config.calib.dataset)


# The calibration dataset of the run, by its config: a run needs it three times (the early
# check, the calibration images, the held-out ones), and building COCO train2017 reads its
# annotations each time (tens of seconds).
_last_built: dict = {}


def _build_calibration_dataset(dataset_cfg: dict):
    key = json.dumps(dataset_cfg, sort_keys=True, default=str)
    if _last_built.get("key") != key:
        _last_built.clear()
        _last_built.update(key=key, dataset=DATASETS.build(dataset_cfg))
    return _last_built["dataset"]


def _calibration_order(config: PTQConfig, test_dataloader_cfg: dict):
    """The calibration dataset, its config, and its indices in the seeded random order from
    which the calibration images (the first ``num_images``) and the held-out ones (the next
    ``heldout_images``) are taken."""
    dataset_cfg = calib_dataset_cfg(config, test_dataloader_cfg["dataset"])
    if dataset_cfg == _merge(test_dataloader_cfg["dataset"], {}):
        raise ValueError(
            f"ptq.calib.dataset={config.calib.dataset} selects the evaluation images "
            "themselves: point it at another split (e.g. dict(split='train'))"
        )
    dataset = _build_calibration_dataset(dataset_cfg)
    if len(dataset) == 0:
        raise ValueError(f"the calibration dataset is empty: {dataset_cfg}")
    if len(dataset) < config.calib.num_images:
        raise ValueError(
            f"ptq.calib.num_images={config.calib.num_images}, but the calibration split has "
            f"{len(dataset)} images: lower num_images or use a larger split"
        )
    gen = torch.Generator().manual_seed(config.calib.seed)
    return dataset, dataset_cfg, torch.randperm(len(dataset), generator=gen).tolist()


def _loader(dataset, indices: list[int], batch_size: int, num_workers: int, cfg: dict):
    collate_cfg = cfg.get("collate_fn", {"type": "pseudo_collate"})
    collate = FUNCTIONS.get(collate_cfg["type"])
    if collate is None:
        raise KeyError(f"unknown collate_fn {collate_cfg['type']!r} in test_dataloader")
    return DataLoader(
        Subset(dataset, indices),
        batch_size=batch_size,
        shuffle=False,
        num_workers=num_workers,
        collate_fn=collate,
    )


def calibration_indices(config: PTQConfig, test_dataloader_cfg: dict) -> list[int]:
    """The indices of the calibration images in the calibration dataset, sorted."""
    _, _, order = _calibration_order(config, test_dataloader_cfg)
    return sorted(order[: config.calib.num_images])


def calibration_loader(
    config: PTQConfig, test_dataloader_cfg: dict, out_dir: Path
) -> tuple[DataLoader, list[int]]:
    """A loader over ``num_images`` seeded random images of the calibration dataset.

    ``ptq.calib.dataset`` holds overrides of the test dataset config (merged key by key), so the
    calibration images go through the test pipeline but come from another split: for example
    ``dict(split='train')`` for a folder dataset, or ``dict(ann_file=..., data_prefix=...)`` of
    COCO train2017. It is required: calibrating on the evaluation images would leak them. The
    indices are written to ``out_dir/calib_indices.json``.

    In a distributed run the loader of process ``rank`` of W holds batches ``rank, rank + W,
    ...`` of the whole calibration list (the share :func:`pfcr_mm.quantize` expects); the
    returned indices are always those of the whole list.
    """
    calib = config.calib
    dataset, dataset_cfg, _ = _calibration_order(config, test_dataloader_cfg)
    indices = calibration_indices(config, test_dataloader_cfg)
    if is_main_process():
        with atomic_path(out_dir / "calib_indices.json") as tmp:
            tmp.write_text(
                json.dumps({"seed": calib.seed, "dataset": dataset_cfg, "indices": indices})
            )
    rank, world = get_dist_info()
    size = calib.batch_size
    batches = [indices[i : i + size] for i in range(0, len(indices), size)]
    share = [i for batch in batches[rank::world] for i in batch]
    return _loader(dataset, share, size, calib.num_workers, test_dataloader_cfg), indices


def check_calibration_split(config: PTQConfig, test_dataloader_cfg: dict, eval_dataset) -> None:
    """Refuse, before any long work, a calibration split that is the evaluation split, is
    empty, has fewer than ``num_images`` images, or whose class list (``metainfo['classes']``:
    a folder dataset's class folders) differs from that of ``eval_dataset``, or with a
    calibration or held-out image that does not load (builds the calibration dataset once, and
    reads those images through its pipeline: seconds for a few hundred COCO images)."""
    dataset, _, order = _calibration_order(config, test_dataloader_cfg)
    calib_cfg = config.calib
    for index in order[: calib_cfg.num_images + calib_cfg.heldout_images]:
        _check_loads(dataset, index)
    calib = list(getattr(dataset, "metainfo", {}).get("classes") or [])
    evaluation = list(getattr(eval_dataset, "metainfo", {}).get("classes") or [])
    if calib != evaluation:
        only_calib = [c for c in calib if c not in evaluation]
        only_eval = [c for c in evaluation if c not in calib]
        how = (
            f"only in calibration: {only_calib[:5]}, only in evaluation: {only_eval[:5]}"
            if only_calib or only_eval
            else "the same classes in another order"
        )
        raise ValueError(
            f"the calibration and evaluation splits have different class lists ({how}): the "
            "labels would not match; give both splits the same classes (class folders)"
        )


def _check_loads(dataset, index: int) -> None:
    """Load one item of ``dataset``; a failure becomes one line naming its file."""
    try:
        dataset[index]
    except Exception as err:
        info = dataset.get_data_info(index) if hasattr(dataset, "get_data_info") else {}
        if "img_path" not in info:
            raise
        cause = f"{type(err).__name__}: {err}".strip().splitlines()[-1]
        raise ValueError(
            f"cannot read calibration image {info['img_path']} ({cause}): replace or remove it"
        ) from None


def heldout_loader(config: PTQConfig, test_dataloader_cfg: dict) -> DataLoader | None:
    """A loader over ``calib.heldout_images`` images of the calibration split that calibration
    did not see (they follow the calibration images in the seeded order): where settings are
    chosen without touching the evaluation images. ``None`` when there are none."""
    if config.calib.heldout_images == 0:
        return None
    calib = config.calib
    dataset, _, order = _calibration_order(config, test_dataloader_cfg)
    held = sorted(order[calib.num_images : calib.num_images + calib.heldout_images])
    if not held:
        return None
    return _loader(dataset, held, calib.batch_size, calib.num_workers, test_dataloader_cfg)


def _merge(base: dict, override: dict) -> dict:
    out = copy.deepcopy(dict(base))
    for key, value in override.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


class PreprocessedBatches:
    """The batches of ``loader`` through the model's data preprocessor (test mode), re-iterable
    in the loader's fixed order: the ``calib_data`` of :func:`pfcr_mm.quantize`."""

    def __init__(self, loader: DataLoader, model: torch.nn.Module):
        self.loader, self.model = loader, model

    def __len__(self) -> int:
        return len(self.loader)

    def __iter__(self):
        for batch in self.loader:
            yield self.model.data_preprocessor(batch, False)


def run_batch(model: torch.nn.Module, data: dict):
    """The whole forward of an MMEngine model on a preprocessed batch (calibration)."""
    return model(**data, mode="tensor")


def features(model: torch.nn.Module, data: dict):
    """The outputs :func:`output_error` compares and the detection-aware objective weights a
    block's error by (``recon.downstream_weight``): a detector's features (backbone and neck;
    its heads' outputs depend on proposals, which differ between the FP and the quantized
    model), a classifier's logits."""
    feats = getattr(model, "extract_feat", None)
    return feats(data["inputs"]) if feats else model(data["inputs"], mode="tensor")


def output_error(model: torch.nn.Module, loader: DataLoader, max_images: int = 32) -> dict:
    """How far the quantized model's outputs are from the FP model's, on the first
    ``max_images`` images (in whole batches) of ``loader``'s dataset in order (evaluation
    images, or the held-out calibration images of :func:`heldout_loader`; every process of a
    distributed run computes the same). Outputs: a detector's features (``extract_feat``:
    backbone and neck), a classifier's logits. Returns ``sum ||q - fp||^2 / sum ||fp||^2`` over
    all of them."""
    in_order = DataLoader(
        loader.dataset, batch_size=loader.batch_size, shuffle=False, collate_fn=loader.collate_fn
    )
    err = ref = 0.0
    seen = 0
    with torch.no_grad():
        for data in PreprocessedBatches(in_order, model):
            with quantizer_states(model, weights=False, activations=False):
                fp = features(model, data)
            q = features(model, data)
            fp, q = (fp, q) if isinstance(fp, (tuple, list)) else ((fp,), (q,))
            err += sum(float((a - b).pow(2).sum()) for a, b in zip(q, fp))
            ref += sum(float(b.pow(2).sum()) for b in fp)
            seen += len(data["inputs"])
            if seen >= max_images:
                break
    where = "backbone and neck features" if hasattr(model, "extract_feat") else "logits"
    return {"outputs": where, "images": seen, "relative_mse": err / max(ref, 1e-30)}


def unwrap_model(model: torch.nn.Module) -> torch.nn.Module:
    """The model inside an MMEngine wrapper (DDP and the like), or the model itself."""
    return model.module if is_model_wrapper(model) else model


def _model_and_head(runner):
    model = unwrap_model(runner.model)
    # a classifier names its head, so QuantConfig.head_bits can apply to it
    head = model.classifier_head() if hasattr(model, "classifier_head") else None
    return model, head


def quantize_runner_model(
    runner,
    config: PTQConfig,
    resume: ResumeState | None = None,
    on_unit_done: Callable[[ResumeState], None] | None = None,
) -> tuple[QuantResult, list[int]]:
    """Quantize ``runner.model`` in place with :func:`pfcr_mm.quantize` on the calibration
    images and write the summary; returns the result and the calibration indices.
    ``resume`` / ``on_unit_done``: those of :func:`pfcr_mm.quantize`."""
    model, head = _model_and_head(runner)
    out_dir = run_dir(runner)
    loader, indices = calibration_loader(config, runner.cfg.test_dataloader, out_dir)
    result = quantize(
        model,
        config,
        PreprocessedBatches(loader, model),
        run_batch,
        downstream=features,
        head=head,
        log_dir=out_dir / "recon",
        print_fn=lambda s: print_log(s, logger="current"),
        resume=resume,
        on_unit_done=on_unit_done,
    )
    if result.plan.folded:
        print_log(
            f"folded the BatchNorm of {len(result.plan.folded)} modules into their convolutions "
            f"before quantization: {', '.join(result.plan.folded)}",
            logger="current",
        )
    fp_parts = list(result.plan.fp_parts)
    if runner.cfg.get("task") == "detection":  # functional ops, invisible as modules
        fp_parts += ["NMS", "box and mask post-processing"]
    if is_main_process():
        write_quant_summary(model, out_dir / "quant_summary.json", fp_parts)
    print_log(
        f"quantized {len(result.plan.quantized_modules)} modules, {len(result.plan.units)} "
        f"units; summary in {out_dir / 'quant_summary.txt'}",
        logger="current",
    )
    return result, indices


def quantization_settings(config: PTQConfig) -> dict:
    """The settings that decide what the quantized model is, as plain JSON values: all of
    ``config`` except what only the run uses (``eval_fp``, ``calib.heldout_images``,
    ``calib.num_workers``, where the reconstruction caches live: ``recon.cache_limit_gb`` and
    ``recon.cache_dir``) and, for ``calib``, the unused ``recon``."""
    settings = config.to_dict()
    del settings["eval_fp"], settings["calib"]["heldout_images"], settings["calib"]["num_workers"]
    del settings["recon"]["cache_limit_gb"], settings["recon"]["cache_dir"]
    if config.method == "calib":
        del settings["recon"]
    return json.loads(json.dumps(settings))


def flat_settings(settings: dict, prefix: str = "ptq") -> dict:
    """``{'ptq.recon.iters': 300, ...}``: the leaves of nested settings by their config key."""
    out = {}
    for key, value in settings.items():
        if isinstance(value, dict) and value:
            out.update(flat_settings(value, f"{prefix}.{key}"))
        else:
            out[f"{prefix}.{key}"] = value
    return out


def save_quantized_model(
    runner, config: PTQConfig, indices: list[int], recon: dict, path: Path
) -> Path:
    """Write the quantized model: the full state (re-parameterized weights, every quantizer's
    range and flags), the integer weight codes of every quantized layer, the method and the
    settings that made it (:func:`quantization_settings`), the calibration indices, the
    resolved config and its SHA-256. :func:`load_quantized_model` restores it. Only the main
    process writes."""
    if not is_main_process():
        return path
    model, _ = _model_and_head(runner)
    integer = {
        name: m.weight_quantizer.integer_weight(m.weight.detach()).to(torch.uint8)
        for name, m in model.named_modules()
        if isinstance(m, (QuantLinear, QuantConv2d))
    }
    payload = {
        "format": QUANTIZED_FORMAT,
        "method": config.method,
        "quant_config": config.quant.to_dict(),
        "scope": config.scope,
        "settings": quantization_settings(config),
        "calib_indices": indices,
        "recon": recon,
        "state_dict": model.state_dict(),
        "integer_weights": integer,
        "config": runner.cfg.pretty_text,
        "config_sha256": hashlib.sha256(runner.cfg.pretty_text.encode()).hexdigest(),
    }
    with atomic_path(path) as tmp:
        torch.save(payload, tmp)
    return path


def load_quantized_model(runner, config: PTQConfig, path: str | Path) -> tuple[QuantPlan, dict]:
    """Rebuild the quantized structure on ``runner.model`` and load a saved quantized model.
    Refuses one whose settings (:func:`quantization_settings`) differ from ``config``'s,
    naming the first differing key: the results would record settings it was not made with."""
    saved = load_checkpoint_file(path)
    if saved.get("format") == "pfcr_mm.quantized_model.v1":
        raise ValueError(
            f"{path} was written by an earlier pfcr_mm (format v1, before the post-softmax "
            "quantizer was saved with the model): quantize again with tools/ptq.py"
        )
    if saved.get("format") != QUANTIZED_FORMAT:
        raise ValueError(f"{path} is not a quantized model written by tools/ptq.py")
    wanted = flat_settings(quantization_settings(config))
    # files written before the settings were saved hold method, scope and quant only
    made = flat_settings(
        saved.get("settings")
        or {"method": saved["method"], "scope": saved["scope"], "quant": saved["quant_config"]}
    )
    keys = made.keys() | wanted.keys() if "settings" in saved else made.keys()
    differ = differing_keys(made, wanted, keys, first="ptq.method")
    if differ:
        key = differ[0]
        raise ValueError(
            f"{path} was quantized with {key}={made.get(key)!r}, but the config says "
            f"{wanted.get(key)!r} ({len(differ)} setting(s) differ): pass --cfg-options "
            f"{key}={made.get(key)} to evaluate it, or quantize again"
        )
    model, head = _model_and_head(runner)
    plan = prepare(model, config.quant, config.scope_modules, head)
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


def quantize_and_save(
    runner,
    config: PTQConfig,
    resume: ResumeState | None = None,
    on_unit_done: Callable[[ResumeState], None] | None = None,
) -> tuple[list[int], dict, Path]:
    """Quantize ``runner.model`` (:func:`quantize_runner_model`) and save it to
    ``quantized_model.pth``; returns the calibration indices, the reconstruction summary and
    the path."""
    result, indices = quantize_runner_model(runner, config, resume, on_unit_done)
    path = run_dir(runner) / QUANTIZED_NAME
    save_quantized_model(runner, config, indices, result.recon, path)
    return indices, result.recon, path


def record_results(
    runner,
    config: PTQConfig,
    loader: DataLoader,
    fp: dict | None,
    quant: dict,
    indices: list[int],
    recon: dict,
    times: dict,
    quantized_model: str,
    eval_images: int | None = None,
) -> tuple[dict, Path]:
    """Measure the output error on ``loader``'s first images and on the held-out calibration
    images (:func:`heldout_loader`), write ``ptq_results.json`` and the resolved config
    ``ptq_config.py`` into the run's folder (:func:`run_dir`), then point ``last_run`` in the
    work dir at it; returns the results and the path. ``eval_images``: the N of
    ``--eval-images`` (``None``: every evaluation image)."""
    cfg = runner.cfg
    heldout = heldout_loader(config, cfg.test_dataloader)
    results = {
        "task": cfg.get("task", "classification"),
        "method": config.method,
        "w_bits": config.quant.w_bits,
        "a_bits": config.quant.a_bits,
        "scope": config.scope,
        "quant_config": config.quant.to_dict(),
        "recon": recon,
        "fp": fp,
        "quant": quant,
        "eval_images": eval_images,
        "output_error": output_error(unwrap_model(runner.model), loader),
        # where defaults are chosen: calibration-split images that calibration did not see
        "heldout_error": None
        if heldout is None
        else {
            **output_error(unwrap_model(runner.model), heldout, len(heldout.dataset)),
            "indices": list(heldout.dataset.indices),
        },
        "calib_indices": indices,
        "time_s": times,
        "peak_mem_mb": peak_memory_mb(),
        "versions": package_versions(),
        "config": cfg.filename,
        "quantized_model": quantized_model,
    }
    out_dir = run_dir(runner)
    path = out_dir / RESULTS_NAME
    if is_main_process():
        with atomic_path(path) as tmp:
            tmp.write_text(json.dumps(results, indent=1))
        with atomic_path(out_dir / "ptq_config.py") as tmp:
            cfg.dump(str(tmp))
        # the pointer moves only once the run's files are complete
        with atomic_path(Path(runner.work_dir) / LAST_RUN) as tmp:
            tmp.write_text(out_dir.name + "\n")
    return results, path
