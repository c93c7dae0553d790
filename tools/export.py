"""Export a saved quantized model to ONNX with QuantizeLinear/DequantizeLinear at every
quantizer point and integer weight codes (:mod:`pfcr_mm.export`): a timm classifier whole
(dynamic batch), an MMDetection detector's backbone and neck at one input size (batch 1; by
default the padded size of the test pipeline's first batch, or --input-size H W), its RPN and
RoI heads staying the PyTorch quantized modules. The report (which post-softmax quantizer each
attention has and how it is written, parity against the PyTorch fake-quant model: logits on the
first test batch for a classifier, box/mask mAP on every test image with the features from
onnxruntime for a detector) goes next to the file as ``<out>.json``.

    python tools/export.py CONFIG --quantized WORK/quantized_model.pth --out FILE.onnx [--int8]
                           [--signed-weights] [--input-size H W] [--work-dir DIR]
                           [--cfg-options k=v ...]

--int8: log post-softmax quantizers become 8-bit uniform ones (calibrated on the run's
calibration images) and every point is written in 8-bit containers, so that onnxruntime runs
every matmul with integer kernels (but a linear after a log post-GELU point, quant.post_gelu,
which stays exact: a float matmul); without it the log quantizers are exact, in elementary
ops, and codes of 4 bits and fewer are stored as uint4.

--signed-weights: the linears' 8-bit weight codes stored as int8 (the same weights; those of
integer convolutions stay uint8, onnxruntime's ConvInteger is slower with int8), so that
onnxruntime multiplies uint8 activations by int8 weights: its fastest kernels on CPUs with
VNNI or AMX (1.7x the default's matmuls on DeiT-S at batch 32). Not for CPUs without VNNI, where
that kernel's 16-bit pair sums can saturate.
"""

from __future__ import annotations

import argparse
import atexit
import shutil
import sys
import tempfile
from pathlib import Path

from mmengine.config import DictAction

from pfcr_mm.engine.command import USER_ERRORS, check_writable_folder, error_line
from pfcr_mm.engine.deploy import build_quantized, export_quantized
from pfcr_mm.engine.run_dir import saved_model_path


def _temporary_folder() -> str:
    """A folder for the Runner's log and config copy, removed when the process ends, so that the
    export writes only its outputs (never into the run folder the quantized model came from).
    Not sooner: MMEngine keeps its visualizer, which saves there, for the whole process."""
    folder = tempfile.mkdtemp(prefix="pfcr_export_")
    atexit.register(shutil.rmtree, folder, ignore_errors=True)
    return folder


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("config", help="the config the model was quantized with")
    p.add_argument(
        "--quantized",
        required=True,
        help="quantized_model.pth of tools/ptq.py, or its work dir (the last run's model)",
    )
    p.add_argument("--out", required=True, help="the ONNX file to write")
    p.add_argument("--int8", action="store_true", help="8-bit uniform post-softmax, 8-bit codes")
    p.add_argument(
        "--signed-weights",
        action="store_true",
        help="int8 weight codes: faster on CPUs with VNNI/AMX, not for CPUs without VNNI",
    )
    p.add_argument(
        "--input-size",
        nargs=2,
        type=int,
        metavar=("H", "W"),
        help="detectors: the exported input size (default: the first test batch's padded size)",
    )
    p.add_argument(
        "--work-dir", help="the Runner's work dir for its log (default: a temporary folder)"
    )
    p.add_argument("--cfg-options", nargs="+", action=DictAction, default={})
    args = p.parse_args(argv)
    try:
        quantized = saved_model_path(args.quantized)
        check_writable_folder(Path(args.out).parent, "--out")
        runner, ptq = build_quantized(
            args.config, quantized, args.work_dir or _temporary_folder(), args.cfg_options
        )
        report = export_quantized(
            runner, ptq, args.out, args.int8, args.input_size, args.signed_weights
        )
    except USER_ERRORS as err:
        print(error_line(err), file=sys.stderr)
        return 2
    parity = report["parity"]
    if "logit_range" in parity:
        check = (
            f"max logit diff {parity['max_abs_logit_diff']:.3g}, top-1 agreement "
            f"{parity['top1_agreement']:.3f}"
        )
    else:
        check = ", ".join(
            f"{k.split('/')[-1]} {parity['pytorch'][k]:.4f} (PyTorch) vs "
            f"{parity['onnxruntime'][k]:.4f} (onnxruntime features)"
            for k in parity["pytorch"]
        )
    print(
        f"wrote {args.out} ({report['bytes'] / 1e6:.2f} MB, {report['quantizer_points']} Q/DQ "
        f"points, {report['integer_weight_layers']} integer-weight layers); onnxruntime vs "
        f"fake-quant on {parity['images']} images: {check}; report "
        f"{Path(args.out).with_suffix('.json')}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
