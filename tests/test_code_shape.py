"""The shape the codebase keeps: short functions, code references into docs/method.md that
exist, and documentation tables that match the committed benchmark JSON."""

import ast
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
MAX_LINES = 60
MAX_LINES_UNIT_LOOP = 40  # reconstruct_unit reads like its loss
EXEMPT = ("pfcr_mm/demo/",)  # the demo's data generators


def _functions(path: Path):
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            yield node.name, node.lineno, node.end_lineno - node.lineno + 1


def test_no_long_functions_in_the_package():
    long = [
        f"{path.relative_to(ROOT)}:{line} {name} ({n} lines)"
        for path in sorted((ROOT / "pfcr_mm").rglob("*.py"))
        if not str(path.relative_to(ROOT)).startswith(EXEMPT)
        for name, line, n in _functions(path)
        if n > MAX_LINES or (name == "reconstruct_unit" and n > MAX_LINES_UNIT_LOOP)
    ]
    assert not long, long


def test_method_references_point_into_docs_method():
    sections = {
        int(m) for m in re.findall(r"^## (\d+)\.", (ROOT / "docs/method.md").read_text(), re.M)
    }
    assert {1, 2, 3, 4, 5, 6, 7} <= sections
    cited, bare = [], []
    for path in [*(ROOT / "pfcr_mm").rglob("*.py"), *(ROOT / "configs").rglob("*.py")]:
        text = path.read_text()
        bare += [str(path) for m in re.finditer(r"(?<!docs/)method\.md", text)]
        for m in re.finditer(r"docs/method\.md``?,? sections? (\d+)(?:-(\d+))?", text):
            first, last = int(m[1]), int(m[2] or m[1])
            cited += [(str(path), k) for k in range(first, last + 1)]
    assert not bare, f"method.md cited without its folder: {bare}"
    assert cited and all(k in sections for _, k in cited), cited


@pytest.mark.slow  # a subprocess
def test_benchmark_tables_match_the_committed_json():
    script = ROOT / "tools/benchmarks/make_tables.py"
    out = subprocess.run([sys.executable, str(script), "--check"], capture_output=True, text=True)
    assert out.returncode == 0, out.stdout + out.stderr
