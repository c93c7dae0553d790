"""Runs a command and records which functions of mmcv's compiled ops extension (`mmcv._ext`) it
calls.

The list `tools/mmcv/ops.txt`, from which `tools/setup.sh` builds mmcv's ops, was made this way
(the commands are in its header). Every Python process the command starts is recorded, through
a `sitecustomize` module put first on PYTHONPATH: it hands mmcv's extension loader a proxy that
writes a function's name to a log the first time the process calls it.

    python tools/mmcv/record_ops.py --out tools/mmcv/ops.txt -- .venv/bin/python -m pytest -q
    python tools/mmcv/record_ops.py --out tools/mmcv/ops.txt --add -- .venv/bin/python tools/demo.py

The command's own exit status is returned; the list is written only when it succeeds. Record
with every op built (`PFCR_MMCV_FULL=1 bash tools/setup.sh`): under the trimmed build a call to
an op that is not built fails the command (the names it called are printed).
"""

from __future__ import annotations

import argparse
import os
import shlex
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # run as a script, as setup.sh does

from prepare_source import read_ops  # noqa: E402

LOG_ENV = "PFCR_MMCV_OPS_LOG"

# Imported by every Python process started under the recorder. It replaces importlib.import_module
# for the one name mmcv's ext_loader asks for, so nothing heavy is imported before mmcv itself.
SITECUSTOMIZE = """
import importlib
import os

_log = os.environ.get("{env}")
if _log:
    _import_module = importlib.import_module

    class _Recorder:
        def __init__(self, module):
            self._module = module
            self._seen = set()

        def __setattr__(self, name, value):  # the loader's stand-ins for ops not built
            if name.startswith("_"):
                object.__setattr__(self, name, value)
            else:
                setattr(self._module, name, value)

        def __getattr__(self, name):
            target = getattr(self._module, name)
            if not callable(target):
                return target

            def call(*args, **kwargs):
                if name not in self._seen:
                    self._seen.add(name)
                    with open(_log, "a") as f:
                        f.write(name + "\\n")
                return target(*args, **kwargs)

            return call

    def _import_recording(name, package=None):
        module = _import_module(name, package)
        return _Recorder(module) if name == "mmcv._ext" else module

    importlib.import_module = _import_recording
"""


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", required=True, type=Path, help="the list to write (one name per line)")
    p.add_argument("--add", action="store_true", help="keep the names already in --out")
    p.add_argument("command", nargs=argparse.REMAINDER, help="-- then the command to run")
    args = p.parse_args(argv)
    if args.command[:1] == ["--"]:
        args.command = args.command[1:]
    if not args.command:
        p.error("give the command to record after --")
    return args


def main(argv: list[str]) -> int:
    args = parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / "sitecustomize.py").write_text(SITECUSTOMIZE.format(env=LOG_ENV))
        log = Path(tmp) / "calls.log"
        log.touch()
        env = dict(os.environ, **{LOG_ENV: str(log)})
        env["PYTHONPATH"] = os.pathsep.join(p for p in (tmp, env.get("PYTHONPATH")) if p)
        rc = subprocess.run(args.command, env=env).returncode
        called = read_ops(log)
    if rc != 0:
        print(
            f"record_ops: the command failed (exit {rc}); {args.out} left as it was; it called: "
            f"{' '.join(sorted(called)) or 'nothing'}",
            file=sys.stderr,
        )
        return rc
    names = called | (read_ops(args.out) if args.add and args.out.exists() else set())
    old = args.out.read_text().splitlines() if args.add and args.out.exists() else []
    command = "#   " + shlex.join(args.command).replace("\n", "; ")
    commands = [line for line in old if line.startswith("#   ")] + [command]
    header = [
        "# The functions of mmcv's compiled ops extension that these commands call, recorded by",
        "# tools/mmcv/record_ops.py; tools/setup.sh builds mmcv's ops from this list:",
        *commands,
    ]
    args.out.write_text("\n".join(header + sorted(names)) + "\n")
    listed = " ".join(sorted(names))
    print(f"record_ops: {len(called)} functions called, {len(names)} in {args.out}: {listed}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
