"""pfcr_mm.atomic.atomic_path: a file appears whole or not at all."""

import errno
import os
import shutil
import subprocess

import pytest

from pfcr_mm.atomic import DiskFullError, atomic_path, remove_stale_temporaries


def test_the_file_appears_only_when_complete(tmp_path):
    path = tmp_path / "results.json"
    path.write_text("old")
    with atomic_path(path) as tmp:
        assert tmp.parent == tmp_path and tmp.suffix == ".json" and tmp != path
        tmp.write_text("new")
        assert path.read_text() == "old"  # not yet replaced
    assert path.read_text() == "new"
    assert [p.name for p in tmp_path.iterdir()] == ["results.json"]


def test_a_failed_write_keeps_the_earlier_file_and_leaves_no_temporary(tmp_path):
    path = tmp_path / "quantized_model.pth"
    path.write_bytes(b"earlier model")
    with pytest.raises(KeyboardInterrupt), atomic_path(path) as tmp:
        tmp.write_bytes(b"half")
        raise KeyboardInterrupt  # killed mid-write
    assert path.read_bytes() == b"earlier model"
    assert [p.name for p in tmp_path.iterdir()] == ["quantized_model.pth"]


def test_a_full_disk_is_named_with_the_path_and_the_bytes(tmp_path):
    path = tmp_path / "quantized_model.pth"
    path.write_bytes(b"earlier model")
    with pytest.raises(DiskFullError, match="no space left to write .*quantized_model.pth: ") as e:
        with atomic_path(path) as tmp:
            tmp.write_bytes(b"x" * 100)
            raise OSError(errno.ENOSPC, "No space left on device")
    assert e.value.errno == errno.ENOSPC and "had reached 100 bytes" in str(e.value)
    assert path.read_bytes() == b"earlier model"
    assert [p.name for p in tmp_path.iterdir()] == ["quantized_model.pth"]


def test_torch_saves_runtime_error_on_a_full_device_is_a_full_disk(tmp_path, monkeypatch):
    """torch.save reports a full device as ``RuntimeError: ... unexpected pos``, without an
    errno: with (almost) no space left it is taken for one, otherwise it stays what it is."""
    usage = shutil.disk_usage(tmp_path)
    for free, expected in ((1000, DiskFullError), (10**12, RuntimeError)):
        monkeypatch.setattr(shutil, "disk_usage", lambda p, free=free: usage._replace(free=free))
        with pytest.raises(expected) as e, atomic_path(tmp_path / "m.pth"):
            raise RuntimeError("[enforce fail at inline_container.cc:672] unexpected pos")
        assert type(e.value) is expected
    assert list(tmp_path.iterdir()) == []


def test_temporaries_of_processes_that_are_gone_are_removed(tmp_path):
    gone = subprocess.Popen(["true"])
    gone.wait()
    run = tmp_path / "20261203_080000"
    run.mkdir()
    stale = run / f".quantized_model.{gone.pid}.tmp.pth"
    live = run / f".ptq_results.{os.getpid()}.tmp.json"  # a write under way in this process
    for p in (stale, live, run / "quantized_model.pth"):
        p.write_bytes(b"x")
    assert remove_stale_temporaries(tmp_path) == [stale]
    assert sorted(p.name for p in run.iterdir()) == sorted([live.name, "quantized_model.pth"])


def test_a_full_disk_is_named_while_the_partial_file_still_holds_its_space(tmp_path, monkeypatch):
    """The device is full while the partial file exists; removing it frees space, which must
    not turn the failure into an unexplained RuntimeError."""
    usage = shutil.disk_usage(tmp_path)

    def disk_usage(folder):
        partial = any(p.name.startswith(".m.") for p in tmp_path.iterdir())
        return usage._replace(free=1000 if partial else 10**9)

    monkeypatch.setattr(shutil, "disk_usage", disk_usage)
    with pytest.raises(DiskFullError, match="the file had reached 2000000 bytes"):
        with atomic_path(tmp_path / "m.pth") as tmp:
            tmp.write_bytes(b"x" * 2_000_000)
            raise RuntimeError("[enforce fail at inline_container.cc:672] unexpected pos")
    assert list(tmp_path.iterdir()) == []
