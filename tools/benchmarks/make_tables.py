"""Write docs/benchmarks.md and the README's headline table from the committed benchmark JSON.

Every table of the user documentation is made here from ``benchmarks/<name>/benchmark.json``
(the rows the benchmark scripts of ``tools/benchmarks/`` wrote), never typed by hand, so a
table cannot drift from its measurements. The prose of each benchmark (what was run, the exact
command, seeds, what stays in floating point, caveats) lives beside its JSON in
``benchmarks/<name>/about.md``; the line ``<!-- table -->`` there marks where the table goes.

    python tools/benchmarks/make_tables.py            # rewrite docs/benchmarks.md and README.md
    python tools/benchmarks/make_tables.py --check    # exit 1 if either is stale

Tables follow the Markdown the benchmark scripts write next to their JSON (same columns, same
rounding): for ``benchmark_recon.py`` one line per (model, bits, method, metric) with the mean
± sample standard deviation over the seeds. In ``README.md`` only the text between
``<!-- headline:begin -->`` and ``<!-- headline:end -->`` is rewritten. Standard library only.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
BENCHMARKS = ROOT / "benchmarks"
DOC = ROOT / "docs" / "benchmarks.md"
README = ROOT / "README.md"
TABLE_MARK = "<!-- table -->"
HEADLINE_BEGIN = "<!-- headline:begin -->"
HEADLINE_END = "<!-- headline:end -->"

# the order of docs/benchmarks.md; every benchmarks/<name>/ must be listed (checked)
ORDER = [
    "demo_recon_fast",
    "demo_recon",
    "demo_det_choice",
    "demo_det",
    "demo_calib_choice",
    "demo_calib_choice_det",
    "demo_calib",
    "demo_calib_heldout512",
    "step",
    "cache",
    "export",
    "export_det",
]

INTRO = """# Benchmarks

