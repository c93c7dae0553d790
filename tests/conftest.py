"""Tiny models and helpers shared by the tests (CPU, seconds), as fixtures.

The model fixtures return factories (``tiny_timm_vit(**kw)`` builds a fresh model at each
call), so a test builds as many models as it needs and draws its random inputs after them."""

import contextlib
import importlib.util
from pathlib import Path

import numpy as np
import pytest
import timm
import torch
from PIL import Image


@pytest.fixture(scope="session")
def tiny_timm_vit():
    """Factory of a tiny timm ViT (4 blocks, 17 tokens of 48 channels, 5 classes), in eval mode;
    keyword arguments go to ``timm.create_model``."""

    def build(**kw):
        return timm.create_model(
            "vit_tiny_patch16_224",
            pretrained=False,
            img_size=32,
            patch_size=8,
            embed_dim=48,
            depth=4,
            num_heads=3,
            num_classes=5,
            **kw,
        ).eval()

    return build


@pytest.fixture(scope="session")
def tiny_timm_swin():
    """Factory of a tiny timm Swin (two stages of two blocks, 56x56 images), in eval mode."""

    def build():
        return timm.create_model(
            "swin_tiny_patch4_window7_224",
            pretrained=False,
            img_size=56,
            embed_dim=24,
            depths=(2, 2),
            num_heads=(2, 4),
            window_size=7,
            num_classes=5,
        ).eval()

    return build


@pytest.fixture(scope="session")
def tiny_mmdet_swin():
    """Factory of a tiny mmdet Swin backbone (two stages of two blocks), in eval mode."""

    def build():
        from mmdet.models.backbones.swin import SwinTransformer

        model = SwinTransformer(
            embed_dims=24,
            depths=(2, 2),
            num_heads=(2, 4),
            window_size=7,
            out_indices=(0, 1),
            strides=(4, 2),
            drop_path_rate=0.0,
        )
        model.eval()  # mmdet's SwinTransformer.train() returns None: no chaining
        return model

    return build


@pytest.fixture(scope="session")
def quantized_vit(tiny_timm_vit):
    """Factory: ``quantized_vit()`` returns ``(model, plan, batches)``."""
    from pfcr_mm.adapters import prepare_calibrated
    from pfcr_mm.settings import QuantConfig

    def build():
        """A tiny ViT (4 blocks, 17 tokens of 48 channels) quantized at W4A4, two calib
        batches."""
        model = tiny_timm_vit()
        batches = [torch.randn(16, 3, 32, 32) for _ in range(2)]
        plan = prepare_calibrated(
            model, QuantConfig(w_bits=4, a_bits=4), lambda m: [m(b) for b in batches]
        )
        return model, plan, batches

    return build


@pytest.fixture(scope="session")
def fake_units():
    """Factory: ``fake_units(stage_depths)`` returns ``(units, blocks)``, an MHSA and an MLP
    reconstruction unit per identity block, named as Swin's ``layers.<s>.blocks.<i>``."""
    from torch import nn

    from pfcr_mm.adapters.base import ReconUnit

    def build(stage_depths):
        units, blocks = [], []
        for s, depth in enumerate(stage_depths):
            for i in range(depth):
                block = nn.Identity()
                blocks.append(block)
                for kind in ("attn", "mlp"):
                    units.append(
                        ReconUnit(f"layers.{s}.blocks.{i}.{kind}", kind, block, lambda b, x: x)
                    )
        return units, blocks

    return build


@pytest.fixture(scope="session")
def seed_and_one_thread():
    """Context manager factory: inside ``with seed_and_one_thread():`` torch is seeded with 0
    and runs on one thread, as every test does (module-scoped fixtures, set up before the
    test's own fixtures, use it to compute what the tests compare)."""

    @contextlib.contextmanager
    def scope():
        # Tiny tensors: one thread is faster, and immune to other processes on the cores.
        torch.manual_seed(0)
        n = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            yield
        finally:
            torch.set_num_threads(n)

    return scope


