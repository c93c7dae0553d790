"""pfcr_mm.quantize and PTQConfig: the whole method in one call, with torch and timm only."""

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from pfcr_mm import PTQConfig, QuantConfig, ReconSettings
from pfcr_mm.settings import CalibSettings

# The README's pure-torch example on the demo ViT (6 blocks, committed checkpoint) and demo
# images drawn in memory, in a fresh interpreter so that nothing the other tests imported
# counts: it must run with torch and timm (and the demo's numpy/PIL drawing) only.
SCRIPT = textwrap.dedent(
    """
    import json, sys
    import numpy as np, timm, torch
    import pfcr_mm
    from pfcr_mm.demo.shapes import CLASSES, image_rng, render_shape_image

    torch.manual_seed(0)
    torch.set_num_threads(1)
    meta = json.load(open("checkpoints/demo_vit_shapes.json"))

    def images(split, per_class):
        x, y = [], []
        for c, name in enumerate(CLASSES):
            for i in range(per_class):
                x.append(render_shape_image(name, image_rng(0, split, c, i)))
                y.append(c)
        x = torch.from_numpy(np.stack(x)).permute(0, 3, 1, 2).float() / 255
        return (x - 0.5) / 0.5, torch.tensor(y)

    def demo_vit():
        m = timm.create_model(meta["arch"], pretrained=False, **meta["model_kwargs"])
        m.load_state_dict(torch.load("checkpoints/demo_vit_shapes.pth", weights_only=True))
        return m.eval()

    calib, _ = images("train", 8)  # 80 calibration images, 2 batches
    val, labels = images("val", 30)  # 300 held-out images
    with torch.no_grad():
        ref = demo_vit()(val)
    out = {}
    for method in ("calib", "pfcr"):
        model = demo_vit()
        config = pfcr_mm.PTQConfig(
            method=method,
            quant=pfcr_mm.QuantConfig(w_bits=3, a_bits=3),
            # calibration alone (no GPTQ, which "auto" gives calib): what pfcr starts from
            recon=pfcr_mm.ReconSettings(iters=50, batch_size=32, log_every=0, compensate="none"),
        )
        result = pfcr_mm.quantize(model, config, list(calib.split(40)), print_fn=lambda s: None)
        with torch.no_grad():
            logits = model(val)
        out[method] = {
            "error": float((logits - ref).pow(2).sum() / ref.pow(2).sum()),
            "top1": float((logits.argmax(1) == labels).float().mean()),
            "recon": result.recon,
            "rounding": sorted(
                {q.rounding for q in model.blocks.modules() if hasattr(q, "rounding")}
            ),
        }
    out["openmmlab"] = sorted({"mmdet", "mmengine", "mmcv"} & set(sys.modules))
    print(json.dumps(out))
    """
)