Every measurement behind the documentation, on the embedded demo models (a tiny ViT classifier
of 6 blocks on 32x32 shapes, 1000 val images; a tiny Swin Mask R-CNN of 3 stages of 2 blocks,
100 val images), on a 2-core CPU machine. Each section says what was run (the exact commands),
on which seeds, and what stays in floating point; its table comes from the committed
`benchmarks/<name>/benchmark.json`. Numbers are mean ± sample standard deviation over the seeds
(the `seeds` column), in percent for accuracy and mAP. The output error is the relative MSE of
the model's outputs (a classifier's logits, a detector's backbone+neck features) on the first
evaluation images ("eval") and on held-out calibration-split images that calibration did not see
("held-out calib"): defaults are chosen on the held-out images, never on evaluation images.
`block-passes` is the reconstruction compute (one transformer block's forward and backward over
one batch, [method 4](method.md#4-optimization)); `recon s` the seconds of optimizer steps.

In every row unless a section says otherwise, LayerNorm, Softmax and GELU (and in the detector
RoIAlign, the mask head's transposed convolution, NMS and the box decoding) stay in floating
point, and the image enters the patch embedding at 8 bits, which is kinder than RepQ-ViT's
public code (it quantizes that input, and the classifier head, at the model's bits). The demo
models are tiny and their tasks easy: the tables compare methods at equal compute on the same
images, they are not the paper's ImageNet or COCO numbers (none of those were run here;
[method 6](method.md#6-published-numbers) lists the published ones).

Regenerate after a benchmark run with `.venv/bin/python tools/benchmarks/make_tables.py`
(`--check` exits 1 when this file or the README's headline table is stale).
"""

# metrics of each demo model and the factor to percent (classifier accuracy is already in %)
METRICS = {
    "cls": (["accuracy/top1"], 1),
    "det": (["coco/bbox_mAP", "coco/segm_mAP"], 100),
}

# The README's headline, one line per (model, metric, bits): FP and, per column, the mean ± std
# over the seeds of one method of one benchmark. The ViT's calib column comes from the
# calibration benchmark (the reconstruction benchmark ran no calib rows).
HEADLINE_COLUMNS = ["calib", "block", "pfcr"]
VIT_COLUMNS = {"calib": ("demo_calib_choice", "calib"), "block": "block", "pfcr": "pfcr_anneal"}
DET_COLUMNS = {"calib": "calib", "block": "block", "pfcr": "pfcr_anneal"}
# (label, bits, benchmark, metric, {column: method, or (benchmark, method)})
HEADLINE = [
    ("Demo ViT, top-1 (%)", 4, "demo_recon_fast", "accuracy/top1", VIT_COLUMNS),
    ("Demo ViT, top-1 (%)", 3, "demo_recon_fast", "accuracy/top1", VIT_COLUMNS),
    ("Demo Mask R-CNN Swin, box mAP (%)", 4, "demo_det_choice", "coco/bbox_mAP", DET_COLUMNS),
    ("Demo Mask R-CNN Swin, mask mAP (%)", 4, "demo_det_choice", "coco/segm_mAP", DET_COLUMNS),
    ("Demo Mask R-CNN Swin, box mAP (%)", 3, "demo_det", "coco/bbox_mAP", DET_COLUMNS),
    ("Demo Mask R-CNN Swin, mask mAP (%)", 3, "demo_det", "coco/segm_mAP", DET_COLUMNS),
]


def load(name: str) -> dict:
    return json.loads((BENCHMARKS / name / "benchmark.json").read_text())


# --- tools/benchmarks/benchmark_recon.py -------------------------------------------------------


def mean_spread(values: list[float], scale: float) -> str:
    values = [v * scale for v in values]
    if len(values) == 1:
        return f"{values[0]:.1f}"
    return f"{statistics.mean(values):.1f} ± {statistics.stdev(values):.1f}"


def output_error(rows: list[dict], key: str = "output_rel_mse") -> str:
    values = [r[key] for r in rows if r.get(key) is not None]
    if len(values) > 1:
        return f"{statistics.mean(values):.4f} ± {statistics.stdev(values):.4f}"
    return f"{values[0]:.4f}" if values else "-"


def recon_groups(rows: list[dict]) -> dict[tuple, list[dict]]:
    """Rows by (model, bits, method), in the order first seen."""
    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        groups.setdefault((r["model"], r["bits"], r["method"]), []).append(r)
    return groups


def recon_table(data: dict) -> str:
    """One line per (model, bits, method, metric): mean ± sample std over the seeds run."""
    lines = [
        "| model | bits | method | seeds | metric (%) | FP | quantized | per seed | "
        "output rel. MSE, eval | held-out calib | block-passes | recon s | peak host MiB |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for (model, bits, method), rs in recon_groups(data["rows"]).items():
        ok = [r for r in rs if "error" not in r]
        errors = "; ".join(r["error"] for r in rs if "error" in r)
        head = f"| {model} | W{bits}A{bits} | {method} | {len(ok)} |"
        if not ok:
            lines.append(f"{head} | | | {errors} | | | | | | |")
            continue
        metrics, pct = METRICS[model]
        for metric in metrics:
            quant = [r["quant"][metric] for r in ok]
            lines.append(
                f"{head} {metric} | {pct * ok[0]['fp'][metric]:.1f} | "
                f"{mean_spread(quant, pct)} | {' '.join(f'{pct * v:.1f}' for v in quant)} | "
                f"{output_error(ok)} | {output_error(ok, 'heldout_rel_mse')} | "
                f"{statistics.mean(r.get('block_passes', 0) for r in ok):.0f} | "
                f"{statistics.mean(r['recon_s'] for r in ok):.0f} | "
                f"{max(r['peak_host_mb'] for r in ok):.0f} |"
            )
    return "\n".join(lines) + "\n"


def recon_settings(data: dict) -> str:
    """The preset line under a recon table, from the JSON's own settings."""
    keys = ["preset", "iters", "cls_images", "det_images", "cls_heldout", "w_lr", "a_lr"]
    keys += ["max_level"]
    parts = [f"`{k}={data[k]}`" for k in keys if k in data]
    seeds = " ".join(str(s) for s in data["seeds"])
    return f"Settings in the JSON: {', '.join(parts)}; seeds {seeds}.\n"


# --- tools/benchmarks/benchmark_step.py --------------------------------------------------------


def step_table(data: dict) -> str:
    m = data["meta"]
    lines = [
        f"Reconstruction step vs FP forward+backward, {m['model']} at W{m['bits']}A{m['bits']}: "
        f"{m['iters']} steps per unit (median over steps 2-{m['iters']}), FP median of "
        f"{m['repeats']} after {m['warmup']} warm-up, {m['threads']} thread(s), torch "
        f"{m['torch']}, {m['cpu']}, load average {m['load_average_at_start']:.2f} at the start.",
        "",
        "| level | unit type | unit | blocks | block passes | batch | FP fwd+bwd ms | step ms | "
        "step / FP | step ms per block pass |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in data["rows"]:
        lines.append(
            f"| {r['level']} | {r['unit_type']} | {r['name']} | {r['blocks']} | "
            f"{r['block_passes']:g} | {'x'.join(map(str, r['batch_shape']))} | "
            f"{r['fp_fwd_bwd_ms']:.2f} | {r['step_ms']:.2f} | {r['ratio']:.2f} | "
            f"{r['step_ms'] / r['block_passes']:.2f} |"
        )
    return "\n".join(lines) + "\n"


# --- tools/benchmarks/benchmark_cache.py -------------------------------------------------------


def cache_table(data: dict) -> str:
    s = data["settings"]
    n = s["coco_images"]
    lines = [
        f"Calibration images at {s['size'][0]}x{s['size'][1]} (padded to a multiple of 32), "
        f"{s['method']}, whole detector, {s['cache_dtype'].replace('float', 'fp')} caches, "
        f"batch 1, {s['iters']} steps per unit, one thread; torch {data['env']['torch']}, "
        f"{data['env']['cpu']}. Bytes counted by the CacheStore; RSS sampled every 0.1 s. "
        f"Extrapolated linearly to {n} images.",
        "",
        "| model | images | limit GB | cache peak in memory GB | on disk GB | peak RSS MiB "
        "| peak anon MiB | peak file MiB | caches s | steps s | spill s | run s | "
        f"peak caches at {n} img GB | largest unit there GB |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in data["rows"]:
        e, c, m, t = r["extrapolated"], r["cache"], r["memory_mib"], r["seconds"]
        limit = "none" if r["cache_limit_gb"] is None else f"{r['cache_limit_gb']:.3f}"
        lines.append(
            f"| {r['model']} | {r['images']} | {limit} | {c['max_memory_bytes'] / 1e9:.3f} | "
            f"{c['max_disk_bytes'] / 1e9:.3f} | {m['peak_VmRSS_mib']:.0f} | "
            f"{m['peak_RssAnon_mib']:.0f} | {m['peak_RssFile_mib']:.0f} | {t['caches']} | "
            f"{t['steps']} | {t['spill']} | {t['run']} | {e['peak_cache_gb']:.1f} | "
            f"{e['largest_unit_gb']:.1f} ({e['largest_unit']}) |"
        )
    t = data.get("spill_timing")
    if t:
        lines += [
            "",
            f"Spilling, measured alone ({t['tensors']} fp16 tensors of {t['tensor_shape']}, "
            f"{t['bytes'] / 1e6:.0f} MB; best of 3): storing {t['store_memory_gb_per_s']:.2f} "
            f"GB/s in memory, {t['store_disk_gb_per_s']:.2f} GB/s written to disk; drawing a "
            f"step's batch {t['draw_memory_ms_per_step']:.1f} ms from memory, "
            f"{t['draw_disk_ms_per_step']:.1f} ms from the memory-mapped files (warm page "
            "cache).",
        ]
    lines += [
        "",
        f"Per unit, bytes held (memory + disk) extrapolated to {n} images, GB (no-limit runs):",
        "",
    ]
    nolimit = [r for r in data["rows"] if r["cache_limit_gb"] is None]
    lines.append("| unit | " + " | ".join(r["model"] for r in nolimit) + " |")
    lines.append("|---|" + "---|" * len(nolimit))
    for name in nolimit[0]["extrapolated"]["by_unit_gb"]:
        vals = [str(r["extrapolated"]["by_unit_gb"].get(name, "")) for r in nolimit]
        lines.append(f"| {name} | " + " | ".join(vals) + " |")
    return "\n".join(lines) + "\n"


# --- tools/benchmarks/benchmark_export.py ------------------------------------------------------


def _kernels(row: dict, floats_key: str) -> str:
    if "integer_kernels" not in row:
        return ""
    ints = ", ".join(f"{n} {op}" for op, n in row["integer_kernels"].items()) or "none"
    return f"{ints} ({row[floats_key]})"


def export_table(data: dict) -> str:
    threads = data["torch_threads"]
    cols = [f"threads{t}_batch{b}" for t in threads for b in (1, 32)]
    head = ["variant", "top-1 (%)", "size (MB)"]
    head += [f"ms, {t} thr, batch {b}" for t in threads for b in (1, 32)]
    head += ["integer kernels (float matmuls)"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name, row in data["variants"].items():
        lat = [f"{row['latency_ms'][c]:.2f}" if c in row["latency_ms"] else "" for c in cols]
        size = f"{row['bytes'] / 1e6:.2f}" if "bytes" in row else ""
        cells = [name, f"{row['top1']:.1f}", size, *lat, _kernels(row, "float_matmuls")]
        lines.append("| " + " | ".join(cells) + " |")
    speed = ", ".join(
        f"{c.replace('_', ' ')}: {v:.2f}x"
        for c, v in data["int8_vs_fp32_onnxruntime_speedup"].items()
    )
    return (
        f"Demo ViT ({data['val_images']} val images), CPU flags "
        f"{' '.join(data['machine']['cpu_flags'])}, onnxruntime "
        f"{data['versions']['onnxruntime']}; latency: {data['latency_method']}.\n\n"
        + "\n".join(lines)
        + f"\n\nint8 onnxruntime speed-up over FP32 onnxruntime: {speed}. int8 top-1 minus the "
        f"fake-quant model's it is exported from: "
        f"{data['int8_top1_minus_fake_quant_top1']:+.2f} points.\n"
    )


def _pair(maps: dict) -> str:
    return " / ".join(
        f"{100 * maps[k]:.1f}" for k in ("coco/bbox_mAP", "coco/segm_mAP") if k in maps
    )


def export_det_table(data: dict) -> str:
    threads = data["torch_threads"]
    head = [
        "variant",
        "PyTorch fake-quant box / mask mAP",
        "onnxruntime box / mask mAP",
        "difference (points)",
        "PyTorch, input x (1 + 1e-6 noise), per seed",
        "features: max diff / range",
        "size (MB)",
        *[f"ms, {t} thr, batch 1" for t in threads],
        "integer kernels (float convs + matmuls)",
    ]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name, row in data["variants"].items():
        cells = [name, "", "", "", "", ""]
        if "parity" in row:
            p = row["parity"]
            diff = " / ".join(
                f"{100 * (p['onnxruntime'][k] - p['pytorch'][k]):+.1f}" for k in p["pytorch"]
            )
            floor = ", ".join(_pair(r) for r in row["rounding_floor"] or [])
            feats = f"{p['features']['max_diff_over_range']:.4f}"
            cells[1:] = [_pair(p["pytorch"]), _pair(p["onnxruntime"]), diff, floor, feats]
        cells.append(f"{row['bytes'] / 1e6:.2f}")
        cells += [f"{row['latency_ms'][f'threads{t}_batch1']:.1f}" for t in threads]
        cells.append(_kernels(row, "float_convs_matmuls"))
        lines.append("| " + " | ".join(cells) + " |")
    h, w = data["input_size"]
    return (
        f"Demo Mask R-CNN Swin ({data['val_images']} val images), backbone and neck in "
        f"onnxruntime at 1x3x{h}x{w}, RPN and RoI heads in PyTorch; CPU flags "
        f"{' '.join(data['machine']['cpu_flags'])}, onnxruntime "
        f"{data['versions']['onnxruntime']}; latency: {data['latency_method']}.\n\n"
        + "\n".join(lines)
        + "\n"
    )


# --- assembling --------------------------------------------------------------------------------


def table_for(data: dict) -> str:
    """The table of a benchmark JSON, by which script wrote it (told apart by its keys)."""
    if "preset" in data:
        return recon_table(data) + "\n" + recon_settings(data)
    if "meta" in data:
        return step_table(data)
    if "spill_timing" in data or "settings" in data:
        return cache_table(data)
    if "input_size" in data:
        return export_det_table(data)
    if "variants" in data:
        return export_table(data)
    raise SystemExit("error: a benchmark.json of unknown form")


def section(name: str) -> tuple[str, str]:
    """``(title, markdown)`` of one benchmark: its about.md with the table put in."""
    about_path = BENCHMARKS / name / "about.md"
    if not about_path.is_file():
        raise SystemExit(f"error: {about_path.relative_to(ROOT)} is missing: describe the run")
    about = about_path.read_text().strip("\n") + "\n"
    first = about.splitlines()[0]
    if not first.startswith("## "):
        raise SystemExit(f"error: {about_path.relative_to(ROOT)} must start with a '## ' title")
    source = f"From `benchmarks/{name}/benchmark.json`:\n\n"
    table = source + table_for(load(name))
    if TABLE_MARK in about:
        body = about.replace(TABLE_MARK, table.rstrip("\n"))
    else:
        body = about + "\n" + table
    return first[3:].strip(), body


def anchor(title: str) -> str:
    """GitHub's heading anchor."""
    keep = "".join(c for c in title.lower() if c.isalnum() or c in " -_")
    return keep.replace(" ", "-")


def benchmarks_doc() -> str:
    names = sorted(p.parent.name for p in BENCHMARKS.glob("*/benchmark.json"))
    if sorted(ORDER) != names:
        missing = sorted(set(names) - set(ORDER))
        gone = sorted(set(ORDER) - set(names))
        raise SystemExit(
            f"error: tools/benchmarks/make_tables.py ORDER is out of date: not listed {missing}, "
            f"no JSON for {gone}"
        )
    sections = [section(n) for n in ORDER]
    toc = "\n".join(f"- [{title}](#{anchor(title)})" for title, _ in sections)
    parts = [
        "<!-- Generated by tools/benchmarks/make_tables.py from benchmarks/*/benchmark.json and "
        "benchmarks/*/about.md. Do not edit: edit those and run "
        "`.venv/bin/python tools/benchmarks/make_tables.py`. -->",
        INTRO,
        toc,
        *(body for _, body in sections),
    ]
    return "\n\n".join(p.strip("\n") for p in parts) + "\n"


def _cell(bench: str, model: str, bits: int, method: str, metric: str) -> tuple[str, str, int]:
    """``(mean ± std, FP, seeds)`` of one method over its seeds, in percent."""
    rows = [
        r
        for r in load(bench)["rows"]
        if r["model"] == model and r["bits"] == bits and r["method"] == method and "error" not in r
    ]
    if not rows:
        raise SystemExit(f"error: no rows {model} W{bits}A{bits} {method} in {bench}")
    pct = METRICS[model][1]
    values = [r["quant"][metric] for r in rows]
    return mean_spread(values, pct), f"{pct * rows[0]['fp'][metric]:.1f}", len(rows)


def headline() -> str:
    """The README's table: FP and each method's mean ± std over the seeds, per model and bits."""
    lines = [
        "| model, metric | bits | FP | " + " | ".join(HEADLINE_COLUMNS) + " | seeds | from |",
        "|---|---|---|" + "---|" * len(HEADLINE_COLUMNS) + "---|---|",
    ]
    for label, bits, bench, metric, columns in HEADLINE:
        model = next(m for m, (names, _) in METRICS.items() if metric in names)
        cells, sources, fps, seeds = [], {bench}, set(), set()
        for col in HEADLINE_COLUMNS:
            spec = columns[col]
            b, method = spec if isinstance(spec, tuple) else (bench, spec)
            sources.add(b)
            value, fp, n = _cell(b, model, bits, method, metric)
            cells.append(value)
            fps.add(fp)
            seeds.add(str(n))
        if len(fps) != 1:
            raise SystemExit(f"error: the headline row {label} W{bits}A{bits} mixes FP values")
        links = ", ".join(
            f"[{s}](docs/benchmarks.md#{anchor(section(s)[0])})" for s in sorted(sources)
        )
        lines.append(
            f"| {label} | W{bits}A{bits} | {fps.pop()} | "
            + " | ".join(cells)
            + f" | {'/'.join(sorted(seeds))} | {links} |"
        )
    return "\n".join(lines) + "\n"


def readme_with_headline(text: str) -> str:
    if text.count(HEADLINE_BEGIN) != 1 or text.count(HEADLINE_END) != 1:
        raise SystemExit(f"error: README.md needs one {HEADLINE_BEGIN} and one {HEADLINE_END}")
    before, rest = text.split(HEADLINE_BEGIN)
    _, after = rest.split(HEADLINE_END)
    return before + HEADLINE_BEGIN + "\n" + headline() + HEADLINE_END + after


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--check", action="store_true", help="write nothing; exit 1 if a file is stale")
    args = p.parse_args(argv)
    wanted = {DOC: benchmarks_doc(), README: readme_with_headline(README.read_text())}
    stale = [f for f, text in wanted.items() if not f.is_file() or f.read_text() != text]
    if args.check:
        for path in stale:
            print(
                f"{path.relative_to(ROOT)} is stale: run .venv/bin/python "
                "tools/benchmarks/make_tables.py",
                file=sys.stderr,
            )
        return 1 if stale else 0
    for path in stale:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(wanted[path])
        print(f"wrote {path.relative_to(ROOT)}")
    if not stale:
        print("docs/benchmarks.md and the README's headline are up to date")
    return 0


if __name__ == "__main__":
    sys.exit(main())