@pytest.fixture(autouse=True)
def _seed_and_one_thread(seed_and_one_thread):
    with seed_and_one_thread():
        yield


@pytest.fixture(scope="session")
def assert_every_point_hit_once():
    """``assert_every_point_hit_once(model, run)``: see its docstring."""
    from pfcr_mm.quant.attention import AttentionQuantizers
    from pfcr_mm.quant.calibrate import named_quantizers
    from pfcr_mm.quant.modules import QuantLinear

    def check(model, run) -> int:
        """Run ``run()`` and assert that every attention quantizer point (q, k, v, probs) and
        the input and weight quantizer of every QuantLinear ran exactly once; returns the
        number of attention points."""
        hits = {}
        handles = [
            q.register_forward_hook(lambda m, a, o, n=n: hits.__setitem__(n, hits.get(n, 0) + 1))
            for n, q in named_quantizers(model)
        ]
        with torch.no_grad():
            run()
        for h in handles:
            h.remove()
        points = 0
        for name, m in model.named_modules():
            if isinstance(m, AttentionQuantizers):
                for point in ("q", "k", "v", "probs"):
                    assert hits.get(f"{name}.{point}", 0) == 1, f"{name}.{point} not hit once"
                    points += 1
            if isinstance(m, QuantLinear):
                assert hits[f"{name}.input_quantizer"] == hits[f"{name}.weight_quantizer"] == 1
        return points

    return check


@pytest.fixture(scope="session")
def fp_outputs_around_reparam():
    """``fp_outputs_around_reparam(model, x)``: see its docstring."""
    from pfcr_mm.adapters import prepare
    from pfcr_mm.quant.calibrate import calibrate_activations, set_quant_state
    from pfcr_mm.quant.reparam import reparameterize_post_ln
    from pfcr_mm.settings import QuantConfig

    def run(model, x):
        """Prepare ``model`` at W4A4, calibrate on ``x``, and return the plan and the FP
        outputs (all quantizers off) before and after the post-LayerNorm
        re-parameterization."""
        plan = prepare(model, QuantConfig(w_bits=4, a_bits=4))
        calibrate_activations(model, lambda m: m(x))
        set_quant_state(model, weights=False, activations=False)
        with torch.no_grad():
            before = model(x)
            for norm, linear in plan.post_ln_pairs:
                reparameterize_post_ln(norm, linear)
            after = model(x)
        return plan, before, after

    return run


