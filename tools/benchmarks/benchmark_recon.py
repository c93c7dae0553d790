"""Ablation of the reconstruction methods on the embedded demo models.

For each demo model, bit width and seed, runs ``tools/ptq.py`` with ``calib``, ``block`` and
``pfcr`` under each progressive optimization strategy (``pfcr_nopos``: none; ``pfcr_two_stage``,
``pfcr_shrink``, ``pfcr_anneal``: POS options (a), (b), (c) of method.md), all on the same
calibration images and at the same compute (``iters`` block forward+backward passes per block;
``pfcr_steps``: the equal-steps budget of earlier versions, for comparison), and writes
``<out>/benchmark.json`` (one row per run) and ``<out>/benchmark.md`` (mean and spread over the
seeds): FP and quantized accuracy or box/mask mAP, the relative MSE of the outputs on held-out
images (logits, or the detector's backbone+neck features), reconstruction time, peak host
memory. The output error is measured twice: on the first evaluation images and on held-out
calibration-split images that calibration did not see; defaults are chosen on the latter. A seed
sets both the calibration images and the reconstruction. ``calib`` uses the default
post-softmax quantizer (chosen per attention); ``calib_log2`` etc. fix one for all.

    python tools/benchmarks/benchmark_recon.py [--preset quick|paper] [--bits 4 3]
        [--models cls det] [--methods calib block ...] [--seeds 0 1 2]
    python tools/benchmarks/benchmark_recon.py --merge a/benchmark.json b/benchmark.json --out DIR
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

from pfcr_mm.benchmark_tables import recon_table
from pfcr_mm.engine.run_dir import last_run_dir
from pfcr_mm.provenance import write_benchmark, write_json

ROOT = Path(__file__).resolve().parents[2]
# model -> config (its metrics in the table: pfcr_mm.benchmark_tables.METRICS)
MODELS = {
    "cls": "configs/demo/demo_vit_shapes_w4a4.py",
    "det": "configs/demo/demo_mask_rcnn_swin_shapes_w4a4.py",
    "det_vitdet": "configs/demo/demo_mask_rcnn_vitdet_shapes_w4a4.py",
}
KL = [
    "ptq.recon.downstream_weight=1",
    "ptq.recon.downstream_metric=kl",
    "ptq.recon.downstream_temperature=4",
]
# the step sizes' rate relative to their size (recon.a_lr_mode), tried on seed 0's held-out
# images (demo ViT, fast preset: a_lr 0.002 / 0.005 / 0.015; the detector at the quick preset)
REL_CLS = ["ptq.recon.a_lr_mode=relative", "ptq.recon.a_lr=0.005"]
W_LR_DET = "ptq.recon.w_lr=0.01"  # the fast preset's w_lr, on the detectors at the quick one
REL_DET = [W_LR_DET, "ptq.recon.a_lr_mode=relative", "ptq.recon.a_lr=0.002"]
# block with the detection configs' objective: the heads against their predictions' divergence,
# 32 RoIs per step; and with REL_DET
BLOCK_TASK = ["ptq.method=block", "ptq.recon.part_loss=task", "ptq.recon.roi_batch_size=32"]
BLOCK_TASK_REL = [*BLOCK_TASK, *REL_DET]
HARD_TAIL = "ptq.recon.hard_tail=0.3"
NECK_BOX_900 = [f"ptq.recon.outside_iters.{u}=900" for u in ("neck", "roi_head.bbox_head")]
# calibration alone: without the GPTQ rounding that recon.compensate="auto" gives calib since
# benchmarks/demo_calib_gptq (the methods ending in _gq have it)
CALIB = ["ptq.method=calib", "ptq.recon.compensate=none"]
METHODS = {
    "calib": CALIB,  # post_softmax "auto", the default
    # calibration with one fixed post-softmax quantizer for every attention
    "calib_log2": [*CALIB, "ptq.quant.post_softmax=log2"],
    "calib_log_sqrt2": [*CALIB, "ptq.quant.post_softmax=log_sqrt2"],
    "calib_uniform": [*CALIB, "ptq.quant.post_softmax=uniform"],
    "block": ["ptq.method=block"],
    "pfcr_nopos": ["ptq.method=pfcr", "ptq.recon.pos=none"],
    "pfcr_two_stage": ["ptq.method=pfcr", "ptq.recon.pos=two_stage"],
    "pfcr_shrink": ["ptq.method=pfcr", "ptq.recon.pos=shrink"],
    "pfcr_anneal": ["ptq.method=pfcr", "ptq.recon.pos=anneal"],
    # the equal-steps budget of earlier versions: coarse steps cost more, 2.7x block's compute
    "pfcr_steps": ["ptq.method=pfcr", "ptq.recon.pos=anneal", "ptq.recon.budget_unit=steps"],
    # the quick PFCR run as it was when issue 9 was filed, whatever the preset: 300 optimizer
    # steps per unit at every level (4860 block-passes on the demo ViT), the peers' learning rates
    "pfcr_before": [
        "ptq.method=pfcr",
        "ptq.recon.budget_unit=steps",
        "ptq.recon.iters=300",
        "ptq.recon.w_lr=0.001",
        "ptq.recon.a_lr=4e-05",
        "ptq.recon.max_level=top",
    ],
    # fewer coarse levels (MHSA/MLP, blocks, pairs), the same compute over 3 levels
    "pfcr_level2": ["ptq.method=pfcr", "ptq.recon.max_level=2"],
    # every level up to the whole encoder (ReconSettings' default), whatever the preset
    "pfcr_top": ["ptq.method=pfcr", "ptq.recon.max_level=top"],
    # the detection-aware objective: block units' errors weighted by the downstream outputs'
    # sensitivity (a detector's FPN, a classifier's logits), half and half with the plain one
    "pfcr_downstream": ["ptq.method=pfcr", "ptq.recon.downstream_weight=1"],
    # the output-aware term with the KL Fisher of the logits (docs/method.md section 4),
    # half and half with the plain error, and the layers outside the blocks reconstructed
    "block_kl": ["ptq.method=block", *KL],
    "block_layerwise": ["ptq.method=block", "ptq.recon.non_block=layerwise"],
    "block_kl_layerwise": ["ptq.method=block", *KL, "ptq.recon.non_block=layerwise"],
    "pfcr_kl": ["ptq.method=pfcr", *KL],
    # fine units (level 0) on the plain error, blocks and coarser on the output-aware one
    "pfcr_kl_coarse": ["ptq.method=pfcr", *KL, "ptq.recon.downstream_min_level=1"],
    "pfcr_kl_layerwise": ["ptq.method=pfcr", *KL, "ptq.recon.non_block=layerwise"],
    "pfcr_kl_coarse_layerwise": [
        "ptq.method=pfcr",
        *KL,
        "ptq.recon.downstream_min_level=1",
        "ptq.recon.non_block=layerwise",
    ],
    # and the bias correction after calibration or reconstruction (pfcr_mm.recon.compensate)
    "calib_bias": ["ptq.method=calib", "ptq.recon.compensate=bias"],
    "block_bias": ["ptq.method=block", "ptq.recon.compensate=bias"],
    "block_kl_layerwise_bias": [
        "ptq.method=block",
        *KL,
        "ptq.recon.non_block=layerwise",
        "ptq.recon.compensate=bias",
    ],
    "pfcr_kl_layerwise_bias": [
        "ptq.method=pfcr",
        *KL,
        "ptq.recon.non_block=layerwise",
        "ptq.recon.compensate=bias",
    ],
    # what a detector's RPN and RoI heads are reconstructed against, pinned whatever the
    # config's defaults: their outputs' squared error or their predictions' divergence (the
    # detection configs' default since benchmarks/demo_det_heads), 128 or 32 RoIs per step
    "block_mse": ["ptq.method=block", "ptq.recon.part_loss=mse", "ptq.recon.roi_batch_size=128"],
    "block_task": ["ptq.method=block", "ptq.recon.part_loss=task", "ptq.recon.roi_batch_size=128"],
    "block_task_roi32": BLOCK_TASK,
    # each activation step size learned at a rate relative to its size (recon.a_lr_mode),
    # after the objectives above; the detector's with the fast preset's larger w_lr too
    "block_kl_layerwise_rel": [
        "ptq.method=block",
        *KL,
        "ptq.recon.non_block=layerwise",
        *REL_CLS,
    ],
    "pfcr_kl_layerwise_rel": ["ptq.method=pfcr", *KL, "ptq.recon.non_block=layerwise", *REL_CLS],
    "block_task_roi32_rel": BLOCK_TASK_REL,
    # the neck and heads (the units outside the blocks) at two and three times the steps
    **{
        f"block_task_roi32_rel_out{n}": [*BLOCK_TASK_REL, f"ptq.recon.outside_iters={n}"]
        for n in (600, 900)
    },
    # steps by unit: 900 for the neck and the RoI box head (where 900 steps for all paid), the
    # RPN and RoI mask heads (where they did not) at 300, or at 150
    "block_task_roi32_rel_nb900": [*BLOCK_TASK_REL, *NECK_BOX_900],
    "block_task_roi32_rel_nb900_rm150": [
        *BLOCK_TASK_REL,
        *NECK_BOX_900,
        *(f"ptq.recon.outside_iters.{u}=150" for u in ("rpn_head", "roi_head.mask_head")),
    ],
    "pfcr_anneal_rel": ["ptq.method=pfcr", "ptq.recon.pos=anneal", *REL_DET],
    # the larger w_lr alone, the step sizes at the peers' absolute rate
    "pfcr_anneal_wlr": ["ptq.method=pfcr", "ptq.recon.pos=anneal", W_LR_DET],
    # where the error is: weights or activations at 8 bits, the other at the run's bits
    "block_w8": ["ptq.method=block", "ptq.quant.w_bits=8"],
    "block_a8": ["ptq.method=block", "ptq.quant.a_bits=8"],
}


def _with(suffix: str, option: str | list[str], bases) -> dict[str, list[str]]:
    """Each method of ``bases`` with ``option`` (one or a list) added, named with ``suffix``."""
    options = [option] if isinstance(option, str) else option
    return {f"{m}{suffix}": [*METHODS[m], *options] for m in bases}


# those methods with the last 30 % of every unit's steps on the weights as they will be hardened
# (straight-through: recon.hard_tail); on the detector and on the demo ViT's objective
TAILED = (
    "block_task_roi32_rel",
    "pfcr_anneal_rel",
    "block_kl_layerwise_rel",
    "pfcr_kl_layerwise_rel",
)
METHODS.update(_with("_ht30", HARD_TAIL, TAILED))
# and with the prediction layers at 8 bits (a classifier's head; a detector's RPN, box and mask
# logits: quant.head_bits); also the demo ViTDet PFCR config's settings (no tail)
H8 = [m for m in METHODS if m.endswith("_ht30") or m == "pfcr_anneal_rel"]
METHODS.update(_with("_h8", "ptq.quant.head_bits=8", H8))
# and with each post-GELU input point's quantizer chosen (quant.post_gelu='auto'), after
# calibration alone and with the demo ViT and Swin detector PFCR configs' settings
GA = ("calib", "pfcr_kl_layerwise_rel_ht30_h8", "pfcr_anneal_rel_ht30_h8")
METHODS.update(_with("_ga", "ptq.quant.post_gelu=auto", GA))
# and with the weights rounded by GPTQ after calibration (recon.compensate='gptq'): calibration
# alone, and the reconstruction of the demo ViT and Swin detector PFCR configs starting from it
GQ = ("calib", "calib_ga", "pfcr_kl_layerwise_rel_ht30_h8_ga", "pfcr_anneal_rel_ht30_h8")
METHODS.update(_with("_gq", "ptq.recon.compensate=gptq", GQ))
# and with each row of the quantized attention probabilities renormalized to sum 1
# (quant.post_softmax_renorm): the demo configs' settings, and calibration with GPTQ
RN = (
    "calib_gq",
    "pfcr_kl_layerwise_rel_ht30_h8_ga",
    "pfcr_anneal_rel_ht30_h8",
    "pfcr_anneal_rel_h8",
)
METHODS.update(_with("_rn", "ptq.quant.post_softmax_renorm=True", RN))
# and with the inputs of the attention's linears (qkv, proj) at 4 bits, the rest at the run's
# bits (quant.linear_a_bits): a mixed-precision setting, kinder than a peer's W3A3; calibration
# with GPTQ, the demo ViT, Swin and ViTDet detector PFCR configs' settings
ATTN4 = ["ptq.quant.linear_a_bits.qkv=4", "ptq.quant.linear_a_bits.proj=4"]
QP4 = (
    "calib_gq_rn",
    "pfcr_kl_layerwise_rel_ht30_h8_ga_rn",
    "pfcr_anneal_rel_ht30_h8",
    "pfcr_anneal_rel_h8",
)
METHODS.update(_with("_qp4", ATTN4, QP4))
# iterations per block, calibration images, held-out calibration-split images (where defaults
# are chosen; 32 when unset) and learning rates (ReconSettings' when unset); "paper" follows
# method.md (20k iterations). "fast" is the budget of configs/demo/demo_vit_shapes_pfcr_w4a4.py.
PRESETS = {
    "quick": {"iters": 300, "cls_images": 128, "det_images": 32},
    "fast": {
        "iters": 100,
        "cls_images": 128,
        "det_images": 32,
        "cls_heldout": 512,
        "w_lr": 0.01,
        "a_lr": 0.0004,
        "max_level": 1,
    },
    "paper": {"iters": 20000, "cls_images": 1024, "det_images": 256},
}


def _options(model: str, bits: int, method: str, seed: int, preset: dict) -> list[str]:
    det = model.startswith("det")
    images = preset["det_images" if det else "cls_images"]
    return [
        f"ptq.quant.w_bits={bits}",
        f"ptq.quant.a_bits={bits}",
        f"ptq.calib.num_images={images}",
        f"ptq.calib.seed={seed}",
        f"ptq.recon.seed={seed}",
        f"ptq.recon.iters={preset['iters']}",
        f"ptq.calib.heldout_images={preset.get(model + '_heldout', 32)}",
        *(f"ptq.recon.{k}={preset[k]}" for k in ("w_lr", "a_lr", "max_level") if k in preset),
        # detection: a batch is a few whole images (peers use 1-2), classification 32 images
        f"ptq.recon.batch_size={4 if det else 32}",
        *METHODS[method],
        *preset.get("options", ()),
    ]


def run_one(model: str, bits: int, method: str, seed: int, preset: dict, out: Path) -> dict:
    work = out / f"{model}_w{bits}a{bits}_{method}_seed{seed}"
    cmd = [sys.executable, str(ROOT / "tools/ptq.py"), MODELS[model], "--work-dir", str(work)]
    cmd += ["--cfg-options", *_options(model, bits, method, seed, preset)]
    log = work.with_suffix(".log")
    work.parent.mkdir(parents=True, exist_ok=True)
    row = {"model": model, "bits": bits, "method": method, "seed": seed}
    with log.open("w") as f:
        rc = subprocess.run(cmd, cwd=ROOT, stdout=f, stderr=subprocess.STDOUT).returncode
    if rc != 0:
        return {**row, "error": f"exit {rc}, see {log}"}
    run = last_run_dir(work)
    res = json.loads((run / "ptq_results.json").read_text())
    recon_log = run / "recon" / "recon_log.json"
    recon_s = json.loads(recon_log.read_text())["seconds"] if recon_log.exists() else 0.0
    return {
        **row,
        "fp": res["fp"],
        "quant": res["quant"],
        "quantize_s": res["time_s"]["quantize"],
        "recon_s": recon_s,
        "block_passes": res["recon"].get("block_passes", 0),
        "recon_time_split_s": {
            k: res["recon"][k]
            for k in ("calibration_seconds", "cache_seconds", "seconds")
            if k in res["recon"]
        },
        "peak_host_mb": res["peak_mem_mb"]["host_rss"],
        "output_rel_mse": res["output_error"]["relative_mse"],
        # calibration-split images calibration did not see: where defaults are chosen
        "heldout_rel_mse": (res.get("heldout_error") or {}).get("relative_mse"),
        # a classifier's: the KL divergence of the softmax per image, and the top-1 agreement
        "heldout_kl": (res.get("heldout_error") or {}).get("kl"),
        "heldout_top1_agreement": (res.get("heldout_error") or {}).get("top1_agreement"),
        "scope": res["scope"],
    }


def _row_run(path: Path, r: dict) -> Path:
    """The run folder of row ``r`` of the benchmark.json ``path`` (as :func:`run_one` named it)."""
    return last_run_dir(
        path.parent / f"{r['model']}_w{r['bits']}a{r['bits']}_{r['method']}_seed{r['seed']}"
    )


def _evaluate_saved(path: Path, r: dict, preset: dict, suffix: str, options=()) -> dict:
    """``ptq_results.json`` of the saved quantized model of row ``r`` evaluated again
    (``tools/ptq.py --quantized``, no calibration, no FP evaluation), in a work dir beside the
    run's named with ``suffix``, with the row's settings and the extra ``options``."""
    run = _row_run(path, r)
    work = run.parent.with_name(f"{run.parent.name}_{suffix}")
    cmd = [sys.executable, str(ROOT / "tools/ptq.py"), MODELS[r["model"]], "--no-fp-eval"]
    cmd += ["--work-dir", str(work), "--quantized", str(run / "quantized_model.pth")]
    cmd += ["--cfg-options", *_options(r["model"], r["bits"], r["method"], r["seed"], preset)]
    subprocess.run([*cmd, *options], cwd=ROOT, check=True, capture_output=True)
    return json.loads((last_run_dir(work) / "ptq_results.json").read_text())


def _preset_of(data: dict) -> dict:
    """The preset a benchmark.json was run with, with its command line's additions."""
    return {
        **PRESETS[data["preset"]],
        **{k: data[k] for k in ("cls_heldout", "options") if k in data},
    }


