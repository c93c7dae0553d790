"""pfcr_mm: progressive fine-to-coarse reconstruction PTQ for vision transformers.

The core is pure torch (no OpenMMLab import): ``pfcr_mm.quantize(model, PTQConfig(...), batches)``
runs the whole method (:mod:`pfcr_mm.core`); :mod:`pfcr_mm.engine` runs it inside MMEngine.
"""

from .core import METHODS, CalibSettings, PTQConfig, QuantResult, ResumeState, quantize
from .quant.config import QuantConfig
from .recon import ReconSettings

__version__ = "0.1.0"

__all__ = [
    "METHODS",
    "CalibSettings",
    "PTQConfig",
    "QuantConfig",
    "QuantResult",
    "ReconSettings",
    "ResumeState",
    "quantize",
]
