"""A Runner's model and data as :func:`pfcr_mm.quantize` takes them (``calib_data``,
``run_batch``, ``downstream``), and the output error of the quantized model against its FP self."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from mmengine.model import is_model_wrapper
from torch.utils.data import DataLoader

from ..quant.calibrate import quantizer_states


class PreprocessedBatches:
    """The batches of ``loader`` through the model's data preprocessor (test mode), re-iterable
    in the loader's fixed order: the ``calib_data`` of :func:`pfcr_mm.quantize`."""

    def __init__(self, loader: DataLoader, model: torch.nn.Module):
        self.loader, self.model = loader, model

    def __len__(self) -> int:
        return len(self.loader)

    def __iter__(self):
        for batch in self.loader:
            yield self.model.data_preprocessor(batch, False)


def run_batch(model: torch.nn.Module, data: dict):
    """The whole forward of an MMEngine model on a preprocessed batch (calibration)."""
    return model(**data, mode="tensor")


def features(model: torch.nn.Module, data: dict):
    """The outputs :func:`output_error` compares and the detection-aware objective weights a
    block's error by (``recon.downstream_weight``): a detector's features (backbone and neck;
    its heads' outputs depend on proposals, which differ between the FP and the quantized
    model), a classifier's logits."""
    feats = getattr(model, "extract_feat", None)
    return feats(data["inputs"]) if feats else model(data["inputs"], mode="tensor")


def output_error(model: torch.nn.Module, loader: DataLoader, max_images: int = 32) -> dict:
    """How far the quantized model's outputs are from the FP model's, on the first
    ``max_images`` images (in whole batches) of ``loader``'s dataset in order (evaluation
    images, or the held-out calibration images of :func:`heldout_loader`; every process of a
    distributed run computes the same). Outputs: a detector's features (``extract_feat``:
    backbone and neck), a classifier's logits. Returns ``sum ||q - fp||^2 / sum ||fp||^2`` over
    all of them; for logits also the mean ``KL(softmax(fp) || softmax(q))`` per image and the
    share of images whose top-1 class is the FP model's."""
    in_order = DataLoader(
        loader.dataset, batch_size=loader.batch_size, shuffle=False, collate_fn=loader.collate_fn
    )
    err = ref = kl = agree = 0.0
    seen = 0
    with torch.no_grad():
        for data in PreprocessedBatches(in_order, model):
            with quantizer_states(model, weights=False, activations=False):
                fp = features(model, data)
            q = features(model, data)
            if isinstance(fp, torch.Tensor):
                kl += float(F.kl_div(q.log_softmax(-1), fp.log_softmax(-1), log_target=True,
                                     reduction="sum"))  # fmt: skip
                agree += float((q.argmax(-1) == fp.argmax(-1)).sum())
            fp, q = (fp, q) if isinstance(fp, (tuple, list)) else ((fp,), (q,))
            err += sum(float((a - b).pow(2).sum()) for a, b in zip(q, fp))
            ref += sum(float(b.pow(2).sum()) for b in fp)
            seen += len(data["inputs"])
            if seen >= max_images:
                break
    if hasattr(model, "extract_feat"):
        return {"outputs": "backbone and neck features", "images": seen,
                "relative_mse": err / max(ref, 1e-30)}  # fmt: skip
    return {"outputs": "logits", "images": seen, "relative_mse": err / max(ref, 1e-30),
            "kl": kl / max(seen, 1), "top1_agreement": agree / max(seen, 1)}  # fmt: skip


def unwrap_model(model: torch.nn.Module) -> torch.nn.Module:
    """The model inside an MMEngine wrapper (DDP and the like), or the model itself."""
    return model.module if is_model_wrapper(model) else model


def model_and_head(runner):
    model = unwrap_model(runner.model)
    # a classifier names its head, so QuantConfig.head_bits can apply to it
    head = model.classifier_head() if hasattr(model, "classifier_head") else None
    return model, head
