"""A unit's cached calibration data and the training batches drawn from it."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import NamedTuple

import torch

from ..tree import flat_tensors, map_tensors


class Batch(NamedTuple):
    """One training batch of a unit, on its device: quantized-path input, FP input, FP target,
    the extra arguments after ``x`` and the output weights (``None``: none cached)."""

    q_input: object
    fp_input: object
    target: object
    args: tuple
    weights: object = None


class UnitCaches:
    """A unit's cached batches: per calibration batch, its quantized-path input (the output of
    the already-quantized preceding units), FP input, FP target, extra arguments (mmdet Swin
    ``(hw_shape,)``; ``None``: none) and, optionally, the output weights of the output-aware
    term (shaped like the target). Each entry is a ``(B_i, ...)`` tensor or a tuple of them
    nested alike (a detector part's maps); any dtype and device: drawn batches are float32 on
    the unit's device.

    When all cached batches have the same per-sample shapes and the same extra arguments (a
    classifier at one resolution), samples are drawn from the pooled cache, as BRECQ/QDrop do;
    otherwise (detection images of different sizes) one cached batch is drawn, then
    ``batch_size`` rows within it. Extra arguments are shared by a whole batch, never per sample.
    """

    def __init__(
        self,
        q_inputs: Sequence,
        fp_inputs: Sequence,
        fp_targets: Sequence,
        extra_args: Sequence[tuple] | None = None,
        output_weights: Sequence | None = None,
    ):
        extra_args = [()] * len(fp_inputs) if extra_args is None else list(extra_args)
        _check_entries(q_inputs, fp_inputs, fp_targets, extra_args)
        self.q, self.x, self.y, self.args = q_inputs, fp_inputs, fp_targets, extra_args
        self.weights = output_weights
        # the columns drawn with the same rows: the weights go with their targets
        self.columns = [self.q, self.x, self.y] + (
            [] if output_weights is None else [output_weights]
        )
        self.sizes = [flat_tensors(x)[0].shape[0] for x in fp_inputs]
        self.offsets = torch.tensor([0] + self.sizes).cumsum(0)

        def sample_shapes(i: int) -> list:
            return [t.shape[1:] for t in flat_tensors(fp_inputs[i]) + flat_tensors(fp_targets[i])]

        self.pooled = all(
            sample_shapes(i) == sample_shapes(0) and _args_equal(extra_args[i], extra_args[0])
            for i in range(len(fp_inputs))
        )

    def __len__(self) -> int:
        return len(self.sizes)

    def probe(self, device: torch.device) -> tuple:
        """``(x, args)``: the first sample's quantized-path input, to trace the unit's calls."""
        return map_tensors(lambda t: t[:1].to(device, torch.float32), self.q[0]), tuple(
            self.args[0]
        )

    def draw(self, generator: torch.Generator, batch_size: int, device: torch.device) -> Batch:
        """One training batch of at most ``batch_size`` rows, drawn with ``generator``."""
        if self.pooled:
            total = int(self.offsets[-1])
            idx = torch.randperm(total, generator=generator)[:batch_size].sort().values
            which = torch.searchsorted(self.offsets, idx, right=True) - 1
            parts = []
            for b in which.unique().tolist():
                rows = idx[which == b] - self.offsets[b]
                parts.append([_rows(c[b], rows, device) for c in self.columns])
            joined = (map_tensors(lambda *ts: torch.cat(ts), *p) for p in zip(*parts))
            return self._batch(list(joined), self.args[0])
        b = int(torch.randint(len(self.sizes), (1,), generator=generator))
        if self.sizes[b] > batch_size:
            rows = torch.randperm(self.sizes[b], generator=generator)[:batch_size]
            return self._batch([_rows(c[b], rows, device) for c in self.columns], self.args[b])
        return self._batch([_move(c[b], device) for c in self.columns], self.args[b])

    def first(self, n: int, device: torch.device) -> Iterator[Batch]:
        """The first ``n`` cached batches whole (fewer if there are fewer)."""
        for b in range(min(n, len(self))):
            yield self._batch([_move(c[b], device) for c in self.columns], self.args[b])

    @staticmethod
    def _batch(columns: list, args: tuple) -> Batch:
        return Batch(*columns[:3], args, columns[3] if len(columns) > 3 else None)


def _move(entry, device: torch.device):
    return map_tensors(lambda u: u.to(device, torch.float32, non_blocking=True), entry)


def _rows(entry, rows: torch.Tensor, device: torch.device):
    return _move(map_tensors(lambda u: u.index_select(0, rows), entry), device)


def _check_entries(q_inputs, fp_inputs, fp_targets, extra_args) -> None:
    n = len(fp_inputs)
    if not (n and len(q_inputs) == n and len(fp_targets) == n and len(extra_args) == n):
        raise ValueError(
            "q_inputs, fp_inputs, fp_targets and extra_args must be non-empty lists of the "
            f"same length, got {len(q_inputs)}, {n}, {len(fp_targets)}, {len(extra_args)}"
        )
    for i, (q, x, y) in enumerate(zip(q_inputs, fp_inputs, fp_targets)):
        q_shapes = [t.shape for t in flat_tensors(q)]
        x_shapes = [t.shape for t in flat_tensors(x)]
        rows = {t.shape[0] for t in flat_tensors(x) + flat_tensors(y)}
        if q_shapes != x_shapes or len(rows) != 1:
            raise ValueError(
                f"cached batch {i}: quantized input {q_shapes}, FP input {x_shapes} and "
                f"target {[t.shape for t in flat_tensors(y)]} do not match"
            )


def _args_equal(a: tuple, b: tuple) -> bool:
    if len(a) != len(b):
        return False
    for u, v in zip(a, b):
        if isinstance(u, torch.Tensor) or isinstance(v, torch.Tensor):
            if not (
                isinstance(u, torch.Tensor) and isinstance(v, torch.Tensor) and torch.equal(u, v)
            ):
                return False
        elif u != v:
            return False
    return True
