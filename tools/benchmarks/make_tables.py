"""Write docs/benchmarks.md and the README's headline table from the committed benchmark JSON.

Every table of the user documentation is made here from ``benchmarks/<name>/benchmark.json``
(the rows the benchmark scripts of ``tools/benchmarks/`` wrote), never typed by hand, so a
table cannot drift from its measurements. The prose of each benchmark (what was run, the exact
command, seeds, what stays in floating point, caveats) lives beside its JSON in
``benchmarks/<name>/about.md``; the line ``<!-- table -->`` there marks where the table goes.

    python tools/benchmarks/make_tables.py            # rewrite docs/benchmarks.md and README.md
    python tools/benchmarks/make_tables.py --check    # exit 1 if either is stale

The tables are the ones the benchmark scripts write next to their JSON, by the same functions
(:mod:`pfcr_mm.benchmark_tables`), with a line more under a ``benchmark_recon.py`` table (the
preset and seeds), the latency method in an export table's setup line and without the title
``benchmark_cache.py`` puts over its table. In ``README.md`` only the text between
``<!-- headline:begin -->`` and ``<!-- headline:end -->`` is rewritten.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from pfcr_mm.benchmark_tables import (
    METRICS,
    cache_table,
    export_det_table,
    export_sizes_table,
    export_table,
    mean_spread,
    recon_table,
    step_table,
    vitdet_parity_table,
)

ROOT = Path(__file__).resolve().parents[2]
BENCHMARKS = ROOT / "benchmarks"
DOC = ROOT / "docs" / "benchmarks.md"
README = ROOT / "README.md"
TABLE_MARK = "<!-- table -->"
HEADLINE_BEGIN = "<!-- headline:begin -->"
HEADLINE_END = "<!-- headline:end -->"

# the order of docs/benchmarks.md; every benchmarks/<name>/ must be listed (checked)
ORDER = [
    "demo_recon_objectives",
    "demo_recon_quick_w3a3",
    "demo_recon_quick_w3a3_rel",
    "demo_recon_hard_tail",
    "demo_recon_head_bits",
    "demo_recon_val10k",
    "demo_recon_val10k_quick",
    "demo_recon_vit_config",
    "demo_recon_post_gelu",
    "demo_recon_post_gelu_quick",
    "demo_recon_renorm_quick",
    "demo_recon_attn4_quick",
    "demo_recon_vit_renorm",
    "demo_recon_gptq",
    "demo_recon_step_rate",
    "demo_recon_current",
    "demo_recon_fast",
    "demo_recon",
    "demo_det_config_levels",
    "demo_det_renorm",
    "demo_det_post_gelu",
    "demo_det_block_200",
    "demo_det_speed",
    "demo_det_w3a3_levels",
    "demo_det_w3a3_renorm",
    "demo_det_w3a3_speed",
    "demo_det_w3a3_config",
    "demo_det_attn4_w3a3",
    "demo_det_head_steps",
    "demo_det_head_bits",
    "demo_det_hard_tail",
    "demo_det_step_rate",
    "demo_det_outside_iters",
    "demo_det_outside_iters_calib64",
    "demo_det_outside_iters_by_unit",
    "demo_det_heads",
    "demo_det_choice",
    "demo_det",
    "demo_det_vitdet",
    "demo_det_vitdet_step_rate",
    "demo_det_vitdet_hard_tail",
    "demo_det_vitdet_head_bits",
    "demo_det_vitdet_renorm",
    "demo_det_vitdet_attn4_w3a3",
    "vitdet_parity",
    "demo_calib_gptq",
    "demo_calib_gptq_renorm",
    "demo_det_calib_gptq",
    "demo_det_vitdet_calib_gptq",
    "demo_det_vitdet_gptq_deconv",
    "demo_calib_choice",
    "demo_calib_choice_det",
    "demo_calib",
    "demo_calib_heldout512",
    "step",
    "cache",
    "export",
    "export_det",
    "export_sizes",
]

INTRO = """# Benchmarks

Every measurement behind the documentation, on the embedded demo models (a tiny ViT classifier
of 6 blocks on 32x32 shapes, 1000 val images; a tiny Swin Mask R-CNN of 3 stages of 2 blocks
and a tiny ViTDet Mask R-CNN of 4 plain blocks, 100 val images), on a 2-core CPU machine. Each
section says what was run (the exact commands), on which seeds, and what stays in floating
point; its table comes from the committed
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

