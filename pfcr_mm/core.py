"""The whole method as one call, pure torch: ``pfcr_mm.quantize(model, config, calib_data)``.

::

    import pfcr_mm, timm
    model = timm.create_model("deit_tiny_patch16_224", pretrained=False).eval()
    config = pfcr_mm.PTQConfig(method="pfcr", quant=pfcr_mm.QuantConfig(w_bits=4, a_bits=4),
                               recon=pfcr_mm.ReconSettings(iters=300))
    result = pfcr_mm.quantize(model, config, calib_batches)   # a list of (B, 3, H, W) tensors

:func:`quantize` runs the method's five stages (``docs/method.md``): prepare the model
(quantized modules in place), calibrate every range on ``calib_data``, re-parameterize the
post-LayerNorm activations (:func:`pfcr_mm.adapters.prepare_calibrated` does these three),
reconstruct as the plan says (``calib``: nothing; ``block``: every transformer block once;
``pfcr``: fine to coarse; the layers outside the blocks as ``recon.non_block`` says:
:mod:`pfcr_mm.recon.plan`), and harden the learned rounding. Everything that decides the method
is here or below; the MMEngine layer only turns a Runner's model and data into ``calib_data``
and ``run_batch`` (:mod:`pfcr_mm.engine.runner_io`).

The batch functions: ``run_batch(model, batch)`` runs the model on one batch, reaching every
quantized layer (default ``model(batch)``), for calibration; ``recon_batch`` (default
``run_batch``) runs it up to each unit to capture the unit's inputs, and layers outside the
blocks it does not reach stay calibrated only (a detector's heads see the FP model's RoIs: the
adapters pin them, ``QuantPlan.pinned``); ``downstream(model, batch)`` gives the outputs by which
close post-softmax choices are made and at which the detection-aware term measures a unit's
error (a detector's FPN outputs; default: the outputs of ``run_batch`` / ``recon_batch``, which
must then be float tensors).

Under ``torch.distributed`` (an initialized default group of W processes), each process passes
its share of the calibration batches: batches ``rank, rank + W, ...`` of the whole list.
Calibration runs data-parallel and pools the range statistics, so every process gets the
quantizers one process would get on the whole list. Reconstruction runs on rank 0 on all the
batches and the result is broadcast (:func:`pfcr_mm.distributed.on_rank0_with_all_batches`): a
unit's optimizer steps are sequential and small, and splitting each step over processes would
change the optimization. Meanwhile every process counts up a heartbeat in the group's store: one
that stops (no heartbeat for the group's timeout, or its connection closed) raises
:class:`~pfcr_mm.distributed.PeerLost` in the others.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from torch import nn

from .adapters import QuantPlan, prepare_calibrated
from .distributed import on_rank0_with_all_batches
from .quant.calibrate import DownstreamOutputs, load_quantizer_state, quantizer_state
from .recon import (
    ChainDataSource,
    ReconPlan,
    UnitRecord,
    build_plan,
    default_listeners,
    run_plan,
)
from .recon.compensate import correct_biases, gptq_weights
from .recon.data import default_run_batch
from .recon.listeners import LOG_NAME
from .recon.unit import eval_mode
from .settings import PTQConfig


@dataclass
class QuantResult:
    """What :func:`quantize` did.

    plan: the quantized structure (units, quantized modules, what stays in floating point).
    records: one :class:`~pfcr_mm.recon.UnitRecord` per reconstructed unit (empty for calib).
    recon: the summary of the reconstruction for the results file (empty for ``calib``):
        settings, levels run, units, iterations, block-passes, where the time went (calibration,
        caches, optimizer steps), and which layers outside the blocks were reconstructed or only
        calibrated.
    """

    plan: QuantPlan
    records: list[UnitRecord] = field(default_factory=list)
    recon: dict = field(default_factory=dict)


@dataclass
class ResumeState:
    """A reconstruction after its first ``len(records)`` units: enough to continue it exactly.

    records: the records of the finished units.
    quantizers: every quantizer's state (``pfcr_mm.quant.calibrate.quantizer_state``: the
        AdaRound variables and rounding modes, step sizes, zero points and flags).

    Nothing else is needed: the seeds of a unit are its own (``recon.unit.unit_seed``), and
    a unit's caches are recomputed from the model and the calibration batches.
    ``to_dict()`` holds tensors and plain values only (``torch.load(weights_only=True)``).
    """

    records: list[UnitRecord]
    quantizers: dict[str, dict]

    def to_dict(self) -> dict:
        return {"records": [asdict(r) for r in self.records], "quantizers": self.quantizers}

    @classmethod
    def from_dict(cls, d: dict) -> ResumeState:
        return cls([UnitRecord(**r) for r in d["records"]], d["quantizers"])


def quantize(
    model: nn.Module,
    config: PTQConfig | dict,
    calib_data: Iterable[Any],
    run_batch: Callable[[nn.Module, Any], Any] | None = None,
    *,
    recon_batch: Callable[[nn.Module, Any], Any] | None = None,
    downstream: Callable[[nn.Module, Any], Any] | None = None,
    head: nn.Module | None = None,
    log_dir: str | Path | None = None,
    print_fn: Callable[[str], None] = print,
    resume: ResumeState | None = None,
    on_unit_done: Callable[[ResumeState], None] | None = None,
) -> QuantResult:
    """Quantize ``model`` in place: prepare, calibrate, re-parameterize, reconstruct, harden.

    config: a :class:`PTQConfig` or its dict (``calib`` and ``eval_fp`` are the engine's).
    calib_data: the calibration batches, re-iterable in a fixed order (a list, or a loader
        without shuffling); a reconstruction run keeps them in memory.
    run_batch / recon_batch / downstream: see the module docstring.
    head: a classification head, quantized with ``config.quant.head_bits`` if set (as a
        detector's prediction layers are, found by the adapters).
    log_dir: where ``recon_log.json`` and ``recon_loss.png`` go (``None``: nowhere).
    resume: continue a reconstruction that stopped (same config, model and batches): its
        quantizer state is loaded after calibration and its finished units are skipped.
    on_unit_done: called after each reconstructed unit with the :class:`ResumeState` so far
        (its tensors are the model's own: save them before returning).

    Raises ``ValueError`` on settings that do not fit the model before anything is changed,
    ``RuntimeError`` naming the quantizers that calibration did not reach, and, distributed,
    :class:`~pfcr_mm.distributed.PeerLost` when another process stops during the
    reconstruction.
    """
    config = PTQConfig.from_dict(config)
    run_batch = run_batch or default_run_batch
    start = time.perf_counter()
    # prepare, calibrate, re-parameterize
    calibration = DownstreamOutputs(calib_data, downstream or run_batch, print_fn)
    forward_loop = _calibration_loop(calib_data, run_batch, print_fn)
    plan = prepare_calibrated(
        model, config.quant, forward_loop, config.scope_modules, head, calibration
    )
    calibration_seconds = time.perf_counter() - start
    if config.method == "calib":
        return _calibrated(model, plan, config, calib_data, run_batch, print_fn)
    # reconstruct and harden, on rank 0 with every calibration batch
    run = _Reconstruction(
        model, plan, config, recon_batch or run_batch, downstream, log_dir, print_fn
    )
    records, summary = on_rank0_with_all_batches(
        model, list(calib_data), lambda batches: run(batches, resume, on_unit_done),
        "reconstruction on rank 0",
    )  # fmt: skip
    return QuantResult(plan, records, {**summary, "calibration_seconds": calibration_seconds})


def _calibrated(model, plan, config, calib_data, run_batch, print_fn) -> QuantResult:
    """The result of ``calib``, after the compensation of ``recon.compensate`` if any (on
    rank 0 with every calibration batch)."""
    how = config.recon.compensate
    if how == "none":
        return QuantResult(plan)

    def correct(batches: list) -> dict:
        return compensate(model, plan, how, batches, run_batch, print_fn)

    report = on_rank0_with_all_batches(model, list(calib_data), correct, f"{how} on rank 0")
    return QuantResult(plan, recon={"compensation": report})


def compensate(
    model: nn.Module, plan: QuantPlan, how: str, batches: list, run_batch, print_fn
) -> dict:
    """The closed-form step ``how`` of ``ptq.recon.compensate`` over ``batches``, in eval mode:
    ``gptq`` rounds the weights, ``bias`` corrects the biases (the pinned modules, RoI heads,
    left out); its report."""
    with eval_mode(model):
        if how == "gptq":
            report = gptq_weights(model, batches, run_batch, print_fn)
        else:
            report = correct_biases(model, batches, run_batch, [m for m, _ in plan.pinned])
    print_fn(f"compensation: {report}")
    return report


def _calibration_loop(calib_data, run_batch, print_fn) -> Callable[[nn.Module], None]:
    def forward_loop(m: nn.Module) -> None:
        total = len(calib_data) if hasattr(calib_data, "__len__") else "?"
        for i, batch in enumerate(calib_data):
            run_batch(m, batch)
            print_fn(f"calibration: batch {i + 1}/{total}")

    return forward_loop


@dataclass
class _Reconstruction:
    """A ``block`` or ``pfcr`` run on the calibrated model."""

    model: nn.Module
    plan: QuantPlan
    config: PTQConfig
    run_batch: Callable[[nn.Module, Any], Any]
    downstream: Callable[[nn.Module, Any], Any] | None
    log_dir: str | Path | None
    print_fn: Callable[[str], None]

    def __call__(
        self, batches: list, resume: ResumeState | None, on_unit_done: Callable | None
    ) -> tuple[list[UnitRecord], dict]:
        """The records and the summary of the run on ``batches``."""
        recon = self.config.recon
        # the reconstruction starts from GPTQ's rounding; the bias correction comes after it
        report = self._compensate(batches) if recon.compensate == "gptq" else None
        steps = build_plan(
            self.model, self.plan, self.config.method, recon, self.run_batch, batches[0]
        )
        source = ChainDataSource(
            self.model,
            self.plan.units,
            batches,
            run_batch=self.run_batch,
            cache_dtype=recon.cache_dtype,
            pinned=self.plan.pinned,
            downstream=self.downstream or self.run_batch,
            cache_limit_gb=recon.cache.limit_gb,
            cache_dir=recon.cache.dir or self.log_dir,
        )
        if resume is not None:
            load_quantizer_state(self.model, resume.quantizers)

        def checkpoint(records: list[UnitRecord]) -> None:
            on_unit_done(ResumeState(list(records), quantizer_state(self.model)))

        listeners = default_listeners(
            source, self.log_dir, self.print_fn, checkpoint if on_unit_done else None
        )
        try:
            records = run_plan(steps, source, listeners, resume.records if resume else ())
        finally:
            source.close()  # the caches the source still holds, and the spill folder
        summary = self._summary(steps, records, source)
        if recon.compensate == "bias":
            report = self._compensate(batches)
        if report is not None:
            summary["compensation"] = report
        return records, summary

    def _compensate(self, batches: list) -> dict:
        how = self.config.recon.compensate
        return compensate(self.model, self.plan, how, batches, self.run_batch, self.print_fn)

    def _summary(self, steps: ReconPlan, records: list[UnitRecord], source) -> dict:
        recon = self.config.recon
        summary = {
            "settings": recon.to_dict(),
            "max_level": recon.max_level,
            "levels_run": sorted({r.level for r in records if r.level >= 0}),
            "units": len(records),
            "iterations": sum(r.iters for r in records),
            "block_passes": sum(r.block_passes for r in records),
            "seconds": sum(r.seconds for r in records),
            "cache_seconds": sum(r.cache_seconds for r in records),
            # the most bytes of unit caches in memory and on disk at once (cache.limit_gb)
            "cache": source.cache.stats(),
            "non_block": recon.non_block,
            # every quantized layer outside the blocks is in one of these two
            "layer_units": steps.layer_units,
            "calib_only_layers": steps.calib_only,
        }
        if self.log_dir is not None:
            summary["log"] = str(Path(self.log_dir) / LOG_NAME)
        return summary
