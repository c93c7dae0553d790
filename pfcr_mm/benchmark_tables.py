"""Markdown tables of the benchmark JSON written by the scripts of ``tools/benchmarks/``.

One renderer per script: :func:`recon_table` (``benchmark_recon.py``), :func:`step_table`
(``benchmark_step.py``), :func:`cache_table` (``benchmark_cache.py``), :func:`export_table` and
:func:`export_det_table` (``benchmark_export.py --models vit|det``). Each script writes its
table next to its JSON as ``benchmark.md``; ``tools/benchmarks/make_tables.py`` puts the same
tables into ``docs/benchmarks.md``, so the two cannot drift apart. Standard library only.
"""

from __future__ import annotations

import statistics

# metrics of each demo model and the factor to percent (classifier accuracy is already in %)
METRICS = {
    "cls": (["accuracy/top1"], 1),
    "det": (["coco/bbox_mAP", "coco/segm_mAP"], 100),
    "det_vitdet": (["coco/bbox_mAP", "coco/segm_mAP"], 100),
}

RECON_HEAD = [
    "model",
    "bits",
    "method",
    "seeds",
    "metric (%)",
    "FP",
    "quantized",
    "per seed",
    "output rel. MSE, eval",
    "held-out calib",
    "block-passes",
    "recon s",
    "peak host MiB",
]
STEP_HEAD = [
    "level",
    "unit type",
    "unit",
    "blocks",
    "block passes",
    "batch",
    "FP fwd+bwd ms",
    "step ms",
    "step / FP",
    "step ms per block pass",
]
CACHE_HEAD = [
    "model",
    "images",
    "limit GB",
    "cache peak in memory GB",
    "on disk GB",
    "peak RSS MiB",
    "peak anon MiB",
    "peak file MiB",
    "caches s",
    "steps s",
    "spill s",
    "run s",
]
EXPORT_DET_HEAD = [
    "variant",
    "PyTorch fake-quant box / mask mAP",
    "onnxruntime box / mask mAP",
    "difference (points)",
    "PyTorch, input x (1 + 1e-6 noise), per seed",
    "features: max diff / range",
    "size (MB)",
]


def _line(cells: list[str]) -> str:
    return "| " + " | ".join(cells) + " |"


def table_lines(head: list[str], rows: list[list[str]]) -> list[str]:
    """A Markdown table: the header line, its rule and one line per row of cells."""
    return [_line(head), "|" + "---|" * len(head), *(_line(r) for r in rows)]


def _text(setup: str, lines: list[str]) -> str:
    """A line on the setup, a blank line, then ``lines``, newline-terminated."""
    return "\n".join([setup, "", *lines]) + "\n"


def mean_spread(values: list[float], scale: float) -> str:
    """Mean ± sample standard deviation of ``values * scale`` to 0.1 (one value: itself)."""
    values = [v * scale for v in values]
    if len(values) == 1:
        return f"{values[0]:.1f}"
    return f"{statistics.mean(values):.1f} ± {statistics.stdev(values):.1f}"


def output_error(rows: list[dict], key: str = "output_rel_mse") -> str:
    """Mean ± spread of an output error (a relative MSE, a KL divergence) over the rows (rows of
    older runs may have none: ``-`` when no row has it)."""
    values = [r[key] for r in rows if r.get(key) is not None]
    if len(values) > 1:
        return f"{statistics.mean(values):.4f} ± {statistics.stdev(values):.4f}"
    return f"{values[0]:.4f}" if values else "-"


def _recon_lines(
    model: str,
    bits: int,
    method: str,
    runs: list[dict],
    with_kl: bool = False,
    with_map: bool = False,
) -> list[str]:
    """The lines of one (model, bits, method): one per metric, or one with the runs' errors;
    ``with_kl``: with the held-out KL column; ``with_map``: with the metric on held-out
    calibration-split images (a detector's ``heldout_map``)."""
    ok = [r for r in runs if "error" not in r]
    head = [model, f"W{bits}A{bits}", method, str(len(ok))]
    if not ok:
        errors = "; ".join(r["error"] for r in runs if "error" in r)
        # empty cells of one space here, as in the tables written so far
        return [f"{_line(head)} | | | {errors} |" + " |" * (6 + with_kl + with_map)]
    shared = [
        output_error(ok),
        output_error(ok, "heldout_rel_mse"),
        *([output_error(ok, "heldout_kl")] if with_kl else []),
        f"{statistics.mean(r.get('block_passes', 0) for r in ok):.0f}",
        f"{statistics.mean(r['recon_s'] for r in ok):.0f}",
        f"{max(r['peak_host_mb'] for r in ok):.0f}",
    ]
    metrics, pct = METRICS[model]
    lines = []
    for metric in metrics:
        quant = [r["quant"][metric] for r in ok]
        per_seed = " ".join(f"{pct * v:.1f}" for v in quant)
        fp = f"{pct * ok[0]['fp'][metric]:.1f}"
        cells = [*head, metric, fp, mean_spread(quant, pct), per_seed, *shared]
        if with_map:
            held = [r["heldout_map"][metric] for r in ok if r.get("heldout_map")]
            cells.insert(len(head) + 4, mean_spread(held, pct) if held else "-")
        lines.append(_line(cells))
    return lines


