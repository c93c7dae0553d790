"""The core (pfcr_mm, quant/, adapters/, recon/) imports neither mmdet nor mmcv nor mmengine;
recon/ imports no matplotlib either (only when a plot is written)."""

import subprocess
import sys


def test_core_does_not_import_openmmlab():
    code = (
        "import sys, torch, timm, pfcr_mm.quant, pfcr_mm.adapters; "
        "from pfcr_mm.adapters import available_adapters; available_adapters(); "
        "bad = [m for m in sys.modules if m.split('.')[0] in ('mmdet', 'mmcv', 'mmengine')]; "
        "print(bad); sys.exit(1 if bad else 0)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0, out.stdout + out.stderr


def test_top_level_api_pulls_in_no_openmmlab():
    code = (
        "import pfcr_mm, sys; pfcr_mm.quantize; pfcr_mm.PTQConfig; import pfcr_mm.recon; "
        "assert not {'mmdet','mmengine','mmcv'} & set(sys.modules), 'openmmlab imported'"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0, out.stdout + out.stderr


def test_recon_imports_no_openmmlab_and_no_matplotlib():
    code = (
        "import sys, pfcr_mm.recon; "
        "bad = [m for m in sys.modules if m.split('.')[0] in "
        "('mmdet', 'mmcv', 'mmengine', 'matplotlib')]; print(bad); sys.exit(1 if bad else 0)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0, out.stdout + out.stderr
