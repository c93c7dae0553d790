"""``ptq.recon.part_loss='task'``: a detector's RPN and RoI heads reconstructed against the
divergence of the predictions they make (pfcr_mm.adapters.mmdet_parts): the score divergences,
box deltas weighted by the FP probability of what they box, and the loss scaled to the squared
error at the first step."""

from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from mmdet.registry import MODELS
from mmdet.utils import register_all_modules
from mmengine.config import Config

from pfcr_mm.adapters import task_loss_of
from pfcr_mm.adapters.mmdet_parts import (
    bbox_task_loss,
    bernoulli_kl,
    mask_task_loss,
    rpn_task_loss,
)
from pfcr_mm.recon import LayerUnit, ReconSettings
from pfcr_mm.recon.loss import ReconLoss, reconstruction_loss
from pfcr_mm.recon.pos import UnitRecipe

ROOT = Path(__file__).resolve().parents[1]


def test_bernoulli_kl_is_the_divergence_of_the_sigmoids():
    t, o = torch.tensor([-3.0, 0.0, 2.0, 8.0]), torch.tensor([-1.0, 0.5, 2.0, -8.0])
    p, q = torch.sigmoid(t), torch.sigmoid(o)
    direct = p * torch.log(p / q) + (1 - p) * torch.log((1 - p) / (1 - q))
    torch.testing.assert_close(bernoulli_kl(o, t), direct)
    assert bernoulli_kl(t, t).abs().max() < 1e-7
    # stable where the probabilities saturate in float32
    assert torch.isfinite(bernoulli_kl(torch.tensor([-60.0]), torch.tensor([60.0]))).all()


def _rpn_outputs(obj_logit: float, delta: float):
    """One image, one level of 1x2 positions and 1 anchor: position 0 holds the object."""
    cls = torch.tensor([[[[obj_logit], [-9.0]]]])  # (B, H, W, A)
    reg = torch.zeros(1, 1, 2, 4)
    reg[0, 0, 0, 0] = reg[0, 0, 1, 0] = delta
    return [cls], [reg]


def test_rpn_boxes_count_as_much_as_the_fp_objectness():
    loss = rpn_task_loss(SimpleNamespace(use_sigmoid_cls=True))
    target = _rpn_outputs(6.0, 0.0)
    assert loss(target, target) == pytest.approx(0.0, abs=1e-7)
    # the same delta error on both anchors: the object's (p = 0.9975) counts, the background's
    # (p = 1.2e-4) barely
    moved = loss(_rpn_outputs(6.0, 0.5), target)
    assert moved == pytest.approx(0.25 * (torch.sigmoid(torch.tensor(6.0)) + 1.234e-4), rel=1e-3)
    # objectness moved: the KL of the object's anchor
    assert loss(_rpn_outputs(2.0, 0.0), target) == pytest.approx(
        float(bernoulli_kl(torch.tensor(2.0), torch.tensor(6.0))), rel=1e-4
    )


def test_a_softmax_rpn_takes_its_first_logit_as_the_object():
    loss = rpn_task_loss(SimpleNamespace(use_sigmoid_cls=False))
    cls = torch.tensor([[[[5.0, -5.0]]]])  # object first (mmdet's order), one anchor
    reg_t, reg_q = torch.zeros(1, 1, 1, 4), torch.ones(1, 1, 1, 4)
    assert loss(([cls], [reg_q]), ([cls], [reg_t])) == pytest.approx(
        4 * torch.softmax(torch.tensor([5.0, -5.0]), 0)[0].item(), rel=1e-5
    )


