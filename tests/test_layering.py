"""The quantization core (quant/, adapters/) imports neither mmdet nor mmcv nor mmengine."""

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
