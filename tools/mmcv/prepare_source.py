"""Prepares mmcv 2.1.0's source for `tools/setup.sh`: fixes what stops it building against torch
2.14 and, unless `--full`, keeps only the compiled ops that the functions in an ops list need.

    python tools/mmcv/prepare_source.py SRC --ops tools/mmcv/ops.txt  # the ops this project calls
    python tools/mmcv/prepare_source.py SRC --full                     # every op

SRC is the unpacked source distribution; it is changed in place:
- `setup.py`: `-std=c++17` becomes `-std=c++20` (the torch 2.14 headers need C++20);
- `mmcv/utils/ext_loader.py`: a function missing from the compiled extension becomes one that
  raises a one-line error naming it and how to build them all, so every `mmcv.ops` name still
  imports (mmcv's own loader asserts at import);
- `mmcv/pfcr_ops.py`: what was built, `OPS` (`("all",)`, or the functions), read back by
  `tools/setup.sh` (a module, so that the wheel carries it);
- with an ops list: the sources the listed functions do not need are deleted and the extension's
  two registration files (`pybind.cpp`, the Python bindings, and `cuda/cudabind.cpp`, the CUDA
  implementations of every op) are cut down to what the kept sources define.

Which sources a function needs is read from the code, not listed by hand: the file that defines
it, the `*_impl` dispatch keys it calls, the CPU files and CUDA bindings that register those keys,
and the `.cu` files that define the kernel launchers the kept bindings call.
"""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

# Always built: mmcv.ops.info calls them at import.
ALWAYS = ("get_compiler_version", "get_compiling_cuda_version")
# the sparse convolution ops (mmcv.ops.SparseConv*, SubMConv*): their CUDA code lives in
# `namespace functor` blocks and explicit template instantiations, which select() does not read
SPARSE_CONV = ("get_indice_pairs", "indice_conv", "fused_indice_conv", "indice_maxpool")
FULL_BUILD_HINT = "PFCR_MMCV_FULL=1 bash tools/setup.sh"

LOADER_PATCH = """
    def _not_built(fun):
        def missing(*args, **kwargs):
            raise RuntimeError(
                f"mmcv op {{fun!r}} is not built: pfcr_mm's set-up builds only the mmcv ops its "
                f"detectors call; build every op with `{hint}`")

        return missing

    def load_ext(name, funcs):
        ext = importlib.import_module('mmcv.' + name)
        for fun in funcs:
            if not hasattr(ext, fun):
                setattr(ext, fun, _not_built(fun))
        return ext
"""
LOADER_ORIGINAL = re.compile(
    r"\n    def load_ext\(name, funcs\):\n.*?\n        return ext\n", re.DOTALL
)

IDENT = re.compile(r"[A-Za-z_]\w*")
# a function's name and parameter list (one level of nested parentheses) at the end of its head
PARAMETER_LIST_AT_END = re.compile(
    r"([A-Za-z_]\w*)\s*\([^()]*(?:\([^()]*\)[^()]*)*\)\s*(?:const\s*)?$"
)
REGISTRATION = re.compile(r"REGISTER_DEVICE_IMPL\(\s*(\w+)\s*,\s*(\w+)\s*,\s*(\w+)\s*\)")


def statements(text: str) -> list[str]:
    """Top-level C++ statements, in order, with their own text: declarations and definitions
    (a function's body ends its statement), preprocessor lines, and the comments between them
    attached to the statement that follows. Strings, character literals and comments are skipped
    when counting braces."""
    out, start, depth, i, n = [], 0, 0, 0, len(text)
    while i < n:
        c = text[i]
        if text.startswith("//", i):
            i = text.find("\n", i)
            i = n if i < 0 else i
            continue
        if text.startswith("/*", i):
            i = text.index("*/", i) + 2
            continue
        if c in "\"'":
            j = i + 1
            while text[j] != c:
                j += 2 if text[j] == "\\" else 1
            i = j + 1
            continue
        if c == "#" and depth == 0 and _head(text[start:i]).strip() == "":
            end = i
            while True:  # a preprocessor line, with its continuations
                end = text.find("\n", end)
                end = n if end < 0 else end
                if text[end - 1] != "\\":
                    break
                end += 1
            out.append(text[start:end])
            start = i = end
            continue
        if c == "{":
            depth += 1
        elif c == "}":
            depth -= 1
            if depth == 0:
                j = i + 1
                while j < n and text[j] in " \t":
                    j += 1
                i = j + 1 if j < n and text[j] == ";" else i + 1
                out.append(text[start:i])
                start = i
                continue
        elif c == ";" and depth == 0:
            out.append(text[start : i + 1])
            start = i + 1
        i += 1
    if text[start:].strip():
        out.append(text[start:])
    return out


