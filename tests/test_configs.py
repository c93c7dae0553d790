"""Every shipped config parses, has a valid ``ptq`` section, and says what its name says."""

import re
from pathlib import Path

import pytest
from mmengine.config import Config

from pfcr_mm import PTQConfig

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = sorted(
    p.relative_to(ROOT).as_posix()
    for p in (ROOT / "configs").rglob("*.py")
    if "_base_" not in p.parts
    # the training configs
    and p.name not in ("demo_mask_rcnn_swin_shapes.py", "demo_mask_rcnn_vitdet_shapes.py")
)


def test_every_config_is_listed():
    assert len(CONFIGS) == 42  # all but _base_ and the demo training config
    assert "configs/pfcr_mask_rcnn_swin_t_w4a4.py" in CONFIGS


@pytest.mark.parametrize("path", CONFIGS)
def test_config_ptq_section_matches_its_name(path):
    import pfcr_mm.engine  # noqa: F401  (the pfcr scope the configs use)

    cfg = Config.fromfile(ROOT / path)
    settings = PTQConfig.from_dict(cfg.ptq)
    name = Path(path).stem
    bits = re.search(r"w(\d)a(\d)$", name)
    assert bits, name
    assert (settings.quant.w_bits, settings.quant.a_bits) == tuple(map(int, bits.groups()))
    if "calib" in name or (name.startswith("demo_") and "pfcr" not in name):
        assert settings.method == "calib"
        # RepQ-ViT's setting (the classification calib configs, over their base's), and the
        # demo bases of tools/benchmarks as they were measured
        assert not settings.quant.post_softmax_renorm
    else:  # pfcr_* detection configs, *_pfcr_* classification and demo configs
        assert "pfcr" in name and settings.method == "pfcr"
        recon = settings.recon
        if name.startswith("demo_vit"):  # benchmark_recon.py's "fast" preset (tools/benchmarks)
            fast = (recon.iters, recon.w_lr, recon.max_level)
            assert fast == (100, 1e-2, 1) and (recon.a_lr, recon.a_lr_mode) == (5e-3, "relative")
            # benchmarks/demo_recon_vit_config
            assert (recon.hard_tail, settings.quant.head_bits) == (0.3, 8)
            assert settings.quant.post_gelu == "auto"  # benchmarks/demo_recon_post_gelu
            assert settings.quant.post_softmax_renorm  # benchmarks/demo_recon_renorm_quick
        elif name.startswith("demo_mask_rcnn_swin_shapes_pfcr"):
            # the quick preset's 100 steps per unit, at two levels, every unit outside the blocks
            # but the patch embedding and reductions named (benchmarks/demo_det_config_levels,
            # benchmarks/demo_det_w3a3_levels)
            assert (recon.iters, recon.max_level) == (200, 1)
            steps = [300, 150, 300, 150] if name.endswith("w4a4") else [900, 300, 900, 300]
            units = ["neck", "rpn_head", "roi_head.bbox_head", "roi_head.mask_head"]
            assert recon.outside_iters == dict(zip(units, steps))
        elif name.startswith("demo_"):
            assert recon.iters == 300  # benchmark_recon.py's "quick" preset (tools/benchmarks)
            assert recon.max_level == "top"
        else:
            assert recon.iters == 20000 and recon.cache_dtype == "float16"  # paper-grade
            # the global-attention classifiers renormalize their probability rows; the windowed
            # Swin and the detectors do not (benchmarks/demo_recon_renorm_quick, demo_det_renorm)
            assert settings.quant.post_softmax_renorm == name.startswith(("deit_s", "vit_b"))


@pytest.mark.slow
@pytest.mark.parametrize("path", CONFIGS)
def test_config_keys_pass_the_typo_checks(path):
    """No shipped config trips the checks of tools/ptq.py (its own variables, such as data_root
    or train_pipeline, are not near misses of a key MMEngine reads; every model and dataset
    field is one its class takes)."""
    from pfcr_mm.engine.calib_split import calib_dataset_cfg
    from pfcr_mm.engine.config_check import check_config_keys

    cfg = Config.fromfile(ROOT / path)
    dataset = cfg.test_dataloader.dataset
    calib = calib_dataset_cfg(PTQConfig.from_dict(cfg.ptq), dataset)
    check_config_keys(cfg, {"test_dataloader.dataset": dataset, "ptq.calib.dataset": calib})


def test_typo_checks_name_the_key():
    from pfcr_mm.engine.config_check import check_config_keys

    cfg = Config.fromfile(ROOT / "configs/demo/demo_mask_rcnn_swin_shapes_w4a4.py")
    cfg.model.backbone.embed_dim = 32  # the mmdet Swin takes embed_dims
    with pytest.raises(KeyError, match=r"model.backbone setting\(s\) 'embed_dim' \(did you mean "):
        check_config_keys(cfg, {})
    del cfg.model.backbone.embed_dim
    cfg.model.roi_head.bbox_head.num_clases = 4
    with pytest.raises(KeyError, match="'num_clases' \\(did you mean 'num_classes'"):
        check_config_keys(cfg, {})


def test_typo_checks_name_dataloader_sampler_and_transform_keys():
    from pfcr_mm.engine.config_check import check_config_keys

    cfg = Config.fromfile(ROOT / "configs/demo/demo_mask_rcnn_swin_shapes_w4a4.py")
    datasets = {"test_dataloader.dataset": cfg.test_dataloader.dataset}
    check_config_keys(cfg, datasets)  # as shipped
    cfg.test_dataloader.batch_sze = 2
    with pytest.raises(
        KeyError, match="test_dataloader setting\\(s\\) 'batch_sze' \\(did you mean"
    ):
        check_config_keys(cfg, datasets)
    del cfg.test_dataloader.batch_sze
    cfg.test_dataloader.sampler.shufle = False
    with pytest.raises(KeyError, match="test_dataloader.sampler setting\\(s\\) 'shufle'"):
        check_config_keys(cfg, datasets)
    del cfg.test_dataloader.sampler.shufle
    (resize,) = [t for t in cfg.test_dataloader.dataset.pipeline if t.type == "Resize"]
    resize.keep_ratoi = resize.pop("keep_ratio")
    with pytest.raises(KeyError, match="'keep_ratoi' \\(did you mean 'keep_ratio'\\?\\)"):
        check_config_keys(cfg, datasets)
