"""pfcr_mm.provenance: the machine record and package versions have the keys the committed
benchmark and checkpoint JSON files hold, digests are SHA-256, and a benchmark's JSON and
Markdown are written together, saying which earlier files they replaced."""

import hashlib
import json
import platform

from pfcr_mm.provenance import (
    PACKAGES,
    cpu_flags,
    file_sha256,
    machine_record,
    package_versions,
    write_benchmark,
)


def test_machine_record_and_versions_keys():
    machine = machine_record()
    assert {"processor", "cpu", "cpu_count", "cpu_flags"} <= set(machine)
    assert all(f.startswith(("avx", "amx")) or "vnni" in f for f in cpu_flags())
    versions = package_versions()
    assert list(versions) == ["python", *PACKAGES]
    assert versions["python"] == platform.python_version() and versions["torch"]
    assert package_versions(("no-such-distribution",))["no-such-distribution"] is None


def test_file_sha256(tmp_path):
    path = tmp_path / "weights.bin"
    path.write_bytes(bytes(range(256)) * 5000)  # over one read chunk
    assert file_sha256(path) == hashlib.sha256(path.read_bytes()).hexdigest()


def test_write_benchmark_writes_both_and_names_what_it_replaced(tmp_path):
    out = tmp_path / "bench"
    line = write_benchmark(out, {"rows": [1]}, "| a |\n")
    assert line == f"wrote {out / 'benchmark.json'} and {out / 'benchmark.md'}"
    line = write_benchmark(out, {"rows": [2], "path": tmp_path}, "| b |\n")
    assert line.endswith("(replaced the earlier benchmark.json and benchmark.md)")
    assert json.loads((out / "benchmark.json").read_text()) == {"rows": [2], "path": str(tmp_path)}
    assert (out / "benchmark.md").read_text() == "| b |\n"
    assert sorted(p.name for p in out.iterdir()) == ["benchmark.json", "benchmark.md"]
