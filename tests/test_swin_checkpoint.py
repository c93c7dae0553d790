"""The Swin-Transformer-Object-Detection converter maps original keys exactly and refuses to
write a checkpoint that does not fit the config."""

from pathlib import Path

import pytest
import torch
from mmdet.registry import MODELS
from mmdet.utils import register_all_modules
from mmengine.config import Config

ROOT = Path(__file__).resolve().parents[1]


def _to_original_layout(state: dict) -> dict:
    """Inverse of the mmdet key map and PatchMerging re-ordering (what Microsoft's code saves)."""
    out = {}
    for k, v in state.items():
        if k.startswith("backbone."):
            k = k.replace("stages", "layers", 1).replace("attn.w_msa.", "attn.")
            k = k.replace("ffn.layers.0.0.", "mlp.fc1.").replace("ffn.layers.1.", "mlp.fc2.")
            k = k.replace("patch_embed.projection", "patch_embed.proj")
            if "downsample.reduction" in k:
                o, i = v.shape
                v = v.reshape(o, i // 4, 4).transpose(1, 2)[:, [0, 2, 1, 3], :].reshape(o, i)
            elif "downsample.norm" in k:
                v = v.reshape(-1, 4).transpose(0, 1)[[0, 2, 1, 3], :].reshape(-1)
        out[k] = v
    return out


def _tiny_cfg(tmp_path: Path) -> Path:
    cfg = tmp_path / "tiny.py"
    cfg.write_text(
        f"_base_ = [{str(ROOT / 'configs/pfcr_cascade_mask_rcnn_swin_t_w4a4.py')!r}]\n"
        "model = dict(backbone=dict(embed_dims=16, depths=[2, 2, 2, 2], num_heads=[1, 2, 2, 4]),"
        " neck=dict(in_channels=[16, 32, 64, 128]))\n"
    )
    return cfg


@pytest.mark.slow
def test_round_trip_and_refusal(convert_tool, tmp_path, capsys):
    register_all_modules()
    cfg = _tiny_cfg(tmp_path)
    model = MODELS.build(Config.fromfile(cfg).model)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    torch.save(
        {"state_dict": _to_original_layout(state), "meta": {"epoch": 36}}, tmp_path / "o.pth"
    )
    assert (
        convert_tool.main([str(tmp_path / "o.pth"), str(tmp_path / "c.pth"), "--config", str(cfg)])
        == 0
    )
    converted = torch.load(tmp_path / "c.pth", weights_only=True)["state_dict"]
    assert set(converted) == set(state)
    assert all(torch.equal(converted[k], state[k]) for k in state)
    # the written file is not overwritten
    assert (
        convert_tool.main([str(tmp_path / "o.pth"), str(tmp_path / "c.pth"), "--config", str(cfg)])
        == 2
    )
    assert "exists" in capsys.readouterr().err
    # a checkpoint for another architecture is refused and nothing is written
    bad = _to_original_layout(state)
    bad.pop("roi_head.bbox_head.0.fc_cls.weight")
    torch.save({"state_dict": bad}, tmp_path / "bad.pth")
    assert (
        convert_tool.main(
            [str(tmp_path / "bad.pth"), str(tmp_path / "d.pth"), "--config", str(cfg)]
        )
        == 2
    )
    assert "missing: roi_head.bbox_head.0.fc_cls.weight" in capsys.readouterr().err
    assert not (tmp_path / "d.pth").exists()
