"""Classification through MMEngine: a timm model wrapper, an ImageNet-layout folder dataset and a
top-k accuracy metric, registered as ``pfcr.TimmClassifier``, ``pfcr.ImageFolderDataset`` and
``pfcr.TopKAccuracy``."""

from __future__ import annotations

import difflib
from collections.abc import Sequence
from pathlib import Path

import timm
import torch
import torch.nn.functional as F
from mmengine.evaluator import BaseMetric
from mmengine.model import BaseModel
from PIL import Image
from torch.utils.data import Dataset
from torchvision import transforms

from .checkpoint import load_weights_strict
from .registry import DATASETS, METRICS, MODELS

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".webp", ".ppm", ".tif", ".tiff"}
INTERPOLATIONS = {
    "bilinear": transforms.InterpolationMode.BILINEAR,
    "bicubic": transforms.InterpolationMode.BICUBIC,
    "nearest": transforms.InterpolationMode.NEAREST,
}
LAYOUT_HINT = (
    "expected an ImageNet-layout folder: <data_root>/train/<class>/<image> and "
    "<data_root>/val/<class>/<image>, one sub-folder per class"
)


@DATASETS.register_module()
class ImageFolderDataset(Dataset):
    """Images in ``<data_root>/<split>/<class>/*``; classes are the sorted sub-folder names.

    Preprocessing (the timm evaluation transform): resize the shorter side to ``resize``, center
    crop ``crop_size``, scale to [0, 1], normalize with ``mean``/``std`` (RGB).
    Items: ``dict(inputs=(3, crop, crop) float tensor, data_samples=dict(gt_label=int))``.
    """

    def __init__(
        self,
        data_root: str,
        split: str = "val",
        resize: int = 256,
        crop_size: int = 224,
        mean: Sequence[float] = (0.485, 0.456, 0.406),
        std: Sequence[float] = (0.229, 0.224, 0.225),
        interpolation: str = "bicubic",
    ):
        root = Path(data_root) / split
        if not root.is_dir():
            raise FileNotFoundError(f"dataset split folder not found: {root}; {LAYOUT_HINT}")
        if interpolation not in INTERPOLATIONS:
            raise ValueError(
                f"interpolation must be one of {sorted(INTERPOLATIONS)}, " f"got {interpolation!r}"
            )
        self.classes = sorted(p.name for p in root.iterdir() if p.is_dir())
        if not self.classes:
            raise ValueError(f"no class sub-folders in {root}; {LAYOUT_HINT}")
        self.samples = [
            (str(f), label)
            for label, c in enumerate(self.classes)
            for f in sorted((root / c).iterdir())
            if f.suffix.lower() in IMAGE_SUFFIXES
        ]
        if not self.samples:
            raise ValueError(
                f"no images ({', '.join(sorted(IMAGE_SUFFIXES))}) under {root}; " f"{LAYOUT_HINT}"
            )
        self.transform = transforms.Compose(
            [
                transforms.Resize(resize, interpolation=INTERPOLATIONS[interpolation]),
                transforms.CenterCrop(crop_size),
                transforms.ToTensor(),
                transforms.Normalize(mean, std),
            ]
        )

    @property
    def metainfo(self) -> dict:
        return {"classes": tuple(self.classes)}

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> dict:
        path, label = self.samples[index]
        try:
            with Image.open(path) as img:
                inputs = self.transform(img.convert("RGB"))
        except OSError as err:  # PIL: not an image, truncated
            raise ValueError(f"cannot read image {path} ({err}): replace or remove it") from None
        return {"inputs": inputs, "data_samples": {"gt_label": label}}


def create_timm_model(arch: str, model_kwargs: dict | None = None) -> torch.nn.Module:
    """``timm.create_model(arch, **model_kwargs)`` without downloading anything."""
    if arch not in timm.list_models():
        close = difflib.get_close_matches(arch, timm.list_models(), n=5)
        raise ValueError(
            f"unknown timm architecture {arch!r}"
            f"{f'; did you mean {close}' if close else ''} (see timm.list_models())"
        )
    try:
        return timm.create_model(arch, pretrained=False, **(model_kwargs or {}))
    except TypeError as err:  # a keyword the architecture does not take
        raise ValueError(f"model.model_kwargs do not fit timm {arch}: {err}") from None


@MODELS.register_module()
class TimmClassifier(BaseModel):
    """A timm classifier (``arch`` with ``model_kwargs``) loaded from ``checkpoint``: the timm
    model's state dict, or a training checkpoint of this wrapper (keys ``net.*``).

    ``forward(inputs, data_samples, mode)``: ``"tensor"`` gives logits, ``"predict"`` a list of
    ``dict(scores, gt_label)``, ``"loss"`` ``dict(loss=cross_entropy)``.
    """

    def __init__(
        self,
        arch: str,
        checkpoint: str | None,
        model_kwargs: dict | None = None,
        data_preprocessor: dict | None = None,
    ):
        super().__init__(data_preprocessor=data_preprocessor)
        self.net = create_timm_model(arch, model_kwargs)
        if checkpoint is not None:
            if not Path(checkpoint).is_file():
                raise FileNotFoundError(
                    f"checkpoint not found: {checkpoint} (the weights of timm {arch}: a state dict "
                    "saved with torch.save, or a .safetensors file; nothing is downloaded)"
                )
            load_weights_strict(self.net, checkpoint, prefix="net.")

    def classifier_head(self) -> torch.nn.Module:
        return self.net.get_classifier()

    def forward(self, inputs: torch.Tensor, data_samples: dict | None = None, mode: str = "tensor"):
        logits = self.net(inputs)
        if mode == "tensor":
            return logits
        if mode == "loss":
            return {"loss": F.cross_entropy(logits, data_samples["gt_label"])}
        if mode == "predict":
            labels = data_samples["gt_label"]
            return [{"scores": s, "gt_label": int(g)} for s, g in zip(logits.detach(), labels)]
        raise ValueError(f"unknown mode {mode!r}")


@METRICS.register_module()
class TopKAccuracy(BaseMetric):
    """Top-k accuracy in percent, reported as ``accuracy/top1``, ``accuracy/top5``, ..."""

    default_prefix = "accuracy"

    def __init__(self, topk: Sequence[int] = (1, 5), **kwargs):
        super().__init__(**kwargs)
        self.topk = tuple(topk)

    def process(self, data_batch, data_samples: Sequence[dict]) -> None:
        for s in data_samples:
            k = min(max(self.topk), s["scores"].numel())
            top = s["scores"].topk(k).indices.tolist()
            self.results.append({f"top{t}": s["gt_label"] in top[:t] for t in self.topk})

    def compute_metrics(self, results: list) -> dict:
        return {
            f"top{t}": 100.0 * sum(r[f"top{t}"] for r in results) / len(results) for t in self.topk
        }