def recon_table(rows: list[dict]) -> str:
    """``benchmark_recon.py``: one line per (model, bits, method, metric), in the order first
    run: mean ± sample std over the seeds run, in percent; the per-seed values in seed order."""
    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        groups.setdefault((r["model"], r["bits"], r["method"]), []).append(r)
    with_kl = any(r.get("heldout_kl") is not None for r in rows)  # runs since it is measured
    with_map = any(r.get("heldout_map") for r in rows)  # benchmark_recon.py --score-heldout
    head = list(RECON_HEAD)
    if with_kl:
        head.insert(head.index("held-out calib") + 1, "held-out KL")
    if with_map:
        head.insert(head.index("per seed") + 1, "on held-out calib images")
    lines = table_lines(head, [])
    for key, runs in groups.items():
        lines += _recon_lines(*key, sorted(runs, key=lambda r: r["seed"]), with_kl, with_map)
    return "\n".join(lines) + "\n"


def step_table(data: dict) -> str:
    """``benchmark_step.py``: the settings in one line, then one table line per row."""
    m = data["meta"]
    setup = (
        f"Reconstruction step vs FP forward+backward, {m['model']} at W{m['bits']}A{m['bits']}: "
        f"{m['iters']} steps per unit (median over steps 2-{m['iters']}), FP median of "
        f"{m['repeats']} after {m['warmup']} warm-up, {m['threads']} thread(s), torch "
        f"{m['torch']}, {m['cpu']}, load average {m['load_average_at_start']:.2f} at the start."
    )
    rows = [
        [
            str(r["level"]),
            r["unit_type"],
            r["name"],
            str(r["blocks"]),
            f"{r['block_passes']:g}",
            "x".join(map(str, r["batch_shape"])),
            f"{r['fp_fwd_bwd_ms']:.2f}",
            f"{r['step_ms']:.2f}",
            f"{r['ratio']:.2f}",
            f"{r['step_ms'] / r['block_passes']:.2f}",
        ]
        for r in data["rows"]
    ]
    return _text(setup, table_lines(STEP_HEAD, rows))


def _cache_row(r: dict) -> list[str]:
    e, c, m, t = r["extrapolated"], r["cache"], r["memory_mib"], r["seconds"]
    limit = "none" if r["cache_limit_gb"] is None else f"{r['cache_limit_gb']:.3f}"
    return [
        r["model"],
        str(r["images"]),
        limit,
        f"{c['max_memory_bytes'] / 1e9:.3f}",
        f"{c['max_disk_bytes'] / 1e9:.3f}",
        *(f"{m[f'peak_{k}_mib']:.0f}" for k in ("VmRSS", "RssAnon", "RssFile")),
        *(str(t[k]) for k in ("caches", "steps", "spill", "run")),
        f"{e['peak_cache_gb']:.1f}",
        f"{e['largest_unit_gb']:.1f} ({e['largest_unit']})",
    ]


def _spill_lines(t: dict) -> list[str]:
    """The spill timing measured alone, after a blank line."""
    return [
        "",
        f"Spilling, measured alone ({t['tensors']} fp16 tensors of {t['tensor_shape']}, "
        f"{t['bytes'] / 1e6:.0f} MB; best of 3): storing {t['store_memory_gb_per_s']:.2f} "
        f"GB/s in memory, {t['store_disk_gb_per_s']:.2f} GB/s written to disk; drawing a "
        f"step's batch {t['draw_memory_ms_per_step']:.1f} ms from memory, "
        f"{t['draw_disk_ms_per_step']:.1f} ms from the memory-mapped files (warm page cache).",
    ]


