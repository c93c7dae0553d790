"""The mmcv ops build of `tools/setup.sh`: which sources an ops list keeps (on a small source tree
shaped like mmcv's), the ops list recorded from a command, and the installed mmcv itself."""

import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]

# A source tree shaped like mmcv 2.1.0's `mmcv/ops/csrc/pytorch`: `foo` dispatches to registered
# CPU and CUDA implementations (as roi_align), `bar` calls its CPU function directly (as
# nms_rotated), `baz` is bound but not wanted.
TREE = {
    "pybind.cpp": """#include <torch/extension.h>
std::string get_compiler_version();
std::string get_compiling_cuda_version();
void foo_forward(Tensor x);
Tensor bar(Tensor x);
void baz(Tensor x);
PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("get_compiler_version", &get_compiler_version, "get_compiler_version");
  m.def("get_compiling_cuda_version", &get_compiling_cuda_version,
        "get_compiling_cuda_version");
  m.def("foo_forward", &foo_forward, "foo forward; with a semicolon", py::arg("x"));
  m.def("bar", &bar, "bar", py::arg("x"));
  m.def("baz", &baz, "baz {", py::arg("x"));
}
""",
    "info.cpp": """std::string get_compiler_version() { return "gcc"; }
std::string get_compiling_cuda_version() { return "none"; }
""",
    "foo.cpp": """// foo: dispatched
void foo_forward_impl(Tensor x) { DISPATCH_DEVICE_IMPL(foo_forward_impl, x); }
void foo_forward(Tensor x) {
  foo_forward_impl(x);
}
""",
    "bar.cpp": """Tensor bar_cpu(Tensor x);
Tensor bar(Tensor x) { return bar_cpu(x); }
""",
    "baz.cpp": """void baz_impl(Tensor x) { DISPATCH_DEVICE_IMPL(baz_impl, x); }
void baz(Tensor x) { baz_impl(x); }
""",
    "cpu/foo.cpp": """template <typename T>
void foo_kernel(const T* x) { if (x) { return; } }
void foo_forward_cpu(Tensor x) { foo_kernel<float>(nullptr); }
void foo_forward_impl(Tensor x);
REGISTER_DEVICE_IMPL(foo_forward_impl, CPU, foo_forward_cpu);
""",
    "cpu/bar.cpp": "Tensor bar_cpu(Tensor x) { return x; }\n",
    "cpu/baz.cpp": """void baz_cpu(Tensor x) {}
void baz_impl(Tensor x);
REGISTER_DEVICE_IMPL(baz_impl, CPU, baz_cpu);
""",
    "cuda/cudabind.cpp": """// the CUDA bindings
#include "pytorch_cpp_helper.hpp"
void FooLauncher(Tensor x);
void foo_check(Tensor x) { CHECK_CUDA(x); }
void foo_forward_cuda(Tensor x) {
  foo_check(x);
  FooLauncher(x);
};
void foo_forward_impl(Tensor x);
REGISTER_DEVICE_IMPL(foo_forward_impl, CUDA, foo_forward_cuda);

void BazLauncher(Tensor x);
void baz_cuda(Tensor x) { BazLauncher(x); }
void baz_impl(Tensor x);
REGISTER_DEVICE_IMPL(baz_impl, CUDA, baz_cuda);
""",
    "cuda/foo_cuda.cu": """__global__ void foo_kernel(float* y) { y[0] = 1; }
void FooLauncher(Tensor x) { foo_kernel<<<1, 1>>>(nullptr); }
""",
    "cuda/baz_cuda.cu": 'void BazLauncher(Tensor x) { const char* s = "}"; }\n',
}


@pytest.fixture
def mmcv_tree(tmp_path):
    csrc = tmp_path / "mmcv/ops/csrc/pytorch"
    for name, text in TREE.items():
        (csrc / name).parent.mkdir(parents=True, exist_ok=True)
        (csrc / name).write_text(text)
    (tmp_path / "setup.py").write_text("extra_compile_args = ['-std=c++17']\n")
    return tmp_path


def _kept(src, paths):
    csrc = src / "mmcv/ops/csrc/pytorch"
    return sorted(str(p.relative_to(csrc)) for p in paths)


