"""Checkpoints load on torch 2.14 with weights_only=True: numpy meta and MMEngine training
state allowed, code refused, unreadable files named."""

import os

import numpy as np
import pytest
import torch
from mmengine.model import BaseModel
from mmengine.runner import Runner

from pfcr_mm.engine.checkpoint import load_checkpoint_file, load_weights_strict


class _RunsCode:
    def __reduce__(self):
        return (os.system, ("echo should-not-run",))


class _ReachesBeyondHistoryBuffer:
    def __reduce__(self):
        from mmengine.logging import HistoryBuffer

        return (getattr, (HistoryBuffer, "register_statistics"))


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
    with pytest.raises(ValueError, match=r"evil.pth refused: it holds the global posix.system"):
        load_checkpoint_file(path)
    # the getattr that MMEngine's HistoryBuffer needs reaches nothing else
    torch.save({"x": _ReachesBeyondHistoryBuffer()}, path)
    with pytest.raises(ValueError, match="evil.pth refused"):
        load_checkpoint_file(path)


class _Toy(BaseModel):
    def __init__(self):
        super().__init__()
        self.lin = torch.nn.Linear(2, 1)

    def forward(self, inputs, labels=None, mode="tensor"):
        out = self.lin(inputs).squeeze(1)
        return {"loss": ((out - labels) ** 2).mean()} if mode == "loss" else out


def test_mmengine_training_checkpoint_loads(tmp_path):
    """What MMEngine's CheckpointHook saves after an epoch (meta, state_dict, message_hub with
    HistoryBuffer logs, optimizer and scheduler state) loads, and its weights go into a model."""
    data = [dict(inputs=torch.randn(2), labels=torch.tensor(1.0)) for _ in range(8)]
    runner = Runner(
        model=_Toy(),
        work_dir=str(tmp_path),
        train_dataloader=dict(
            dataset=data,
            batch_size=4,
            sampler=dict(type="DefaultSampler", shuffle=True),
            collate_fn=dict(type="default_collate"),
        ),
        optim_wrapper=dict(optimizer=dict(type="AdamW", lr=0.01)),
        param_scheduler=dict(type="LinearLR", start_factor=0.5, by_epoch=False, end=2),
        train_cfg=dict(by_epoch=True, max_epochs=1),
        default_hooks=dict(checkpoint=dict(type="CheckpointHook", interval=1)),
        randomness=dict(seed=0),
    )
    runner.train()
    path = tmp_path / "epoch_1.pth"
    ckpt = load_checkpoint_file(path)
    assert {"meta", "state_dict", "message_hub", "optimizer", "param_schedulers"} <= set(ckpt)
    loss = ckpt["message_hub"]["log_scalars"]["train/loss"]
    assert type(loss).__name__ == "HistoryBuffer" and np.isfinite(loss.mean())
    fresh = torch.nn.Linear(2, 1)
    load_weights_strict(fresh, path, prefix="lin.")
    assert torch.equal(fresh.weight, runner.model.lin.weight)


@pytest.mark.parametrize("cut", [0, 0.5])
def test_empty_or_truncated_file_is_named(tmp_path, cut):
    whole = tmp_path / "whole.pth"
    torch.save({"state_dict": {"w": torch.ones(1000)}}, whole)
    data = whole.read_bytes()
    path = tmp_path / "cut.pth"
    path.write_bytes(data[: int(len(data) * cut)])
    with pytest.raises(ValueError, match=f"cannot read checkpoint {path} .*truncated") as info:
        load_checkpoint_file(path)
    assert "\n" not in str(info.value) and "weights_only=False" not in str(info.value)


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
    with pytest.raises(ValueError, match="evil.pth refused"):
        load_checkpoint(model, str(tmp_path / "evil.pth"))
