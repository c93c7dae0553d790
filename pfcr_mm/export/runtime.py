"""Running an exported model in onnxruntime (CPU), and seeing which kernels it runs.

onnxruntime rewrites a Q/DQ graph at session creation: ``DequantizeLinear -> MatMul`` becomes
``MatMulIntegerToFloat`` (uint8 x uint8 -> int32 accumulation, then one float scale),
``DequantizeLinear -> MatMul -> QuantizeLinear`` becomes ``QLinearMatMul``, and so on. The node
types of the optimized graph (:func:`optimized_op_counts`) show what ran as integers, and its
profile (:func:`op_time_shares`) what each kind of kernel costs.
"""

from __future__ import annotations

import json
import tempfile
from collections import Counter
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import torch

# onnxruntime graph rewrites left off: with static shapes (a detector exported at one input
# size) MatMulAddFusion turns every linear's ``MatMul`` + bias ``Add`` into a float ``Gemm``
# before the Q/DQ fusions run, so ``DequantizeLinear -> MatMul`` never becomes the integer
# ``MatMulIntegerToFloat`` (measured on the demo detector: 26 float Gemm instead of 26 integer
# matmuls). With a dynamic batch the fusion does not apply anyway. ClipQuantRewrite (drop a
# Clip before a QuantizeLinear whose range it contains) fails the session's creation on a uint4
# zero point ("Unexpected data type for QuantizeLinear input y_zero_point of 21", onnxruntime
# 1.32), and every point of a 3-bit model has one: its codes are clipped to 0..7 before the
# 4-bit container's QuantizeLinear.
DISABLED_OPTIMIZERS = ["MatMulAddFusion", "ClipQuantRewrite"]
# A linear whose input is a log point (post_gelu) takes a float input, so onnxruntime turns its
# 4-bit ``DequantizeLinear -> MatMul`` into ``MatMulNBits``, which by default (accuracy level 4)
# re-quantizes that input to 8 bits per block: the demo-sized test ViT's logits moved by a third
# of their range. Level 1 computes it in float32, as the graph says; no other node changes.
SESSION_CONFIG = {"session.qdq_matmulnbits_accuracy_level": "1"}

# onnxruntime kernels that multiply integer codes (int32 accumulation)
INTEGER_KERNELS = (
    "MatMulIntegerToFloat",
    "QLinearMatMul",
    "MatMulInteger",
    "QGemm",
    "QLinearConv",
    "ConvInteger",
    "DynamicQuantizeMatMul",
    "QAttention",
)


def session_options(
    threads: int = 1, optimized_path: str | Path | None = None
) -> ort.SessionOptions:
    """CPU session options: ``threads`` intra-op threads, one inter-op thread (sequential
    execution), every graph optimization, :data:`SESSION_CONFIG`; the optimized graph is written to
    ``optimized_path`` if given."""
    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    so.log_severity_level = 3  # no warning about the hardware-specific optimized file
    for key, value in SESSION_CONFIG.items():
        so.add_session_config_entry(key, value)
    if optimized_path is not None:
        so.optimized_model_filepath = str(optimized_path)
    return so


def describe_options(so: ort.SessionOptions) -> dict:
    """The session options that decide speed, for a results file."""
    return {
        "intra_op_num_threads": so.intra_op_num_threads,
        "inter_op_num_threads": so.inter_op_num_threads,
        "execution_mode": str(so.execution_mode),
        "graph_optimization_level": str(so.graph_optimization_level),
        "providers": ["CPUExecutionProvider"],
        "disabled_optimizers": DISABLED_OPTIMIZERS,
        "session_config": SESSION_CONFIG,
        "onnxruntime": ort.__version__,
    }


def cpu_session(
    path: str | Path, threads: int = 1, optimized_path: str | Path | None = None
) -> ort.InferenceSession:
    """An onnxruntime CPU session of :func:`session_options` without
    :data:`DISABLED_OPTIMIZERS`."""
    return ort.InferenceSession(
        str(path),
        session_options(threads, optimized_path),
        providers=["CPUExecutionProvider"],
        disabled_optimizers=DISABLED_OPTIMIZERS,
    )