def _head(statement: str) -> str:
    """A statement without its comments and body: what names a definition."""
    code = re.sub(r"//[^\n]*|/\*.*?\*/", " ", statement, flags=re.DOTALL)
    return code.split("{", 1)[0]


def defined_function(statement: str) -> str | None:
    """The name a function definition defines (the identifier before its parameter list)."""
    if "{" not in statement or statement.lstrip().startswith("#"):
        return None
    head = _head(statement)
    found = PARAMETER_LIST_AT_END.search(head.strip())
    return found.group(1) if found else None


def body_names(statement: str) -> set[str]:
    if "{" not in statement:
        return set()
    return set(IDENT.findall(statement.split("{", 1)[1]))


class Source:
    """One source file, read once: its statements, the functions it defines and registers."""

    def __init__(self, path: Path):
        self.path = path
        self.statements = statements(path.read_text())
        # each function it defines -> the identifiers its bodies use (overloads merged)
        self.uses: dict[str, set[str]] = {}
        for s in self.statements:
            if name := defined_function(s):
                self.uses.setdefault(name, set()).update(body_names(s))
        self.defines = set(self.uses)
        self.registers = [m.groups() for s in self.statements for m in REGISTRATION.finditer(s)]

    def calls(self, names: set[str] | None = None) -> set[str]:
        """The identifiers used in the bodies of its definitions (those named in `names`)."""
        return set().union(*(used for n, used in self.uses.items() if names is None or n in names))


def _bindings(pybind: Path) -> tuple[str, list[tuple[str, str, str]], str]:
    """pybind.cpp split into the text before the module's body, its `m.def` statements (each with
    the Python name it binds and the C++ function it binds to) and the closing brace."""
    text = pybind.read_text()
    open_at = text.index("PYBIND11_MODULE(")
    body_at = text.index("{", open_at) + 1
    close_at = text.rindex("}")
    binding = re.compile(r'm\.def\(\s*"(\w+)"\s*,\s*&\s*(\w+)')
    defs = [
        (*binding.search(s).groups(), s) for s in statements(text[body_at:close_at]) if s.strip()
    ]
    return text[:body_at], defs, text[close_at:]


def select(src: Path, wanted: set[str]) -> tuple[set[Path], dict[Path, str]]:
    """The source files the functions in `wanted` need, and the new text of the two registration
    files. Raises ValueError for a name the extension does not bind."""
    csrc = src / "mmcv/ops/csrc/pytorch"
    pybind, cudabind = csrc / "pybind.cpp", csrc / "cuda/cudabind.cpp"
    before, defs, after = _bindings(pybind)
    bound = {name for name, _, _ in defs}
    unknown = sorted(wanted - bound)
    if unknown:
        raise ValueError(f"not functions of mmcv's ops extension: {', '.join(unknown)}")
    unsupported = sorted(n for n in wanted if n.startswith(SPARSE_CONV))
    if unsupported:
        raise ValueError(
            f"the sparse convolution ops ({', '.join(unsupported)}) are defined inside C++ "
            f"namespaces this script does not follow; build every op with {FULL_BUILD_HINT}"
        )
    keep_names = wanted | set(ALWAYS)
    functions = {cpp for name, cpp, _ in defs if name in keep_names}  # what the bindings call

    tops = [Source(p) for p in sorted(csrc.glob("*.cpp")) if p != pybind]
    cpus = [Source(p) for p in sorted(csrc.glob("cpu/*.cpp"))]
    kernels = [Source(p) for p in sorted(csrc.glob("cuda/*.cu"))]
    cb = Source(cudabind) if cudabind.exists() else None
    kept = {s.path for s in tops + cpus if s.defines & functions}
    while True:
        mine = [s for s in tops + cpus + kernels if s.path in kept]
        # what kept files call and do not define: the files that define it
        called = set().union(*(s.calls() - s.defines for s in mine))
        grown = kept | {s.path for s in tops + cpus + kernels if s.defines & called}
        # the CPU implementations of the dispatch keys kept files define or call
        wanted_keys = called.union(*(s.defines for s in mine))
        grown |= {s.path for s in cpus if any(k in wanted_keys for k, _, _ in s.registers)}
        # the dispatch keys that kept CPU files register: the files that define them
        keys = {k for s in cpus if s.path in grown for k, _, _ in s.registers}
        grown |= {s.path for s in tops if s.defines & keys}
        if cb:  # the CUDA bindings of the kept keys, the helpers they call, their kernels' files
            defined = set().union(*(s.defines for s in tops + cpus if s.path in grown))
            need = todo = {v for k, _, v in cb.registers if k in defined}
            while todo:
                todo = (cb.calls(todo) & cb.defines) - need
                need = need | todo
            launchers = (cb.calls(need) | need) - cb.defines
            grown |= {s.path for s in kernels if s.defines & launchers}
        if grown == kept:
            break
        kept = grown

    text = {pybind: before + "".join(s for name, _, s in defs if name in keep_names) + after}
    if cb:
        text[cudabind] = "".join(
            s
            for s in cb.statements
            if not ((reg := REGISTRATION.search(s)) and reg.group(1) not in defined)
            and not ((name := defined_function(s)) and name not in need)
        )
        kept.add(cudabind)
    kept.add(pybind)
    return kept, text