def rescore(path: Path) -> dict:
    """Fill in the output error of rows run before it was measured, by re-evaluating each run's
    saved quantized model (``tools/ptq.py --quantized``, no calibration); rewrites ``path`` and
    returns its contents."""
    data = json.loads(path.read_text())
    preset = _preset_of(data)
    for r in data["rows"]:
        if "error" in r or r.get("output_rel_mse") is not None:
            continue
        run = _row_run(path, r)
        print(f"rescoring {run.parent.name} ...", flush=True)
        res = _evaluate_saved(path, r, preset, "rescore")
        if res["quant"] != r["quant"]:
            saved = run / "quantized_model.pth"
            raise SystemExit(f"error: {saved} does not reproduce the metrics of its row")
        r["output_rel_mse"] = res["output_error"]["relative_mse"]
        write_json(path, data)
    return data


def heldout_annotations(run: Path, drawn: dict) -> tuple[Path, int]:
    """A COCO annotation file of the calibration-split images that the run's calibration did
    not draw (``drawn``: its ``calib_indices.json``), written into the run folder; its path and
    number of images."""
    from mmdet.registry import DATASETS
    from mmdet.utils import register_all_modules

    register_all_modules()
    root = ROOT / drawn["dataset"]["data_root"]  # relative to the repository (or absolute)
    dataset = DATASETS.build({**drawn["dataset"], "data_root": str(root), "pipeline": []})
    used = {dataset.get_data_info(i)["img_id"] for i in drawn["indices"]}
    ann = json.loads(Path(dataset.ann_file).read_text())
    ann["images"] = [im for im in ann["images"] if im["id"] not in used]
    keep = {im["id"] for im in ann["images"]}
    ann["annotations"] = [a for a in ann["annotations"] if a["image_id"] in keep]
    out = run / "heldout_annotations.json"
    write_json(out, ann)
    return out, len(keep)


