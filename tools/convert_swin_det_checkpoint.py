"""Convert a Swin-Transformer-Object-Detection (mmdet 2.x) detector checkpoint to mmdet 3.x keys.

    python tools/convert_swin_det_checkpoint.py SRC DST --config CONFIG [--force]

The result is checked against the detector that CONFIG builds: if any key or shape differs,
nothing is written and the differences are listed.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
from mmdet.registry import MODELS  # noqa: E402
from mmdet.utils import register_all_modules  # noqa: E402
from mmengine.config import Config  # noqa: E402

from pfcr_mm.engine.checkpoint import load_checkpoint_file, state_dict_of  # noqa: E402
from pfcr_mm.engine.swin_checkpoint import (  # noqa: E402
    convert_swin_detector_state,
    state_mismatch,
)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("src", help="Swin-Transformer-Object-Detection checkpoint")
    p.add_argument("dst", help="output checkpoint (mmdet 3.x keys)")
    p.add_argument("--config", required=True, help="the mmdet 3.x config the result must fit")
    p.add_argument("--force", action="store_true", help="overwrite an existing DST")
    args = p.parse_args(argv)
    dst = Path(args.dst)
    try:
        if dst.exists() and not args.force:
            raise FileExistsError(f"{dst} exists; pass --force to overwrite it")
        state = convert_swin_detector_state(state_dict_of(load_checkpoint_file(args.src)))
        register_all_modules()
        cfg = Config.fromfile(args.config)
        problems = state_mismatch(state, MODELS.build(cfg.model))
        if problems:
            shown = "\n  ".join(problems[:30])
            more = f"\n  ... {len(problems) - 30} more" if len(problems) > 30 else ""
            raise KeyError(
                f"the converted checkpoint does not fit {args.config}; nothing written:\n  "
                f"{shown}{more}"
            )
    except (FileNotFoundError, FileExistsError, KeyError) as err:
        message = err.args[0] if isinstance(err, KeyError) and err.args else err
        print(f"error: {message}", file=sys.stderr)
        return 2
    dst.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"state_dict": state, "meta": {"converted_from": Path(args.src).name}}, dst)
    print(f"wrote {dst} ({len(state)} tensors)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