# The README's headline, one line per (model, metric, bits): FP and, per column, the mean ± std
# over the seeds of one method of one benchmark. The ViT's calib column comes from the
# calibration benchmark (the reconstruction benchmark ran calib on one seed only); the calib +
# GPTQ column from the GPTQ benchmarks, and the detectors' calib columns too (the same runs,
# this code; ViTDet's calib + GPTQ from the later runs that round its transposed convolutions
# too, calibration alone being unchanged by that).
# The last column: the settings of each model's demo PFCR config today (the ViT's and ViTDet's
# W4A4 configs at both widths; the Swin detector's W4A4 and W3A3 configs).
CONFIG = "pfcr, demo config"
CALIB, GPTQ = "calib alone", "calib + GPTQ (default)"
HEADLINE_COLUMNS = [CALIB, GPTQ, "block", "pfcr", "pfcr, KL + layers", CONFIG]
VIT_COLUMNS = {
    CALIB: ("demo_calib_choice", "calib"),
    GPTQ: ("demo_calib_gptq", "calib_gq"),
    "block": "block",
    "pfcr": "pfcr_anneal",
    "pfcr, KL + layers": "pfcr_kl_layerwise",
    CONFIG: ("demo_recon_vit_renorm", "pfcr_kl_layerwise_rel_ht30_h8_ga_rn"),
}
DET_COLUMNS = {"block": "block", "pfcr": "pfcr_anneal"}  # no KL: no logits


SWIN_COLUMNS = {
    **DET_COLUMNS,
    CALIB: ("demo_det_calib_gptq", "calib"),
    GPTQ: ("demo_det_calib_gptq", "calib_gq"),
}
SWIN_W4 = {**SWIN_COLUMNS, CONFIG: ("demo_det_config_levels", "pfcr_anneal_rel_ht30_h8")}
SWIN_W3 = {**SWIN_COLUMNS, CONFIG: ("demo_det_w3a3_levels", "pfcr_anneal_rel_ht30_h8")}
VITDET_COLUMNS = {
    **DET_COLUMNS,
    CALIB: ("demo_det_vitdet_calib_gptq", "calib"),
    GPTQ: ("demo_det_vitdet_gptq_deconv", "calib_gq"),  # its transposed convolutions too
    CONFIG: ("demo_det_vitdet_head_bits", "pfcr_anneal_rel_h8"),
}
SWIN, VITDET = "Demo Mask R-CNN Swin", "Demo Mask R-CNN ViTDet"
BOX, MASK = "coco/bbox_mAP", "coco/segm_mAP"
# (label, model, bits, benchmark, metric, {column: method, or (benchmark, method); a column
# left out: -})
HEADLINE = [
    ("Demo ViT, top-1 (%)", "cls", 4, "demo_recon_objectives", "accuracy/top1", VIT_COLUMNS),
    ("Demo ViT, top-1 (%)", "cls", 3, "demo_recon_objectives", "accuracy/top1", VIT_COLUMNS),
    (f"{SWIN}, box mAP (%)", "det", 4, "demo_det_choice", BOX, SWIN_W4),
    (f"{SWIN}, mask mAP (%)", "det", 4, "demo_det_choice", MASK, SWIN_W4),
    (f"{SWIN}, box mAP (%)", "det", 3, "demo_det", BOX, SWIN_W3),
    (f"{SWIN}, mask mAP (%)", "det", 3, "demo_det", MASK, SWIN_W3),
    (f"{VITDET}, box mAP (%)", "det_vitdet", 4, "demo_det_vitdet", BOX, VITDET_COLUMNS),
    (f"{VITDET}, mask mAP (%)", "det_vitdet", 4, "demo_det_vitdet", MASK, VITDET_COLUMNS),
    (f"{VITDET}, box mAP (%)", "det_vitdet", 3, "demo_det_vitdet", BOX, VITDET_COLUMNS),
    (f"{VITDET}, mask mAP (%)", "det_vitdet", 3, "demo_det_vitdet", MASK, VITDET_COLUMNS),
]


def load(name: str) -> dict:
    return json.loads((BENCHMARKS / name / "benchmark.json").read_text())


def recon_settings(data: dict) -> str:
    """The preset line under a recon table, from the JSON's own settings."""
    keys = ["preset", "iters", "cls_images", "det_images", "cls_heldout", "w_lr", "a_lr"]
    keys += ["max_level"]
    parts = [f"`{k}={data[k]}`" for k in keys if k in data]
    parts += [f"`{o}`" for o in data.get("options", [])]  # --options, after each method's
    seeds = " ".join(str(s) for s in data["seeds"])
    return f"Settings in the JSON: {', '.join(parts)}; seeds {seeds}.\n"


def table_for(data: dict) -> str:
    """The table of a benchmark JSON, by which script wrote it (told apart by its keys)."""
    if "preset" in data:
        return recon_table(data["rows"]) + "\n" + recon_settings(data)
    if "meta" in data:
        return step_table(data)
    if "spill_timing" in data or "settings" in data:
        return cache_table(data)
    if "models" in data:
        return export_sizes_table(data, latency=True)
    if "input_size" in data:
        return export_det_table(data, latency=True)
    if "parity" in data:
        return vitdet_parity_table(data)
    if "variants" in data:
        return export_table(data, latency=True)
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
    for label, model, bits, bench, metric, columns in HEADLINE:
        cells, sources, fps, seeds = [], {bench}, set(), set()
        for col in HEADLINE_COLUMNS:
            spec = columns.get(col)
            if spec is None:
                cells.append("-")
                continue
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