@pytest.mark.slow
def test_quantize_runs_pfcr_in_one_call_with_torch_and_timm_only():
    import json

    proc = subprocess.run(
        [sys.executable, "-c", SCRIPT],
        capture_output=True,
        text=True,
        timeout=600,
        cwd=Path(__file__).resolve().parents[1],
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    res = json.loads(proc.stdout.strip().splitlines()[-1])
    assert res["openmmlab"] == []
    calib, pfcr = res["calib"], res["pfcr"]
    assert calib["recon"] == {} and calib["rounding"] == ["nearest"]
    # 6 blocks, one stage: 12 MHSA/MLP units, 6 blocks, 3 pairs, 2 groups of 4 and 2 (the
    # second repeats level 2 and is skipped), the encoder: 12 + 6 + 3 + 1 + 1 = 23 units
    assert pfcr["recon"]["units"] == 23 and pfcr["recon"]["levels_run"] == [0, 1, 2, 3, 4]
    # the budget of block at 50 steps per block, in block forward+backward passes
    assert pfcr["recon"]["block_passes"] == pytest.approx(50 * 6, rel=0.05)
    assert pfcr["rounding"] == ["hard"]  # every block weight hardened to its learned integers
    # measured: relative logit error 0.088 (calib) -> 0.076 (pfcr: 10 steps per unit, the
    # compute of 50 block-wise steps per block) on the 300 held-out images, 0.0795 on a CPU
    # with AVX-512 VNNI (1 or 2 threads alike); top-1 within 6 images of 300
    assert pfcr["error"] < 0.95 * calib["error"], res
    assert pfcr["top1"] >= calib["top1"] - 0.03


def test_ptq_config_round_trips_and_names_the_close_key():
    config = PTQConfig(
        method="pfcr",
        scope="backbone+neck",
        quant=QuantConfig(w_bits=3, a_bits=3),
        calib=CalibSettings(num_images=64, dataset={"split": "train"}),
        recon=ReconSettings(
            iters=10, pos="shrink", max_level=2, non_block="layerwise", outside_iters=3
        ),
    )
    again = PTQConfig.from_dict(config.to_dict())
    assert again == config
    assert again.scope_modules == ["backbone", "neck"]
    assert PTQConfig.from_dict({}).recon.pos == "anneal"
    with pytest.raises(KeyError, match=r"'metod' \(did you mean 'method'\?\)"):
        PTQConfig.from_dict({"metod": "pfcr"})
    with pytest.raises(KeyError, match=r"'iter' \(did you mean 'iters'\?\)"):
        PTQConfig.from_dict({"recon": {"iter": 5}})
    with pytest.raises(KeyError, match=r"'w_bit' \(did you mean 'w_bits'\?\)"):
        PTQConfig.from_dict({"quant": {"w_bit": 5}})
    with pytest.raises(ValueError, match="ptq.method must be one of"):
        PTQConfig(method="brecq")
    with pytest.raises(ValueError, match="num_images must be a positive integer"):
        PTQConfig.from_dict({"calib": {"num_images": 0}})
    with pytest.raises(ValueError, match="non_block must be one of"):
        PTQConfig.from_dict({"recon": {"non_block": "all"}})
    with pytest.raises(ValueError, match="outside_iters must be >= 1, a dict .* got 0"):
        PTQConfig.from_dict({"recon": {"outside_iters": 0}})
    # by unit name; nested dicts (--cfg-options recon.outside_iters.roi_head.bbox_head=900)
    # read as dotted names, and the dotted form round-trips
    per_unit = PTQConfig.from_dict(
        {"recon": {"outside_iters": {"neck": 600, "roi_head": {"bbox_head": 900}}}}
    )
    assert per_unit.recon.outside_iters == {"neck": 600, "roi_head.bbox_head": 900}
    assert PTQConfig.from_dict(per_unit.to_dict()) == per_unit
    with pytest.raises(ValueError, match=r"a dict .* got \{'neck': 0\}"):
        PTQConfig.from_dict({"recon": {"outside_iters": {"neck": 0}}})
    with pytest.raises(ValueError, match="max_level must be a level >= 0"):
        PTQConfig.from_dict({"recon": {"max_level": -1}})


def test_head_bits_without_a_head_fails_before_the_model_changes(tiny_timm_vit):
    import torch

    from pfcr_mm import quantize

    model = tiny_timm_vit()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    config = PTQConfig(quant=QuantConfig(head_bits=8))
    with pytest.raises(ValueError, match="head_bits is set but the model has neither a class"):
        quantize(model, config, [torch.randn(2, 3, 32, 32)])
    assert model.state_dict().keys() == before.keys()  # no quantizer was added
    # with the head named, the head gets 8 bits and the rest the model's bits
    quantize(model, config, [torch.randn(2, 3, 32, 32)], head=model.get_classifier())
    assert (
        model.head.weight_quantizer.bits == 8 and model.blocks[0].mlp.fc1.weight_quantizer.bits == 4
    )