def test_a_dispatched_op_keeps_its_cpu_and_cuda_implementations_and_nothing_else(
    mmcv_source_tool, mmcv_tree
):
    kept, text = mmcv_source_tool.select(mmcv_tree, {"foo_forward"})
    assert _kept(mmcv_tree, kept) == [
        "cpu/foo.cpp",
        "cuda/cudabind.cpp",
        "cuda/foo_cuda.cu",
        "foo.cpp",
        "info.cpp",
        "pybind.cpp",
    ]
    csrc = mmcv_tree / "mmcv/ops/csrc/pytorch"
    pybind = text[csrc / "pybind.cpp"]
    assert '"foo_forward"' in pybind and '"get_compiler_version"' in pybind
    assert '"get_compiling_cuda_version"' in pybind
    assert '"bar"' not in pybind and '"baz"' not in pybind
    assert pybind.rstrip().endswith("}") and "void baz(Tensor x);" in pybind  # declarations stay
    cudabind = text[csrc / "cuda/cudabind.cpp"]
    assert "REGISTER_DEVICE_IMPL(foo_forward_impl, CUDA, foo_forward_cuda);" in cudabind
    assert "void foo_check(Tensor x) { CHECK_CUDA(x); }" in cudabind  # a helper the binding calls
    assert (
        "baz_cuda(Tensor x) {" not in cudabind and "REGISTER_DEVICE_IMPL(baz_impl" not in cudabind
    )
    assert cudabind.startswith('// the CUDA bindings\n#include "pytorch_cpp_helper.hpp"\n')


def test_an_op_that_calls_its_cpu_function_directly_keeps_that_file(mmcv_source_tool, mmcv_tree):
    kept, text = mmcv_source_tool.select(mmcv_tree, {"bar"})
    assert _kept(mmcv_tree, kept) == [
        "bar.cpp",
        "cpu/bar.cpp",
        "cuda/cudabind.cpp",
        "info.cpp",
        "pybind.cpp",
    ]
    cudabind = text[mmcv_tree / "mmcv/ops/csrc/pytorch/cuda/cudabind.cpp"]
    assert "REGISTER_DEVICE_IMPL" not in cudabind and "FooLauncher(x);" not in cudabind


# mmcv 2.1.0's loader, as `prepare_source.py` expects to find it
LOADER = """import importlib
import torch

if torch.__version__ != 'parrots':

    def load_ext(name, funcs):
        ext = importlib.import_module('mmcv.' + name)
        for fun in funcs:
            assert hasattr(ext, fun), f'{fun} miss in module {name}'
        return ext
else:
    pass
"""


def test_main_deletes_the_unneeded_sources_and_records_what_it_built(
    mmcv_source_tool, mmcv_tree, tmp_path
):
    ops = tmp_path / "ops.txt"
    ops.write_text("# a comment\nfoo_forward\n\n")
    (mmcv_tree / "mmcv/utils").mkdir()
    loader = mmcv_tree / "mmcv/utils/ext_loader.py"
    loader.write_text(LOADER)
    csrc = mmcv_tree / "mmcv/ops/csrc/pytorch"
    kept, text = mmcv_source_tool.select(mmcv_tree, {"foo_forward"})
    assert mmcv_source_tool.main([str(mmcv_tree), "--ops", str(ops)]) == 0
    left = sorted(str(p.relative_to(csrc)) for p in csrc.rglob("*") if p.is_file())
    assert left == _kept(mmcv_tree, kept)
    assert (csrc / "pybind.cpp").read_text() == text[csrc / "pybind.cpp"]
    marker = {}
    exec((mmcv_tree / "mmcv/pfcr_ops.py").read_text(), marker)
    assert marker["OPS"] == ("foo_forward",)
    assert "-std=c++20" in (mmcv_tree / "setup.py").read_text()
    patched = loader.read_text()
    assert "assert hasattr" not in patched and "else:\n    pass" in patched

    # the patched loader: a missing function becomes one that raises a one-line error
    namespace = {}
    exec(compile(patched, str(loader), "exec"), namespace)
    fake = type(sys)("mmcv.fake_ext")
    fake.present = len
    sys.modules["mmcv.fake_ext"] = fake
    try:
        ext = namespace["load_ext"]("fake_ext", ["present", "absent_forward"])
    finally:
        del sys.modules["mmcv.fake_ext"]
    assert ext.present is len
    with pytest.raises(RuntimeError) as err:
        ext.absent_forward(1)
    assert "\n" not in str(err.value) and "mmcv op 'absent_forward' is not built" in str(err.value)
    assert "PFCR_MMCV_FULL=1 bash tools/setup.sh" in str(err.value)


