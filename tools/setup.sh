#!/usr/bin/env bash
# Sets up pfcr_mm in a virtual environment (.venv in the project root, or $PFCR_VENV).
#
# mmcv 2.1.0 (the newest mmcv that mmdet 3.3.0 accepts) exists only as a source distribution and
# does not build against current PyTorch as shipped: its setup.py forces -std=c++17 while the
# torch 2.14 headers need C++20, and it imports pkg_resources, which the newest setuptools
# dropped (80.9 still ships it and satisfies torch's own setuptools>=77 requirement).
# This script builds it with those two things fixed (tools/mmcv/prepare_source.py), with CUDA ops
# when CUDA is available and CPU ops otherwise, only the ops that the detectors here call (listed
# in tools/mmcv/ops.txt; PFCR_MMCV_FULL=1 builds every op), and caches the wheel
# ($PFCR_WHEEL_CACHE, default ~/.cache/pfcr_mm/wheels) so a second set-up installs it in seconds.
# Safe to re-run: finished steps are skipped.
set -euo pipefail

root=$(cd "$(dirname "$0")/.." && pwd)
venv=${PFCR_VENV:-$root/.venv}
cache=${PFCR_WHEEL_CACHE:-$HOME/.cache/pfcr_mm/wheels}
py=${PYTHON:-python3.11}
TORCH=2.14.1
TORCHVISION=0.29.1
MMCV=2.1.0

say() { printf '[setup %s] %s\n' "$(date +%H:%M:%S)" "$*"; }
start=$(date +%s)

if [ ! -x "$venv/bin/python" ]; then
  say "creating virtual environment $venv with $py"
  "$py" -m venv "$venv"
fi
pip=("$venv/bin/python" -m pip --quiet)
"${pip[@]}" install --upgrade "pip==24.3.1"

say "installing torch==$TORCH torchvision==$TORCHVISION and build tools"
"${pip[@]}" install "torch==$TORCH" "torchvision==$TORCHVISION" \
  "setuptools==80.9.0" "ninja==1.11.1.1" "numpy==1.26.4"

# The compiled ops to build: the functions of mmcv's ops extension listed in tools/mmcv/ops.txt
# (those the tests, the demo and the demo detectors' training call), or every op.
if [ "${PFCR_MMCV_FULL:-0}" = 1 ]; then
  ops=all; prepare=(--full)
else  # the list as prepare_source.py reads it, sorted as built_ops prints it
  ops=$("$venv/bin/python" -c "import sys; sys.path.insert(0, '$root/tools/mmcv')
from prepare_source import read_ops; from pathlib import Path
print(' '.join(sorted(read_ops(Path('$root/tools/mmcv/ops.txt')))))")
  prepare=(--ops "$root/tools/mmcv/ops.txt")
fi
built_ops() {  # what the installed mmcv was built with (mmcv/pfcr_ops.py), or nothing
  "$venv/bin/python" -c "import mmcv, mmcv.ops
from mmcv.pfcr_ops import OPS
if mmcv.__version__ == '$MMCV': print(' '.join(sorted(OPS)))" 2>/dev/null
}
installed=$(built_ops || true)
if [ -n "$installed" ] && { [ "$installed" = "$ops" ] || [ "$installed" = all ]; }; then
  say "mmcv $MMCV already installed with the ops of: $installed"
else
  cuda=$("$venv/bin/python" -c "import torch; print(torch.version.cuda.replace('.', '') if torch.cuda.is_available() else '')")
  flavour=${cuda:+cu$cuda}; flavour=${flavour:-cpu}
  # the cached wheel is the one of these ops, prepared by this version of prepare_source.py
  ops_key=$({ printf '%s\n' "$ops"; cat "$root/tools/mmcv/prepare_source.py"; } | sha256sum | cut -c1-12)
  wheel_dir="$cache/mmcv-$MMCV-torch$TORCH-$flavour-ops-$ops_key"
  if ! ls "$wheel_dir"/mmcv-*.whl >/dev/null 2>&1; then
    build=$(mktemp -d)
    trap 'rm -rf "$build"' EXIT
    built_at=$(date +%s)
    if [ "$ops" = all ]; then took="every op: about 10 minutes"; else took="the listed ops: about 2 minutes"; fi
    say "building mmcv $MMCV from source with $flavour ops ($took on 2 cores)"
    "${pip[@]}" download "mmcv==$MMCV" --no-deps --no-binary mmcv --no-build-isolation -d "$build"
    tar -xzf "$build"/mmcv-$MMCV.tar.gz -C "$build"
    src="$build/mmcv-$MMCV"
    "$venv/bin/python" "$root/tools/mmcv/prepare_source.py" "$src" "${prepare[@]}"
    export MMCV_WITH_OPS=1 MAX_JOBS=${MAX_JOBS:-$(nproc)}
    if [ "$flavour" != cpu ]; then export FORCE_CUDA=1; fi
    # pip's own output is the progress here: the compile prints one line per source file.
    "$venv/bin/python" -m pip wheel --no-deps --no-build-isolation -w "$build/dist" "$src" -v 2>&1 |
      sed -unE -e 's#^ *(\[[0-9]+/[0-9]+\]) .* -c [^ ]*/([^/ ]+\.(cpp|cu)) .*#  compiling \1 \2#p' \
        -e '/[Ee]rror/p' || true
    ls "$build"/dist/mmcv-*.whl >/dev/null 2>&1 || { say "mmcv build failed; rerun with the full log: see above"; exit 1; }
    mkdir -p "$wheel_dir"
    cp "$build"/dist/mmcv-*.whl "$wheel_dir/"
    say "built mmcv in $(( $(date +%s) - built_at )) s; cached the wheel in $wheel_dir"
  else
    say "using cached mmcv wheel from $wheel_dir"
  fi
  "${pip[@]}" install --no-deps --force-reinstall "$wheel_dir"/mmcv-*.whl
fi

say "installing pfcr_mm and its pinned dependencies"
"${pip[@]}" install -e "$root[dev]"
if ! "$venv/bin/python" -c "import mmcv._ext, mmcv.ops, mmdet, timm, onnx, onnxruntime, onnxscript, pfcr_mm; from mmcv.ops import RoIAlign, nms"; then
  if [ -n "${wheel_dir:-}" ]; then  # an mmcv wheel installed by this run that does not load
    rm -rf "$wheel_dir"
    say "removed the cached mmcv wheel $wheel_dir; rerun, or build every op: PFCR_MMCV_FULL=1 bash tools/setup.sh"
  fi
  exit 1
fi
say "ready in $(( $(date +%s) - start )) s: $venv"