def run_outputs(session: ort.InferenceSession, x: torch.Tensor | np.ndarray) -> list[torch.Tensor]:
    """Every output of the model, in the graph's order, for the batch ``x`` (its single
    input)."""
    x = x.detach().cpu().numpy() if isinstance(x, torch.Tensor) else x
    outs = session.run(None, {session.get_inputs()[0].name: x.astype(np.float32)})
    return [torch.from_numpy(out) for out in outs]


def run_session(session: ort.InferenceSession, x: torch.Tensor | np.ndarray) -> torch.Tensor:
    """The model's single output for the batch ``x`` (its single input)."""
    (out,) = run_outputs(session, x)
    return out


def optimized_op_counts(path: str | Path, threads: int = 1) -> dict[str, int]:
    """Node types of the graph onnxruntime runs for ``path`` (after its optimizations), with
    their counts."""
    with tempfile.TemporaryDirectory() as tmp:
        optimized = Path(tmp) / "optimized.onnx"
        cpu_session(path, threads, optimized)
        counts = Counter(n.op_type for n in onnx.load(str(optimized)).graph.node)
    return dict(sorted(counts.items()))


def op_time_shares(
    path: str | Path, x: torch.Tensor | np.ndarray, threads: int = 1, runs: int = 3
) -> dict[str, float]:
    """Where onnxruntime's time goes for the export ``path`` on the batch ``x``: the share (%)
    of the kernels' time per operator type (of the optimized graph), over ``runs`` runs after
    a warm-up one, largest first. From onnxruntime's profile (:func:`session_options` with
    ``threads`` threads)."""
    so = session_options(threads)
    with tempfile.TemporaryDirectory() as tmp:
        so.enable_profiling = True
        so.profile_file_prefix = str(Path(tmp) / "profile")
        session = ort.InferenceSession(
            str(path),
            so,
            providers=["CPUExecutionProvider"],
            disabled_optimizers=DISABLED_OPTIMIZERS,
        )
        for _ in range(runs + 1):
            run_outputs(session, x)
        events = json.loads(Path(session.end_profiling()).read_text())
    after_warm_up = sorted(e["ts"] for e in events if e.get("name") == "model_run")[1]
    by_op: Counter[str] = Counter()
    for e in events:
        if (
            e.get("cat") == "Node"
            and e["name"].endswith("_kernel_time")
            and e["ts"] >= after_warm_up
        ):
            by_op[e["args"]["op_name"]] += e["dur"]
    total = sum(by_op.values())
    return {op: 100 * t / total for op, t in by_op.most_common()}


def integer_kernel_counts(op_counts: dict[str, int]) -> dict[str, int]:
    """The integer kernels among ``op_counts``."""
    return {op: n for op, n in op_counts.items() if op in INTEGER_KERNELS}


def pad_images(images: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """``images`` ``(B, C, h, w)`` zero-padded at the bottom and right to ``size`` ``(H, W)``
    (where MMDetection's data preprocessor pads a batch, with its zero ``pad_value``).

    Raises ValueError for an image larger than ``size``."""
    h, w = images.shape[-2:]
    if h > size[0] or w > size[1]:
        raise ValueError(
            f"a {h}x{w} input does not fit the exported input size {size[0]}x{size[1]}: "
            "export at a larger size (tools/export.py --input-size H W)"
        )
    return torch.nn.functional.pad(images, (0, size[1] - w, 0, size[0] - h))


class FixedSizeRunner:
    """A graph exported at one input shape ``(1, C, H, W)``, run on a batch of images of at
    most ``H x W``: each image padded by :func:`pad_images` and run alone; returns each
    output of the graph with the images stacked along the batch dimension."""

    def __init__(self, session: ort.InferenceSession):
        shape = session.get_inputs()[0].shape
        if len(shape) != 4 or shape[0] != 1 or not all(isinstance(d, int) for d in shape):
            raise ValueError(f"not a graph of one fixed-size image (input shape {shape})")
        self.session, self.size = session, (shape[2], shape[3])

    def __call__(self, images: torch.Tensor) -> tuple[torch.Tensor, ...]:
        padded = pad_images(images, self.size)
        per_image = [run_outputs(self.session, padded[i : i + 1]) for i in range(len(padded))]
        return tuple(torch.cat(level) for level in zip(*per_image))