def patch_loader(src: Path) -> None:
    path = src / "mmcv/utils/ext_loader.py"
    text = path.read_text()
    if "_not_built" in text:
        return
    if not LOADER_ORIGINAL.search(text):
        raise SystemExit(f"{path}: mmcv's load_ext is not the one this script knows; check it")
    path.write_text(LOADER_ORIGINAL.sub(LOADER_PATCH.format(hint=FULL_BUILD_HINT), text, count=1))


def patch_std(src: Path) -> None:
    path = src / "setup.py"
    text = path.read_text()
    if "-std=c++17" not in text and "-std=c++20" not in text:
        raise SystemExit(f"{path} no longer holds -std=c++17; check the patch")
    path.write_text(text.replace("-std=c++17", "-std=c++20"))


def write_marker(src: Path, ops: list[str]) -> None:
    (src / "mmcv/pfcr_ops.py").write_text(
        "# Written by pfcr_mm's tools/mmcv/prepare_source.py: the functions of the compiled ops\n"
        f"# extension this build holds (all: every one).\nOPS = {tuple(ops)!r}\n"
    )


def read_ops(path: Path) -> set[str]:
    lines = (line.split("#", 1)[0].strip() for line in path.read_text().splitlines())
    return {line for line in lines if line}


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("src", type=Path, help="the unpacked mmcv source distribution")
    group = p.add_mutually_exclusive_group(required=True)
    group.add_argument("--ops", type=Path, help="the functions to build, one per line")
    group.add_argument("--full", action="store_true", help="build every op")
    args = p.parse_args(argv)
    csrc = args.src / "mmcv/ops/csrc/pytorch"
    if not csrc.is_dir():
        p.error(f"{args.src} is not an unpacked mmcv source distribution (no {csrc})")
    patch_std(args.src)
    patch_loader(args.src)
    if args.full:
        write_marker(args.src, ["all"])
        print("building every mmcv op")
        return 0
    wanted = read_ops(args.ops)
    if not wanted:
        p.error(f"{args.ops} lists no function (one per line; build every op with --full)")
    try:
        kept, text = select(args.src, wanted)
    except ValueError as e:
        p.error(f"{args.ops}: {e}")
    for path, new in text.items():
        path.write_text(new)
    sources = [q for q in csrc.rglob("*") if q.suffix in (".cpp", ".cu")]
    for q in sources:
        if q.parent.name in ("", "pytorch", "cpu", "cuda") and q not in kept:
            q.unlink()
    write_marker(args.src, sorted(wanted))
    names = sorted(str(q.relative_to(csrc)) for q in kept if q.exists())
    print(
        f"building the mmcv ops of {len(wanted)} functions ({' '.join(sorted(wanted))}) "
        f"from {len(names)} of {len(sources)} source files (cuda/ ones compiled only with CUDA): "
        f"{' '.join(names)}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
