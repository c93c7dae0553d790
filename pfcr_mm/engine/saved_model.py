"""The saved quantized model (``quantized_model.pth``): the state, the integer weight codes, and
the settings that made it, which a later evaluation must match."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch
from mmengine.dist import is_main_process

from ..adapters import QuantPlan, prepare
from ..atomic import atomic_path
from ..quant.modules import QUANT_LAYERS
from ..settings import PTQConfig, dotted
from .checkpoint import load_checkpoint_file
from .runner_io import model_and_head

# v2: the post-softmax quantizer chosen per attention is part of the state
QUANTIZED_FORMAT = "pfcr_mm.quantized_model.v2"
# settings added since files of this format were first written: what the older files hold
SETTINGS_ADDED = {
    "ptq.recon.compensate": "none",
    "ptq.recon.part_loss": "mse",
    "ptq.recon.a_lr_mode": "absolute",
    "ptq.recon.outside_iters": None,
    "ptq.recon.hard_tail": 0.0,
    "ptq.quant.post_gelu": "uniform",
    "ptq.quant.post_softmax_renorm": False,
    "ptq.quant.linear_a_bits": None,
}


def quantization_settings(config: PTQConfig) -> dict:
    """The settings that decide what the quantized model is, as plain JSON values: all of
    ``config`` except what only the run uses (``eval_fp``, ``calib.heldout_images``,
    ``calib.num_workers``, where the reconstruction caches live: ``recon.cache``) and, for
    ``calib``, the unused ``recon`` settings (all but ``compensate``)."""
    settings = config.to_dict()
    del settings["eval_fp"], settings["calib"]["heldout_images"], settings["calib"]["num_workers"]
    del settings["recon"]["cache"]
    if config.method == "calib":  # of the reconstruction settings only the compensation
        settings["recon"] = {"compensate": settings["recon"]["compensate"]}
    return json.loads(json.dumps(settings))


def flat_settings(settings: dict, prefix: str = "ptq") -> dict:
    """``{'ptq.recon.iters': 300, ...}``: the leaves of nested settings by their config key."""
    return dotted(settings, f"{prefix}.")


def differing_keys(was: dict, now: dict, keys, first: str) -> list[str]:
    """The ``keys`` whose values differ between two flat settings dicts: those starting with
    ``first`` first, then by name."""
    differ = (k for k in keys if was.get(k) != now.get(k))
    return sorted(differ, key=lambda k: (not k.startswith(first), k))


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
    model, _ = model_and_head(runner)
    integer = {
        name: m.weight_quantizer.integer_weight(m.corrected_weight().detach()).to(torch.uint8)
        for name, m in model.named_modules()
        if isinstance(m, QUANT_LAYERS)
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


def read_quantized_model(
    config: PTQConfig, path: str | Path, model: torch.nn.Module | None = None
) -> dict:
    """A saved quantized model, read and verified without changing any model: refused when it
    is not one (or of an earlier format), when it holds another model than ``model`` (the FP
    model of the config: its parameters must all be there), or when its settings
    (:func:`quantization_settings`) differ from ``config``'s, naming the first differing key
    (the results would record settings it was not made with). Fast: the engine calls it before
    the FP evaluation."""
    saved = load_checkpoint_file(path)
    if not isinstance(saved, dict):
        raise ValueError(
            f"{path} is not a quantized model written by tools/ptq.py (it holds "
            f"{type(saved).__name__})"
        )
    if saved.get("format") == "pfcr_mm.quantized_model.v1":
        raise ValueError(
            f"{path} was written by an earlier pfcr_mm (format v1, before the post-softmax "
            "quantizer was saved with the model): quantize again with tools/ptq.py"
        )
    if saved.get("format") != QUANTIZED_FORMAT:
        raise ValueError(f"{path} is not a quantized model written by tools/ptq.py")
    if model is not None:
        _check_same_model(path, saved["state_dict"], model)
    wanted = flat_settings(quantization_settings(config))
    # files written before the settings were saved hold method, scope and quant only
    made = flat_settings(
        saved.get("settings")
        or {"method": saved["method"], "scope": saved["scope"], "quant": saved["quant_config"]}
    )
    made = {**_added_settings(wanted), **made}
    keys = made.keys() | wanted.keys() if "settings" in saved else made.keys()
    differ = differing_keys(made, wanted, keys, first="ptq.method")
    if differ:
        key = differ[0]
        options = " ".join(f"{k}={made.get(k)}" for k in differ)
        raise ValueError(
            f"{path} was quantized with {key}={made.get(key)!r}, but the config says "
            f"{wanted.get(key)!r} ({len(differ)} setting(s) differ): pass --cfg-options "
            f"{options} to evaluate it, or quantize again"
        )
    return saved


def _added_settings(wanted: dict) -> dict:
    """What a file written before :data:`SETTINGS_ADDED`'s settings existed held, under the keys
    of ``wanted``: a dict setting that ``wanted`` holds flattened (``ptq.quant.linear_a_bits.qkv``)
    held ``None`` at each of its keys."""
    added = {}
    for key, value in SETTINGS_ADDED.items():
        below = [k for k in wanted if k.startswith(f"{key}.")]
        if below:
            added.update(dict.fromkeys(below))
        elif key in wanted:
            added[key] = value
    return added


def _check_same_model(path, state: dict, model: torch.nn.Module) -> None:
    """Refuse a saved state that lacks parameters of ``model`` (quantizing keeps every name)."""
    names = list(model.state_dict())
    missing = [k for k in names if k not in state]
    if missing:
        raise ValueError(
            f"{path} holds another model: {len(missing)} of the {len(names)} tensors of this "
            f"config's model are not in it (e.g. {missing[0]!r}); pass the quantized model made "
            "with this config"
        )


def load_quantized_model(
    runner, config: PTQConfig, path: str | Path, saved: dict | None = None
) -> tuple[QuantPlan, dict]:
    """Rebuild the quantized structure on ``runner.model`` and load a saved quantized model
    (``saved``: what :func:`read_quantized_model` read from ``path``; ``None``: read it now)."""
    if saved is None:
        saved = read_quantized_model(config, path, model_and_head(runner)[0])
    model, head = model_and_head(runner)
    plan = prepare(model, config.quant, config.scope_modules, head)
    result = model.load_state_dict(saved["state_dict"], strict=False)
    if result.missing_keys or result.unexpected_keys:
        raise KeyError(
            f"{path} does not match the model: missing {result.missing_keys[:8]}, "
            f"unexpected {result.unexpected_keys[:8]}"
        )
    return plan, saved