def test_roi_box_deltas_count_for_the_class_the_fp_head_sees():
    head = SimpleNamespace(loss_cls=SimpleNamespace(use_sigmoid=False))
    loss = bbox_task_loss(head)
    cls = torch.tensor([[8.0, -8.0, -8.0]])  # class 0 sure; 2 classes and the background
    reg_t = torch.zeros(1, 8)
    wrong_class_1 = reg_t.clone()
    wrong_class_1[0, 4:] = 1.0
    wrong_class_0 = reg_t.clone()
    wrong_class_0[0, :4] = 1.0
    assert loss((cls, reg_t), (cls, reg_t)) == pytest.approx(0.0, abs=1e-7)
    assert loss((cls, wrong_class_1), (cls, reg_t)) < 1e-5
    assert loss((cls, wrong_class_0), (cls, reg_t)) == pytest.approx(4.0, rel=1e-4)
    # class-agnostic boxes count as much as the RoI is an object
    agnostic = loss((cls, torch.ones(1, 4)), (cls, torch.zeros(1, 4)))
    assert agnostic == pytest.approx(4.0, rel=1e-4)
    # the scores' divergence is the softmax KL
    shifted = torch.tensor([[6.0, -8.0, -8.0]])
    p, q = cls.softmax(-1), shifted.softmax(-1)
    assert loss((shifted, reg_t), (cls, reg_t)) == pytest.approx(
        float((p * (p / q).log()).sum()), rel=1e-4
    )


def test_mask_divergence_is_summed_over_pixels_and_averaged_over_rois():
    loss = mask_task_loss(None)
    target = torch.zeros(2, 3, 3, 1)
    out = target.clone()
    out[0, 0, 0, 0] = 1.0
    assert loss(out, target) == pytest.approx(
        float(bernoulli_kl(torch.tensor(1.0), torch.tensor(0.0))) / 2
    )


def test_the_task_loss_starts_at_the_squared_error_then_follows_the_divergence():
    recipe = UnitRecipe(10)
    loss_fn = ReconLoss(
        ReconSettings(iters=10), recipe, [], False, lambda o, t: (o - t).abs().sum()
    )
    target = torch.zeros(2, 3)
    first = torch.full((2, 3), 0.5)
    loss, rec = loss_fn(first, target, None, 0)
    assert (
        float(loss)
        == pytest.approx(float(rec))
        == pytest.approx(float(reconstruction_loss(first, target)))
    )
    later = torch.full((2, 3), 0.25)
    loss, _ = loss_fn(later, target, None, 1)
    # the scale of the first step (0.75 / 3.0) times the divergence (1.5)
    assert float(loss) == pytest.approx(0.75 / 3.0 * 1.5)


def test_the_demo_detector_heads_get_their_task_losses():
    register_all_modules()
    torch.manual_seed(0)
    model = MODELS.build(Config.fromfile(ROOT / "configs/demo/demo_mask_rcnn_swin_shapes.py").model)
    model.eval()
    assert task_loss_of(model.neck) is None and task_loss_of(model.backbone) is None
    feats = tuple(torch.randn(1, 64, s, s) for s in (40, 20, 10, 5, 3))
    unit = LayerUnit("rpn_head", model.rpn_head, True, task_loss=task_loss_of(model.rpn_head))
    with torch.no_grad():
        target = unit(feats)
        moved = unit(tuple(f + 0.1 * torch.randn_like(f) for f in feats))
    assert unit.task_loss(target, target) == pytest.approx(0.0, abs=1e-6)
    assert unit.task_loss(moved, target) > 0
    for head in (model.roi_head.bbox_head, model.roi_head.mask_head):
        assert task_loss_of(head) is not None
    with pytest.raises(ValueError, match="part_loss"):
        ReconSettings(part_loss="kl")


@pytest.mark.parametrize(
    "key, before, other",
    [
        ("part_loss", "mse", "task"),
        ("a_lr_mode", "absolute", "relative"),
        ("outside_iters", None, 900),
        ("hard_tail", 0.0, 0.3),
    ],
)
def test_a_block_model_saved_before_a_setting_existed_reads_as_it_ran(tmp_path, key, before, other):
    from pfcr_mm import PTQConfig
    from pfcr_mm.engine.saved_model import (
        QUANTIZED_FORMAT,
        quantization_settings,
        read_quantized_model,
    )

    config = PTQConfig(method="block")
    older = quantization_settings(config)
    del older["recon"][key]
    path = tmp_path / "older.pth"
    torch.save({"format": QUANTIZED_FORMAT, "settings": older, "state_dict": {}}, path)
    assert read_quantized_model(config, path)["settings"] == older
    with pytest.raises(ValueError, match=f"ptq.recon.{key}={before!r}, but the config says"):
        read_quantized_model(PTQConfig.from_dict({"method": "block", "recon": {key: other}}), path)
