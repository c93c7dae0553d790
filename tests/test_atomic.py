"""pfcr_mm.atomic.atomic_path: a file appears whole or not at all."""

import pytest

from pfcr_mm.atomic import atomic_path


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