def score_heldout(path: Path) -> dict:
    """Add to every detector row of ``path`` the box and mask mAP of its saved quantized model
    on the calibration-split images its calibration did not draw (``heldout_map``: where a
    detector's defaults are chosen, since the held-out feature error does not see the heads);
    rewrites ``path`` and returns its contents."""
    path = path.resolve()
    data = json.loads(path.read_text())
    preset = _preset_of(data)
    for r in data["rows"]:
        if "error" in r or not r["model"].startswith("det") or r.get("heldout_map"):
            continue
        run = _row_run(path, r)
        drawn = json.loads((run / "calib_indices.json").read_text())
        ann, n_images = heldout_annotations(run, drawn)
        options = [
            f"test_dataloader.dataset.ann_file={ann}",
            f"test_dataloader.dataset.data_prefix.img={drawn['dataset']['data_prefix']['img']}",
            f"test_evaluator.ann_file={ann}",
        ]
        print(f"scoring {run.parent.name} on held-out calibration-split images ...", flush=True)
        r["heldout_map"] = _evaluate_saved(path, r, preset, "heldout", options)["quant"]
        r["heldout_images"] = n_images
        write_json(path, data)
    return data


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--preset", choices=sorted(PRESETS), default="quick")
    p.add_argument("--bits", type=int, nargs="+", default=[4, 3])
    p.add_argument("--models", nargs="+", choices=sorted(MODELS), default=["cls", "det"])
    p.add_argument("--methods", nargs="+", choices=list(METHODS), default=list(METHODS))
    p.add_argument("--seeds", type=int, nargs="+", default=[0])
    p.add_argument("--out", default="work_dirs/benchmark_recon")
    p.add_argument(
        "--merge",
        nargs="+",
        metavar="JSON",
        help="run nothing: combine the rows of benchmark.json files (of runs split over\n"
        "processes or machines, same preset) into <out>/benchmark.{json,md}",
    )
    p.add_argument(
        "--rescore",
        metavar="JSON",
        help="run nothing new: add the output error to the rows of a benchmark.json written\n"
        "before it was measured, from the saved quantized models",
    )
    p.add_argument(
        "--score-heldout",
        metavar="JSON",
        help="run nothing new: add to the detector rows of a benchmark.json the box and mask\n"
        "mAP of their saved models on the calibration-split images calibration did not draw",
    )
    p.add_argument(
        "--heldout",
        type=int,
        metavar="N",
        help="held-out calibration-split images of the classifier's rows (the output error\n"
        "where defaults are chosen; default: the preset's, 32 where it has none)",
    )
    p.add_argument(
        "--options",
        nargs="+",
        default=[],
        metavar="KEY=VALUE",
        help="config options added to every run after the method's (e.g. the learning rates\n"
        "of a config at another preset's budget); recorded in benchmark.json",
    )
    args = p.parse_args(argv)
    out = ROOT / args.out
    if args.score_heldout:
        path = Path(args.score_heldout)
        data = score_heldout(path)
        print(write_benchmark(path.parent, data, recon_table(data["rows"]), stem=path.stem))
        return 0
    if args.rescore:
        path = Path(args.rescore)
        data = rescore(path)
        print(write_benchmark(path.parent, data, recon_table(data["rows"]), stem=path.stem))
        return 0
    if args.merge:
        parts = [json.loads(Path(f).read_text()) for f in args.merge]
        if len({json.dumps(_preset_of(part), sort_keys=True) for part in parts}) != 1:
            raise SystemExit(
                "error: --merge needs benchmark.json files of one preset (and --heldout, --options)"
            )
        rows = [r for part in parts for r in part["rows"]]
        seeds = sorted({r["seed"] for r in rows})
        merged = {**parts[0], "seeds": seeds, "rows": rows, "merged_from": args.merge}
        print(recon_table(rows), end="")
        print(write_benchmark(out, merged, recon_table(rows)))
        return 0
    preset = {
        **PRESETS[args.preset],
        **({"cls_heldout": args.heldout} if args.heldout else {}),
        **({"options": args.options} if args.options else {}),
    }
    meta = {"preset": args.preset, **preset, "seeds": args.seeds}
    rows, written = [], None
    for model in args.models:
        for bits in args.bits:
            for seed in args.seeds:
                for method in args.methods:
                    print(f"{model} W{bits}A{bits} {method} seed {seed} ...", flush=True)
                    rows.append(run_one(model, bits, method, seed, preset, out))
                    # rewritten after every run: an interrupted benchmark keeps its rows
                    line = write_benchmark(out, {**meta, "rows": rows}, recon_table(rows))
                    written = written or line  # the first write says what this run replaced
                    print(recon_table(rows[-1:]).splitlines()[-1], flush=True)
    print(written)
    return 0


if __name__ == "__main__":
    sys.exit(main())
