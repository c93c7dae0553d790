"""pfcr_mm: progressive fine-to-coarse reconstruction PTQ for vision transformers.

The core is pure torch (no OpenMMLab import): ``pfcr_mm.quantize(model, PTQConfig(...), batches)``
runs the whole method (:mod:`pfcr_mm.core`); :mod:`pfcr_mm.engine` runs it inside MMEngine.
"""

from .core import QuantResult, ResumeState, quantize
from .settings import (
    METHODS,
    CacheSettings,
    CalibSettings,
    PTQConfig,
    QuantConfig,
    ReconSettings,
)

__version__ = "0.1.0"

__all__ = [
    "METHODS",
    "CacheSettings",
    "CalibSettings",
    "PTQConfig",
    "QuantConfig",
    "QuantResult",
    "ReconSettings",
    "ResumeState",
    "quantize",
]
