"""Reconstruction caches under a memory limit (pfcr_mm/recon/cache.py,
``ReconSettings.cache_limit_gb``): tensors beyond the limit go to memory-mapped files, the run
is bit-identical to one held in memory, the counted bytes in memory never exceed the limit, and
nothing is left on disk."""

import copy
import gc
import json

import pytest
import torch

import pfcr_mm
from pfcr_mm.recon.cache import GB, CacheStore
from pfcr_mm.recon.sampling import UnitCaches
from pfcr_mm.settings import CacheSettings, ReconSettings


def _same(a, b) -> bool:
    """Equal bit for bit: tensors, and the dicts of a quantizer's extra state."""
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b)
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    return a == b


def _quantize(model, batches, limit_gb, tmp_path, name):
    config = pfcr_mm.PTQConfig(
        method="pfcr",
        quant=pfcr_mm.QuantConfig(w_bits=4, a_bits=4),
        recon=ReconSettings(
            iters=6, batch_size=8, max_level=1, log_every=0, cache=CacheSettings(limit_gb=limit_gb)
        ),
    )
    log_dir = tmp_path / name
    result = pfcr_mm.quantize(model, config, batches, log_dir=log_dir, print_fn=lambda s: None)
    return result, log_dir


@pytest.mark.slow
def test_spilled_run_is_bit_identical_under_the_limit_and_leaves_nothing(tiny_timm_vit, tmp_path):
    model = tiny_timm_vit()
    batches = [torch.randn(16, 3, 32, 32) for _ in range(3)]
    # one cached tensor (16 images x 17 tokens x 48 channels, float32) is 52,224 bytes: a
    # limit of 2.5 of them keeps two in memory and spills the rest
    one = 16 * 17 * 48 * 4
    limit_gb = 2.5 * one / GB
    twin = copy.deepcopy(model)
    held, _ = _quantize(model, batches, None, tmp_path, "memory")
    spilled, log_dir = _quantize(twin, batches, limit_gb, tmp_path, "spill")

    # the same model, bit for bit, and the same loss at every step
    assert _same(model.state_dict(), twin.state_dict())
    assert [r.losses for r in held.records] == [r.losses for r in spilled.records]

    # without a limit everything stays in memory: the unit caches of 3 batches are 3 tensors
    # each of FP inputs, quantized-path inputs and targets, plus the fronts moving past them
    free = held.recon["cache"]
    assert free["limit_bytes"] is None and free["max_disk_bytes"] == 0
    assert free["spilled_tensors"] == 0 and free["max_memory_bytes"] >= 9 * one
    # with the limit: never more than two tensors in memory, the rest spilled
    stats = spilled.recon["cache"]
    assert stats["limit_bytes"] == int(2.5 * one)
    assert stats["max_memory_bytes"] == 2 * one
    assert stats["spilled_tensors"] > 0 and stats["max_disk_bytes"] >= 7 * one
    units = json.loads((log_dir / "recon_log.json").read_text())["units"]
    assert len(units) == 8 + 4
    for u in units:  # per unit: its caches (3 batches x 3 tensors) held, 2 of them in memory
        c = u["cache_bytes"]
        assert c["memory"] + c["disk"] >= 9 * one and c["peak_memory"] <= 2 * one
    # the spill folder (in the log folder, where the run's files are) is gone, and no file
    # of it is left anywhere in the run's folder
    assert not list(log_dir.glob("pfcr_cache_*"))
    assert sorted(p.name for p in log_dir.iterdir()) == ["recon_log.json", "recon_loss.png"]


@pytest.mark.slow
def test_store_spills_beyond_the_limit_and_frees_disk_with_the_tensor(tmp_path):
    store = CacheStore(limit_bytes=100, folder=tmp_path, dtype=torch.float16)
    kept = store.store(torch.arange(40.0).reshape(2, 20))  # 80 bytes in fp16: in memory
    spilled = store.store(torch.arange(30.0).reshape(3, 10) + 0.1)  # 60 more: over the limit
    assert (store.memory, store.disk, store.spilled) == (80, 60, 1)
    assert spilled.dtype == torch.float16 and spilled.shape == (3, 10)
    assert torch.equal(spilled, (torch.arange(30.0).reshape(3, 10) + 0.1).half())
    (folder,) = tmp_path.iterdir()
    assert list(folder.iterdir()) == []  # the file is unlinked once mapped
    del spilled
    gc.collect()
    assert (store.memory, store.disk, store.max_disk) == (80, 0, 60)
    del kept
    gc.collect()
    assert store.memory == 0
    store.close()
    assert list(tmp_path.iterdir()) == []


def test_sampler_draws_the_same_rows_from_spilled_nested_caches(tmp_path):
    # a detector part's entries: tuples of maps; of two sizes (one batch drawn, then rows
    # within it) or of one (rows drawn from the pooled batches)
    def entries(gen, widths):
        return [
            (torch.randn(n, 4, w, generator=gen), (torch.randn(n, 3, generator=gen),))
            for n, w in zip((6, 9), widths)
        ]

    for pooled in (False, True):
        gen = torch.Generator().manual_seed(0)
        widths = (5, 5) if pooled else (5, 7)
        q, x, y = (entries(gen, widths) for _ in range(3))
        store = CacheStore(limit_bytes=0, folder=tmp_path)  # everything on disk
        on_disk = [[pfcr_mm.tree.map_tensors(store.store, e) for e in c] for c in (q, x, y)]
        assert store.memory == 0 and store.spilled == 3 * 2 * 2
        args = [()] * 2
        draws = []
        for caches in ((q, x, y), on_disk):
            sampler = UnitCaches(*caches, args)
            assert sampler.pooled == pooled
            gen = torch.Generator().manual_seed(1)
            draws.append([sampler.draw(gen, 4, torch.device("cpu"))[:3] for _ in range(5)])
        flat = [pfcr_mm.tree.flat_tensors(d) for d in draws]
        assert all(torch.equal(u, v) for u, v in zip(*flat, strict=True))
        store.close()


@pytest.mark.parametrize("bad", [-1, -0.5, float("nan"), "2GB", True])
def test_bad_cache_limit_refused(bad):
    with pytest.raises(ValueError, match="cache.limit_gb must be a number >= 0 or None"):
        CacheSettings(limit_gb=bad)
    assert CacheSettings(limit_gb=0).limit_gb == 0  # 0: every cached tensor on disk


def test_flat_cache_keys_of_earlier_versions_still_read():
    settings = ReconSettings.from_dict({"iters": 3, "cache_limit_gb": 2, "cache_dir": "/tmp/c"})
    assert settings.cache == CacheSettings(limit_gb=2, dir="/tmp/c") and settings.iters == 3
