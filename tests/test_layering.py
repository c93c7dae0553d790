"""The core (pfcr_mm, quant/, adapters/, recon/, export/) imports neither mmdet nor mmcv nor
mmengine; recon/ imports no matplotlib either (only when a plot is written)."""

import subprocess
import sys

import pytest

OPENMMLAB = ("mmdet", "mmcv", "mmengine")


@pytest.mark.slow
@pytest.mark.parametrize(
    "imports, banned",
    [
        # the adapters with timm loaded, as a timm user has them
        (
            "import torch, timm, pfcr_mm.quant, pfcr_mm.adapters; "
            "pfcr_mm.adapters.available_adapters()",
            OPENMMLAB,
        ),
        # the top-level API: the whole method in one call
        ("import pfcr_mm; pfcr_mm.quantize; pfcr_mm.PTQConfig", OPENMMLAB),
        ("import pfcr_mm.recon", (*OPENMMLAB, "matplotlib")),
        ("import pfcr_mm.export, pfcr_mm.export.runtime", OPENMMLAB),
    ],
    ids=["adapters", "top_level_api", "recon", "export"],
)
def test_core_imports_no_openmmlab(imports, banned):
    code = (
        f"import sys; {imports}; "
        f"bad = [m for m in sys.modules if m.split('.')[0] in {banned!r}]; "
        "print(bad); sys.exit(1 if bad else 0)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0, out.stdout + out.stderr
