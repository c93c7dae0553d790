"""Loading user checkpoints safely on torch >= 2.6 (``weights_only=True`` by default).

Checkpoints written by mmengine/mmdet/timm training hold more than tensors: numpy objects in
their meta data (scalars, arrays, dtypes) and, in MMEngine's ``epoch_N.pth``/``iter_N.pth``,
the ``message_hub`` with its ``HistoryBuffer`` logs; mmengine 0.10.7 calls plain
``torch.load``, which then fails. Instead of turning ``weights_only`` off, which lets a
malicious file run code, exactly those types are allow-listed (:func:`checkpoint_safe_globals`);
anything else still fails to load, in one line naming the file. Importing this module makes
mmengine's loader of local files (``load_from``, ``load_checkpoint``) use
:func:`load_checkpoint_file`.
"""

from __future__ import annotations

import inspect
import pickle
import re
from pathlib import Path

import numpy as np
import torch
from mmengine.logging import HistoryBuffer
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


def _history_buffer_method(owner, name: str):
    """``getattr`` as a pickled ``HistoryBuffer`` uses it: its state names its statistics
    methods as ``getattr(HistoryBuffer, 'mean')``. Only functions of HistoryBuffer's own class
    body are given; any other ``getattr`` in a checkpoint is refused."""
    function = vars(HistoryBuffer).get(name) if owner is HistoryBuffer else None
    if not inspect.isfunction(function):
        raise pickle.UnpicklingError(f"getattr({owner!r}, {name!r}) is not allowed")
    return function


def checkpoint_safe_globals() -> list:
    """What training checkpoints hold besides tensors: the numpy types of
    :func:`numpy_safe_globals` and MMEngine's ``message_hub`` logs (``HistoryBuffer``, with a
    ``getattr`` restricted to its statistics methods)."""
    return numpy_safe_globals() + [
        HistoryBuffer,
        (_history_buffer_method, "builtins.getattr"),
        (_history_buffer_method, "__builtin__.getattr"),
    ]


def check_is_file(path: str | Path, what: str) -> None:
    """Refuse in one line a ``path`` the user gave as a file (``what``: "checkpoint", ...)
    that is a folder or missing."""
    if Path(path).is_dir():
        raise ValueError(f"the {what} {path} is a folder: pass the file itself")
    if not Path(path).is_file():
        raise FileNotFoundError(f"{what} not found: {path}")


def load_checkpoint_file(path: str | Path, map_location: str = "cpu") -> dict:
    """``torch.load`` with ``weights_only=True`` plus the allow-list of
    :func:`checkpoint_safe_globals` (``.safetensors`` files through safetensors).

    Raises FileNotFoundError with the path when the file is missing, and ValueError in one line
    naming the file when it cannot be read (empty, truncated, not a checkpoint) or holds objects
    outside the allow-list.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            return load_file(str(path), device=map_location)
        with torch.serialization.safe_globals(checkpoint_safe_globals()):
            return torch.load(path, map_location=map_location, weights_only=True)
    except Exception as err:  # whatever a damaged file makes the unpickler raise
        message = str(err)
        if "Weights only load failed" in message:
            found = re.search(r"GLOBAL ([\w.]+)", message)
            what = f"the global {found.group(1)}" if found else "an object outside the allow-list"
            raise ValueError(
                f"checkpoint {path} refused: it holds {what}, and loading it could run code; "
                "only tensors, numpy meta data and MMEngine's training state load. Save the "
                "weights alone (torch.save(model.state_dict(), ...))"
            ) from None
        first = message.splitlines()[0].split(". ")[0] if message else ""
        cause = f"{type(err).__name__}: {first}" if first else type(err).__name__
        raise ValueError(
            f"cannot read checkpoint {path} ({path.stat().st_size} bytes; {cause}): the file is "
            "empty, truncated or not a checkpoint; copy or save it again"
        ) from None


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
    naming the parameters that hold NaN or Inf.

    prefix: the name of ``model`` inside a wrapper (``"net."``): a checkpoint of the wrapper
        (MMEngine training of it), whose keys all start with it, loads without it.
    """
    state = state_dict_of(load_checkpoint_file(path))
    if prefix and state and all(k.startswith(prefix) for k in state):
        state = {k[len(prefix) :]: v for k, v in state.items()}
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