def _load_tool(name: str):
    """``tools/<name>.py`` (``name`` may be in a sub-folder: ``benchmarks/benchmark_step``) as a
    module, loaded from its file (``tools/`` is not made importable)."""
    path = Path(__file__).resolve().parents[1] / "tools" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(f"pfcr_tools_{path.stem}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="session")
def make_image_folder():
    """Factory: ``make_image_folder(root, per_class=4, classes=("a", "b", "c"))`` writes an
    ImageNet-layout folder under ``root``: ``train/<class>/`` and ``val/<class>/`` each hold
    ``per_class`` random 40x36 PNGs (the same ones at every call)."""

    def make(root: Path, per_class: int = 4, classes=("a", "b", "c")) -> None:
        rng = np.random.default_rng(0)
        for split in ("train", "val"):
            for c in classes:
                (root / split / c).mkdir(parents=True)
                for i in range(per_class):
                    img = rng.integers(0, 255, (40, 36, 3), dtype=np.uint8)
                    Image.fromarray(img).save(root / split / c / f"{i}.png")

    return make


@pytest.fixture(scope="session")
def write_vit_config():
    """Factory: ``write_vit_config(folder, **over)`` writes ``folder/cfg.py``, a tools/ptq.py
    config of a 2-block ViT (32x32 images, 3 classes) whose FP checkpoint it saves as
    ``folder/tiny.pth``, quantized at W4A4 with 5 calibration images of the ImageNet-layout
    folder ``folder/data``; returns its path. ``over`` replaces the config's ``arch``,
    ``kwargs``, ``ckpt``, ``data``, ``bits`` or ``extra`` (Python source, appended)."""
    from pfcr_mm.engine.classification import create_timm_model

    root = Path(__file__).resolve().parents[1]
    arch = "vit_tiny_patch16_224"
    kwargs = dict(img_size=32, patch_size=8, embed_dim=48, depth=2, num_heads=3, num_classes=3)

    def write(folder: Path, **over) -> Path:
        ckpt = folder / "tiny.pth"
        if not ckpt.exists():
            torch.save(create_timm_model(arch, kwargs).state_dict(), ckpt)
        fields = dict(
            arch=repr(arch),
            kwargs=repr(kwargs),
            ckpt=repr(str(ckpt)),
            data=repr(str(folder / "data")),
            bits=4,
            extra="",
        )
        fields.update(over)
        cfg = folder / "cfg.py"
        cfg.write_text(f"""
_base_ = [{str(root / 'configs/_base_/imagenet_timm.py')!r}]
model = dict(arch={fields['arch']}, model_kwargs={fields['kwargs']}, checkpoint={fields['ckpt']})
test_dataloader = dict(batch_size=4, num_workers=0, dataset=dict(data_root={fields['data']},
                       resize=32, crop_size=32))
ptq = dict(quant=dict(w_bits={fields['bits']}, a_bits={fields['bits']}),
           calib=dict(num_images=5, batch_size=2, num_workers=0))
{fields['extra']}
""")
        return cfg

    return write


@pytest.fixture
def vit_config(tmp_path, make_image_folder, write_vit_config):
    """The path of ``write_vit_config(tmp_path)``, on 4 images per class of
    ``make_image_folder(tmp_path / "data")``."""
    make_image_folder(tmp_path / "data")
    return write_vit_config(tmp_path)


@pytest.fixture(scope="session")
def ptq_tool():
    """``tools/ptq.py`` (its ``main(argv)`` returns the exit code)."""
    return _load_tool("ptq")


@pytest.fixture(scope="session")
def step_tool():
    """``tools/benchmarks/benchmark_step.py`` (its ``main(argv)`` returns the exit code)."""
    return _load_tool("benchmarks/benchmark_step")


@pytest.fixture(scope="session")
def signed_int8_exact() -> bool:
    """Whether onnxruntime computes int8-weight (u8s8) products exactly on this CPU: with VNNI
    or AMX; on AVX2 without them its kernel can saturate 16-bit sums (docs/deploy.md)."""
    from pfcr_mm.provenance import cpu_flags

    return any("vnni" in f or f.startswith("amx") for f in cpu_flags())


@pytest.fixture(scope="session")
def recon_tool():
    """``tools/benchmarks/benchmark_recon.py`` (its ``main(argv)`` returns the exit code)."""
    return _load_tool("benchmarks/benchmark_recon")


@pytest.fixture(scope="session")
def export_tool():
    """``tools/export.py`` (its ``main(argv)`` returns the exit code)."""
    return _load_tool("export")


@pytest.fixture(scope="session")
def convert_tool():
    """``tools/convert_swin_det_checkpoint.py``."""
    return _load_tool("convert_swin_det_checkpoint")


@pytest.fixture(scope="session")
def parity_tool():
    """``tools/check_vitdet_parity.py``."""
    return _load_tool("check_vitdet_parity")


@pytest.fixture(scope="session")
def mmcv_source_tool():
    """``tools/mmcv/prepare_source.py``."""
    return _load_tool("mmcv/prepare_source")


@pytest.fixture
def recorded_scores(monkeypatch):
    """``{id(point): first-stage scores}`` of every quantizer choice made while the test runs
    (:meth:`pfcr_mm.quant.choice.QuantizerChoice.choose` is wrapped)."""
    from pfcr_mm.quant.choice import QuantizerChoice

    scored = {}
    choose = QuantizerChoice.choose

    def recording(self, scores, downstream=None):
        scored[id(self)] = list(scores)
        choose(self, scores, downstream)

    monkeypatch.setattr(QuantizerChoice, "choose", recording)
    return scored
