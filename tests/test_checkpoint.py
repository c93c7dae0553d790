"""Checkpoints load on torch 2.14 with weights_only=True: numpy meta allowed, code refused."""

import os

import numpy as np
import pytest
import torch

from pfcr_mm.engine.checkpoint import load_checkpoint_file, load_weights_strict


class _RunsCode:
    def __reduce__(self):
        return (os.system, ("echo should-not-run",))


def test_numpy_meta_loads(tmp_path):
    path = tmp_path / "ckpt.pth"
    torch.save(
        {
            "state_dict": {"w": torch.ones(2)},
            "meta": {
                "epoch": np.int64(3),
                "lr": np.float64(0.1),
                "hist": np.arange(4),
                "dtype": np.dtype("float32"),
            },
        },
        path,
    )
    ckpt = load_checkpoint_file(path)
    assert ckpt["meta"]["epoch"] == 3 and ckpt["meta"]["hist"].tolist() == [0, 1, 2, 3]
    assert torch.equal(ckpt["state_dict"]["w"], torch.ones(2))


def test_code_in_checkpoint_refused(tmp_path):
    path = tmp_path / "evil.pth"
    torch.save({"x": _RunsCode()}, path)
    with pytest.raises(Exception, match="Weights only load failed"):
        load_checkpoint_file(path)


def test_missing_file_and_key_mismatch(tmp_path):
    with pytest.raises(FileNotFoundError, match="checkpoint not found"):
        load_checkpoint_file(tmp_path / "none.pth")
    model = torch.nn.Linear(2, 2)
    torch.save({"weight": torch.zeros(2, 2), "extra": torch.zeros(1)}, tmp_path / "m.pth")
    with pytest.raises(
        KeyError, match=r"1 missing key\(s\) \['bias'\], 1 unexpected key\(s\) " r"\['extra'\]"
    ):
        load_weights_strict(model, tmp_path / "m.pth")


def test_mmengine_load_checkpoint_uses_the_safe_loader(tmp_path):
    from mmengine.runner import load_checkpoint

    import pfcr_mm.engine  # noqa: F401  (registers the loader)

    model = torch.nn.Linear(2, 2)
    path = tmp_path / "mm.pth"
    torch.save(
        {
            "state_dict": {"weight": torch.ones(2, 2), "bias": torch.zeros(2)},
            "meta": {"epoch": np.int64(12), "hook_msgs": {"best": np.float64(0.4)}},
        },
        path,
    )
    ckpt = load_checkpoint(model, str(path), map_location="cpu")
    assert ckpt["meta"]["epoch"] == 12 and torch.equal(model.weight, torch.ones(2, 2))
    torch.save({"state_dict": {}, "x": _RunsCode()}, tmp_path / "evil.pth")
    with pytest.raises(Exception, match="Weights only load failed"):
        load_checkpoint(model, str(tmp_path / "evil.pth"))