def test_a_loader_the_patch_does_not_know_is_refused(mmcv_source_tool, mmcv_tree):
    (mmcv_tree / "mmcv/utils").mkdir()
    (mmcv_tree / "mmcv/utils/ext_loader.py").write_text("def load_ext(name):\n    pass\n")
    with pytest.raises(SystemExit, match="load_ext is not the one this script knows"):
        mmcv_source_tool.main([str(mmcv_tree), "--full"])


def test_bad_ops_lists_and_sources_stop_in_one_line(mmcv_source_tool, mmcv_tree, tmp_path, capsys):
    ops = tmp_path / "ops.txt"
    ops.write_text("foo_forward\nroi_align_fwd\n")
    (mmcv_tree / "mmcv/utils").mkdir()
    (mmcv_tree / "mmcv/utils/ext_loader.py").write_text(LOADER)
    with pytest.raises(SystemExit) as stop:
        mmcv_source_tool.main([str(mmcv_tree), "--ops", str(ops)])
    assert stop.value.code == 2
    assert "not functions of mmcv's ops extension: roi_align_fwd" in capsys.readouterr().err
    with pytest.raises(SystemExit) as stop:
        mmcv_source_tool.main([str(tmp_path / "nowhere"), "--full"])
    assert stop.value.code == 2
    assert "is not an unpacked mmcv source distribution" in capsys.readouterr().err


def _record(out: Path, code: str, *options: str) -> subprocess.CompletedProcess:
    """`tools/mmcv/record_ops.py --out OUT [options] -- python -c CODE`, its output captured."""
    tool = [sys.executable, str(ROOT / "tools/mmcv/record_ops.py"), "--out", str(out), *options]
    return subprocess.run([*tool, "--", sys.executable, "-c", code], capture_output=True, text=True)


def test_the_recorder_lists_the_ops_a_command_calls(tmp_path):
    out = tmp_path / "ops.txt"
    code = (
        "import torch; from mmcv.ops import nms; "
        "print(nms(torch.tensor([[0., 0, 4, 4], [1, 1, 5, 5]]), torch.tensor([0.9, 0.8]), 0.1)[1])"
    )
    run = _record(out, code)
    assert run.returncode == 0, run.stderr
    assert "tensor([0])" in run.stdout
    lines = out.read_text().splitlines()
    assert [line for line in lines if not line.startswith("#")] == ["nms"]
    assert any(line.startswith("#   ") and "from mmcv.ops import nms" in line for line in lines)
    failed = _record(out, "raise SystemExit(5)", "--add")
    assert failed.returncode == 5 and out.read_text().splitlines() == lines  # left as it was


def _built_ops():
    try:
        from mmcv.pfcr_ops import OPS
    except ImportError:  # an mmcv not built by tools/setup.sh
        return None
    return list(OPS)


# the tests of the mmcv that tools/setup.sh builds from tools/mmcv/ops.txt
trimmed_mmcv = pytest.mark.skipif(
    _built_ops() in (None, ["all"]), reason="mmcv was not built from tools/mmcv/ops.txt"
)


@trimmed_mmcv
def test_the_installed_mmcv_has_the_listed_ops_and_names_the_others_in_one_line(mmcv_source_tool):
    import mmcv.ops
    from mmcv.utils import ext_loader

    listed = ext_loader.load_ext("_ext", [])
    wanted = sorted(mmcv_source_tool.read_ops(ROOT / "tools/mmcv/ops.txt"))
    assert _built_ops() == wanted
    for name in wanted:  # compiled, not the loader's stand-in
        assert type(getattr(listed, name)).__name__ == "builtin_function_or_method", name
    for name in mmcv.ops.__all__:
        assert getattr(mmcv.ops, name) is not None
    conv = mmcv.ops.DeformConv2d(2, 2, 3, padding=1)
    x = torch.rand(1, 2, 5, 5)
    with pytest.raises(RuntimeError) as err:
        conv(x, torch.zeros(1, 18, 5, 5))
    message = str(err.value)
    assert "\n" not in message and "'deform_conv_forward' is not built" in message
    assert "PFCR_MMCV_FULL=1 bash tools/setup.sh" in message


@trimmed_mmcv
def test_the_recorder_names_an_op_that_is_not_built(tmp_path):
    out = tmp_path / "ops.txt"
    code = (
        "import torch; from mmcv.ops import RoIPool; "
        "RoIPool(2, 1.0)(torch.rand(1, 2, 8, 8), torch.tensor([[0, 1.0, 1, 5, 5]]))"
    )
    run = _record(out, code)
    assert run.returncode == 1 and not out.exists()
    assert "'roi_pool_forward' is not built" in run.stderr
    assert run.stderr.strip().endswith("it called: roi_pool_forward")
