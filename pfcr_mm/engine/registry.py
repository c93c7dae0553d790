"""The ``pfcr`` registry scope: children of MMEngine's root registries.

Refer to registered types as ``'pfcr.Name'`` from any config (also from ``default_scope='mmdet'``
configs). ``locations`` imports the registering modules on first use.
"""

from mmengine.registry import DATASETS as MMENGINE_DATASETS
from mmengine.registry import HOOKS as MMENGINE_HOOKS
from mmengine.registry import LOOPS as MMENGINE_LOOPS
from mmengine.registry import METRICS as MMENGINE_METRICS
from mmengine.registry import MODEL_WRAPPERS as MMENGINE_MODEL_WRAPPERS
from mmengine.registry import MODELS as MMENGINE_MODELS
from mmengine.registry import Registry

from ..models.vitdet import LN2d, SimpleFPN, ViTDet

_LOCATIONS = ["pfcr_mm.engine.classification"]

MODELS = Registry("model", parent=MMENGINE_MODELS, scope="pfcr", locations=_LOCATIONS)
for _model in (ViTDet, SimpleFPN, LN2d):  # pure torch (pfcr_mm.models.vitdet), built by type
    MODELS.register_module(module=_model)
DATASETS = Registry("dataset", parent=MMENGINE_DATASETS, scope="pfcr", locations=_LOCATIONS)
METRICS = Registry("metric", parent=MMENGINE_METRICS, scope="pfcr", locations=_LOCATIONS)
HOOKS = Registry("hook", parent=MMENGINE_HOOKS, scope="pfcr", locations=["pfcr_mm.engine.hooks"])
LOOPS = Registry("loop", parent=MMENGINE_LOOPS, scope="pfcr", locations=["pfcr_mm.engine.loop"])
MODEL_WRAPPERS = Registry(
    "model_wrapper", parent=MMENGINE_MODEL_WRAPPERS, scope="pfcr", locations=["pfcr_mm.engine.loop"]
)