def cache_table(data: dict) -> str:
    """``benchmark_cache.py``: the runs' table, the spill timing and the per-unit bytes of the
    no-limit runs."""
    s = data["settings"]
    n = s["coco_images"]
    setup = (
        f"Calibration images at {s['size'][0]}x{s['size'][1]} (padded to a multiple of 32), "
        f"{s['method']}, whole detector, {s['cache_dtype'].replace('float', 'fp')} caches, "
        f"batch 1, {s['iters']} steps per unit, one thread; torch {data['env']['torch']}, "
        f"{data['env']['cpu']}. Bytes counted by the CacheStore; RSS sampled every 0.1 s. "
        f"Extrapolated linearly to {n} images."
    )
    head = [*CACHE_HEAD, f"peak caches at {n} img GB", "largest unit there GB"]
    lines = table_lines(head, [_cache_row(r) for r in data["rows"]])
    if data.get("spill_timing"):
        lines += _spill_lines(data["spill_timing"])
    nolimit = [r for r in data["rows"] if r["cache_limit_gb"] is None]
    by_unit = [r["extrapolated"]["by_unit_gb"] for r in nolimit]
    units = [[name, *(str(b.get(name, "")) for b in by_unit)] for name in by_unit[0]]
    lines += [
        "",
        f"Per unit, bytes held (memory + disk) extrapolated to {n} images, GB (no-limit runs):",
        "",
        *table_lines(["unit", *(r["model"] for r in nolimit)], units),
    ]
    return _text(setup, lines)


def _kernels(row: dict, floats_key: str) -> str:
    """The integer kernels onnxruntime ran for an export, and its float ones in brackets."""
    if "integer_kernels" not in row:
        return ""
    ints = ", ".join(f"{n} {op}" for op, n in row["integer_kernels"].items()) or "none"
    return f"{ints} ({row[floats_key]})"


def _onnxruntime(data: dict, latency: bool) -> str:
    """The end of an export table's setup line: CPU flags, onnxruntime version and, with
    ``latency``, how the latency was measured."""
    note = f"; latency: {data['latency_method']}" if latency else ""
    return (
        f"CPU flags {' '.join(data['machine']['cpu_flags'])}, onnxruntime "
        f"{data['versions']['onnxruntime']}{note}."
    )


def export_table(data: dict, latency: bool = False) -> str:
    """``benchmark_export.py --models vit``: top-1, size, latency at batch 1 and 32 and kernels
    per variant, then the int8 export's speed-up and top-1 change; ``latency`` adds how the
    latency was measured to the setup line."""
    cols = [f"threads{t}_batch{b}" for t in data["torch_threads"] for b in (1, 32)]
    head = ["variant", "top-1 (%)", "size (MB)"]
    head += [f"ms, {t} thr, batch {b}" for t in data["torch_threads"] for b in (1, 32)]
    head += ["integer kernels (float matmuls)"]
    rows = []
    for name, row in data["variants"].items():
        lat = [f"{row['latency_ms'][c]:.2f}" if c in row["latency_ms"] else "" for c in cols]
        size = f"{row['bytes'] / 1e6:.2f}" if "bytes" in row else ""
        rows.append([name, f"{row['top1']:.1f}", size, *lat, _kernels(row, "float_matmuls")])
    speed = ", ".join(
        f"{c.replace('_', ' ')}: {v:.2f}x"
        for c, v in data["int8_vs_fp32_onnxruntime_speedup"].items()
    )
    setup = f"Demo ViT ({data['val_images']} val images), {_onnxruntime(data, latency)}"
    return _text(
        setup,
        [
            *table_lines(head, rows),
            "",
            f"int8 onnxruntime speed-up over FP32 onnxruntime: {speed}. int8 top-1 minus the "
            "fake-quant model's it is exported from: "
            f"{data['int8_top1_minus_fake_quant_top1']:+.2f} points.",
        ],
    )


SIZES_EXPORTS = {"fp32": "FP32", "int8": "int8", "int8_signed": "int8, signed weights"}


