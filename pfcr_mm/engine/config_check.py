"""Config keys checked before anything is built: a typo fails in one line naming the closest
known key, instead of being ignored (top level) or raising a ``TypeError`` deep in a build
(model and dataset fields).

The known keys come from the code that reads them, never from a list kept here: the top-level
keys are the parameters of MMEngine's ``Runner`` and the keys it reads from its config, plus
the ones ``tools/ptq.py`` reads (:data:`PTQ_TOP_LEVEL_KEYS`); the fields of a model, dataset,
data transform or sampler dict are the keyword arguments of the class its ``type`` names in the
registry (:func:`accepted_keywords`); the keys of a dataloader dict are those ``Runner``'s
``build_dataloader`` reads and those of torch's ``DataLoader`` (:func:`dataloader_keys`).
"""

from __future__ import annotations

import difflib
import inspect
import re

from mmengine.registry import DATA_SAMPLERS, DATASETS, MODELS, TRANSFORMS
from mmengine.runner import Runner
from torch.utils.data import DataLoader

from ..settings import check_keys

# What tools/ptq.py reads from a config besides what MMEngine's Runner reads (and what
# mmengine's Config itself consumes: custom_imports).
PTQ_TOP_LEVEL_KEYS = ("ptq", "task", "allow_random_init", "custom_imports")

# Top-level names that are neither read by the Runner nor by tools/ptq.py are a config's own
# variables (data_root, classes, train_pipeline, ...): only near misses of a known key are typos.
TYPO_CUTOFF = 0.8


def runner_keys() -> set[str]:
    """The top-level config keys MMEngine's Runner reads: its parameters, and the keys it takes
    from ``self.cfg`` (``model_wrapper_cfg``, ``sync_bn``, ...), read off its source."""
    params = set(inspect.signature(Runner.__init__).parameters) - {"self", "cfg"}
    read = re.findall(r"self\.cfg\.get\(\s*['\"](\w+)['\"]", inspect.getsource(Runner))
    return params | set(read)


def dataloader_keys() -> set[str]:
    """The keys of a dataloader config: those ``Runner.build_dataloader`` takes out of it
    (read off its source) and the keyword arguments of torch's ``DataLoader``, which gets the
    rest."""
    read = re.findall(
        r"dataloader_cfg\.(?:pop|get)\(\s*['\"](\w+)['\"]",
        inspect.getsource(Runner.build_dataloader),
    )
    return set(read) | (accepted_keywords(DataLoader) or set())


def check_top_level_keys(cfg: dict) -> None:
    """Raise KeyError on a top-level key that is a near miss of a key MMEngine or tools/ptq.py
    reads (``load_form``), naming it."""
    known = runner_keys() | set(PTQ_TOP_LEVEL_KEYS)
    for key in sorted(set(cfg) - known):
        close = difflib.get_close_matches(key, sorted(known), n=1, cutoff=TYPO_CUTOFF)
        if close:
            raise KeyError(
                f"unknown top-level config key {key!r} (did you mean {close[0]!r}?): "
                "it would be ignored; rename it"
            )


def accepted_keywords(cls: type) -> set[str] | None:
    """The keyword arguments ``cls(**kwargs)`` accepts: the named parameters of its
    ``__init__`` and, where that takes ``**kwargs``, those of the next ``__init__`` up the MRO
    (where such classes pass them on). ``None`` where ``**kwargs`` reaches ``object``'s: any
    key may be meant."""
    keys: set[str] = set()
    for klass in cls.__mro__:
        if "__init__" not in vars(klass):
            continue
        if klass is object:
            return None
        params = inspect.signature(klass.__init__).parameters.values()
        keys |= {
            p.name
            for p in params
            if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY) and p.name != "self"
        }
        if not any(p.kind is p.VAR_KEYWORD for p in params):
            return keys
    return None


def check_build_fields(cfg, registry, scope: str | None, where: str) -> None:
    """Raise KeyError on a field of ``cfg`` (a dict with ``type``, as MMEngine builds it) that
    its class does not take, naming the closest one; recurses into the values (a detector's
    backbone, neck and heads). Dicts whose type ``registry`` does not hold (mmcv ops, weight
    initializers) or names a torch layer are not checked: they are built elsewhere."""
    if isinstance(cfg, (list, tuple)):
        for i, item in enumerate(cfg):
            check_build_fields(item, registry, scope, f"{where}[{i}]")
        return
    if not isinstance(cfg, dict):
        return
    kind = cfg.get("type")
    if isinstance(kind, str):
        with registry.switch_scope_and_registry(scope) as scoped:
            kind = scoped.get(kind)
    # torch layers (norm_cfg=dict(type='BN', requires_grad=True), act_cfg, conv_cfg) are built
    # by mmcv's build_*_layer helpers, which take keys of their own
    if inspect.isclass(kind) and not kind.__module__.startswith("torch."):
        known = accepted_keywords(kind)
        if known is not None:
            check_keys({k: v for k, v in cfg.items() if k not in ("type", "_scope_")}, known, where)
    for key, value in cfg.items():
        check_build_fields(value, registry, scope, f"{where}.{key}")


def check_config_keys(cfg, dataset_cfgs: dict[str, dict]) -> None:
    """Check the top-level keys, the model's fields, the test dataloader's keys and sampler,
    and the fields of each dataset config (``{where: dataset_cfg}``, e.g. the evaluation and
    the calibration dataset) and of its pipeline's transforms."""
    check_top_level_keys(cfg)
    scope = cfg.get("default_scope", "mmengine")
    check_build_fields(cfg.model, MODELS, scope, "model")
    loader = cfg.get("test_dataloader") or {}
    check_keys(dict(loader), dataloader_keys(), "test_dataloader")
    check_build_fields(loader.get("sampler"), DATA_SAMPLERS, scope, "test_dataloader.sampler")
    for where, dataset_cfg in dataset_cfgs.items():
        check_build_fields(dataset_cfg, DATASETS, scope, where)
        pipeline = dataset_cfg.get("pipeline") if isinstance(dataset_cfg, dict) else None
        check_build_fields(pipeline, TRANSFORMS, scope, f"{where}.pipeline")
