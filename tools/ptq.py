"""Post-training quantization of an MMEngine model: FP evaluation, quantization, quantized
evaluation, in the shape of mmdet's ``tools/test.py``: the config's test loop becomes
``pfcr.PTQLoop`` and the Runner runs it. Each run writes into its own folder
``<work_dir>/<YYYYmmdd_HHMMSS>/`` (results in ``ptq_results.json``, the quantized model in
``quantized_model.pth``); ``<work_dir>/last_run`` names the last one that finished.
``--resume`` continues a ``block``/``pfcr`` run that stopped, in its own folder, from its last
reconstructed unit (the same command line, plus ``--resume`` or ``--resume RUN_DIR``).

    python tools/ptq.py CONFIG [CHECKPOINT] [--work-dir DIR] [--cfg-options k=v ...]
                        [--no-fp-eval] [--quantized SAVED_QUANTIZED_MODEL] [--eval-images N]
                        [--resume [RUN_DIR]] [--launcher {none,pytorch,slurm,mpi}]
"""

from __future__ import annotations

import argparse
import signal
import sys

from mmengine.config import DictAction

from pfcr_mm.distributed import PeerLost
from pfcr_mm.engine.command import (
    USER_ERRORS,
    Terminated,
    build_ptq_cfg,
    error_line,
    set_threads,
    sigterm_raises,
    start_cpu_process_group,
    stopped_line,
)
from pfcr_mm.engine.run_dir import PTQRunner, run_dir


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("config", help="config file")
    p.add_argument("checkpoint", nargs="?", help="model checkpoint (sets load_from)")
    p.add_argument("--work-dir", help="where results go (default: work_dirs/<config name>)")
    p.add_argument(
        "--cfg-options",
        nargs="+",
        action=DictAction,
        default={},
        help="override config keys, e.g. ptq.quant.w_bits=3",
    )
    p.add_argument("--no-fp-eval", action="store_true", help="skip the FP evaluation")
    p.add_argument(
        "--quantized",
        help="evaluate a quantized model saved by an earlier run instead of calibrating",
    )
    p.add_argument(
        "--eval-images",
        type=int,
        help="COCO: evaluate on the first N images only, against their own annotations",
    )
    p.add_argument(
        "--resume",
        nargs="?",
        const="",
        metavar="RUN_DIR",
        help="continue the last run of the work dir that stopped during reconstruction (or the "
        "run folder RUN_DIR) from its last finished unit; the config must be the run's own",
    )
    p.add_argument(
        "--threads",
        type=int,
        help="intra-op threads per process (default: OMP_NUM_THREADS, else 1: the tensors of the "
        "quantized model depend on it; 1 matches a torchrun launch)",
    )
    p.add_argument("--launcher", choices=["none", "pytorch", "slurm", "mpi"], default="none")
    p.add_argument("--local_rank", "--local-rank", type=int, default=0, help=argparse.SUPPRESS)
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    runner = None
    try:
        with sigterm_raises():
            set_threads(args.threads)
            cfg = build_ptq_cfg(args)
            start_cpu_process_group(cfg)
            runner = PTQRunner.from_cfg(cfg)
            runner.test()
    except USER_ERRORS as err:
        if runner is not None:
            runner.discard_if_refused()
        print(error_line(err), file=sys.stderr)
        return 2
    except Terminated as err:
        print(stopped_line(run_dir(runner) if runner else None, err), file=sys.stderr)
        return 128 + signal.SIGTERM  # what a process killed by SIGTERM returns
    except PeerLost as err:  # another process of a distributed run stopped
        print(stopped_line(run_dir(runner), err), file=sys.stderr)
        return 3
    return 0


if __name__ == "__main__":
    sys.exit(main())
