"""Loading user checkpoints safely on torch >= 2.6 (``weights_only=True`` by default).

Checkpoints written by mmengine/mmdet/timm training hold a few numpy objects in their meta data
(scalars, arrays, dtypes), and mmengine 0.10.7 calls plain ``torch.load``, which then fails.
Instead of turning ``weights_only`` off, which lets a malicious file run code, those numpy types
are allow-listed; anything else still fails to load. Importing this module makes mmengine's
loader of local files (``load_from``, ``load_checkpoint``) use :func:`load_checkpoint_file`.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from mmengine.runner.checkpoint import CheckpointLoader


def numpy_safe_globals() -> list:
    """The numpy reconstruction helpers and types that training checkpoints contain, under both
    module spellings (numpy 1.x writes ``numpy.core``, numpy 2 ``numpy._core``)."""
    try:
        from numpy._core import multiarray
    except ImportError:  # numpy 1.x
        from numpy.core import multiarray
    out: list = [np.dtype, np.ndarray]
    for fn in (multiarray._reconstruct, multiarray.scalar):
        out += [
            (fn, f"numpy.core.multiarray.{fn.__name__}"),
            (fn, f"numpy._core.multiarray.{fn.__name__}"),
        ]
    out += [
        type(np.dtype(t))
        for t in (
            "float16",
            "float32",
            "float64",
            "int8",
            "int16",
            "int32",
            "int64",
            "uint8",
            "bool",
        )
    ]
    return out


def load_checkpoint_file(path: str | Path, map_location: str = "cpu") -> dict:
    """``torch.load`` with ``weights_only=True`` plus the numpy allow-list (``.safetensors``
    files through safetensors).

    Raises FileNotFoundError with the path when the file is missing.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path), device=map_location)
    with torch.serialization.safe_globals(numpy_safe_globals()):
        return torch.load(path, map_location=map_location, weights_only=True)


@CheckpointLoader.register_scheme(prefixes="", force=True)
def _mmengine_load_from_local(filename: str, map_location=None) -> dict:
    return load_checkpoint_file(Path(filename).expanduser(), map_location or "cpu")


def state_dict_of(checkpoint: dict) -> dict:
    """The weights of a checkpoint saved as a bare state dict or under 'state_dict'/'model'."""
    for key in ("state_dict", "model", "state_dict_ema"):
        if key in checkpoint and isinstance(checkpoint[key], dict):
            return checkpoint[key]
    return checkpoint


def load_weights_strict(model: torch.nn.Module, path: str | Path, prefix: str = "") -> None:
    """Load a checkpoint into ``model``, failing with the differing keys if the sets differ, and
    naming the parameters that hold NaN or Inf."""
    state = state_dict_of(load_checkpoint_file(path))
    if prefix:
        state = {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}
    expected = set(model.state_dict())
    missing, unexpected = sorted(expected - set(state)), sorted(set(state) - expected)
    if missing or unexpected:
        raise KeyError(
            f"checkpoint {path} does not match the model: {len(missing)} missing key(s) "
            f"{missing[:8]}, {len(unexpected)} unexpected key(s) {unexpected[:8]}. Check that the "
            "architecture and its kwargs are the ones the checkpoint was trained with."
        )
    non_finite = [
        name for name, _ in model.named_parameters() if not torch.isfinite(state[name]).all()
    ]
    if non_finite:
        raise ValueError(
            f"checkpoint {path}: parameter {non_finite[0]} holds NaN or Inf values "
            f"({len(non_finite)} parameter(s) do); the training diverged or the file is "
            "damaged: use another checkpoint"
        )
    model.load_state_dict(state, strict=True)