def export_sizes_table(data: dict, latency: bool = False) -> str:
    """``benchmark_export.py --models sizes``: FP32 and int8 onnxruntime latency per model,
    batch and thread count, then what the kernels' time goes to at batch 1 (the profile's
    operator types above 2 %); ``latency`` adds how the latency was measured to the setup
    line."""
    head = ["model", "input", "batch", "threads", "FP32 ms", "int8 ms", "speed-up"]
    head += ["int8, signed weights ms", "speed-up"]
    rows = [
        [
            r["model"],
            "x".join(map(str, r["input_size"])),
            str(r["batch"]),
            str(r["threads"]),
            f"{r['fp32_ms']:.1f}",
            f"{r['int8_ms']:.1f}",
            f"{r['speedup']:.2f}x",
            f"{r['int8_signed_ms']:.1f}",
            f"{r['speedup_signed']:.2f}x",
        ]
        for r in data["models"]
    ]
    profiles = [
        [name, SIZES_EXPORTS[key], ", ".join(f"{op} {v:.0f}" for op, v in shares.items() if v >= 2)]
        for name, export in data["exports"].items()
        for key, shares in export["profile_batch1_threads1"].items()
    ]
    setup = f"{data['quantization']}; {_onnxruntime(data, latency)}"
    return _text(
        setup,
        [
            *table_lines(head, rows),
            "",
            "Share of the kernels' time (%) per operator type, batch 1, 1 thread (onnxruntime's "
            "profile):",
            "",
            *table_lines(["model", "export", "operator types (%)"], profiles),
        ],
    )


def _pair(maps: dict) -> str:
    """Box / mask mAP in %."""
    return " / ".join(
        f"{100 * maps[k]:.1f}" for k in ("coco/bbox_mAP", "coco/segm_mAP") if k in maps
    )


def _parity_cells(row: dict) -> list[str]:
    """A detector export's mAP in PyTorch and onnxruntime, their difference, the float-rounding
    floor and the features' largest difference; empty for the variants without an export."""
    if "parity" not in row:
        return [""] * 5
    p = row["parity"]
    diff = " / ".join(f"{100 * (p['onnxruntime'][k] - p['pytorch'][k]):+.1f}" for k in p["pytorch"])
    floor = ", ".join(_pair(r) for r in row["rounding_floor"] or [])
    feats = f"{p['features']['max_diff_over_range']:.4f}"
    return [_pair(p["pytorch"]), _pair(p["onnxruntime"]), diff, floor, feats]


def export_det_table(data: dict, latency: bool = False) -> str:
    """``benchmark_export.py --models det``: per variant the box and mask mAP parity of the
    exported backbone and neck, size, latency at batch 1 and kernels; ``latency`` adds how the
    latency was measured to the setup line."""
    threads = data["torch_threads"]
    head = [*EXPORT_DET_HEAD, *(f"ms, {t} thr, batch 1" for t in threads)]
    head.append("integer kernels (float convs + matmuls)")
    rows = [
        [
            name,
            *_parity_cells(row),
            f"{row['bytes'] / 1e6:.2f}",
            *(f"{row['latency_ms'][f'threads{t}_batch1']:.1f}" for t in threads),
            _kernels(row, "float_convs_matmuls"),
        ]
        for name, row in data["variants"].items()
    ]
    h, w = data["input_size"]
    setup = (
        f"Demo Mask R-CNN Swin ({data['val_images']} val images), backbone and neck in "
        f"onnxruntime at 1x3x{h}x{w}, RPN and RoI heads in PyTorch; {_onnxruntime(data, latency)}"
    )
    return _text(setup, table_lines(head, rows))


def vitdet_parity_table(data: dict) -> str:
    """``tools/check_vitdet_parity.py``: per image size, how far our ViTDet Mask R-CNN (loaded
    strictly from a checkpoint of MMDetection's own modules) is from MMDetection's."""
    head = [
        "image",
        "backbone map: rel. diff",
        "neck maps: max rel. diff",
        "detections (MMDetection / ours)",
        "matched (same class, box within 0.01 px)",
        "boxes: max diff (px)",
        "scores: max diff",
        "mask pixels differing (fraction)",
    ]
    rows = []
    for r in data["parity"]:
        same = "boxes_max_abs_diff_px" in r
        rows.append(
            [
                "x".join(str(v) for v in r["size"]),
                f"{r['backbone_rel_diff']:.1e}",
                f"{max(r['neck_rel_diff']):.1e}",
                " / ".join(str(n) for n in r["detections"]),
                f"{r['matched_within_0.01px']} / {r['detections'][0]}" if same else "-",
                f"{r['boxes_max_abs_diff_px']:.4f}" if same else "-",
                f"{r['scores_max_abs_diff']:.1e}" if same else "-",
                f"{r['mask_pixels_differing']:.1e}" if same else "-",
            ]
        )
    commit = data.get("mmdet_root_commit") or "not a git checkout"
    setup = (
        f"`{data['config']}` against MMDetection's `{data['peer_config']}` (source at {commit}): "
        f"{data['checkpoint_keys']} tensors ({data['checkpoint_parameters'] / 1e6:.1f} M "
        f"values) loaded strictly; random image, seed {data['seed']}, {data['threads']} threads"
    )
    return _text(setup, table_lines(head, rows))
