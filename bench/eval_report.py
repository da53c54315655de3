"""Render the evaluation's numbers as bench/REPORT.md, with a plain reading of the thesis's orderings."""

from __future__ import annotations

import datetime
import os
import platform
from importlib.metadata import version
from pathlib import Path

import numpy as np

from bench import eval_claims, eval_ood, eval_suppression
from bench.eval_methods import COSTLY
from bench.eval_sections import GRID, mean_sem
from explainserve.evaluation.localisation import THRESHOLDS
from explainserve.explainer import SLIC_DEFAULTS

PACKAGES = ("torch", "torchvision", "numpy", "scikit-image", "captum", "grad-cam")
THESIS_DELETION = {"Grad-CAM": "0.105 / 0.142", "SWAG_I": "0.092", "SWAG_I+G": "0.084", "SWAG_G": "0.073",
                   "Jitter-CAM": "0.118"}
THESIS_FILTERS = {"random": 0.733, "grad_cam_pp": 0.230, "grad_cam": 0.225, "xgrad_cam": 0.225, "l1_norm": 0.618,
                  "taylor": 0.629, "taylor_class": 0.392, "grad_amap": 0.146}
NOTES = Path(__file__).resolve().parent / "report_notes.md"
# Written by bench/throughput.py, which needs TorchServe and runs on its own; the report quotes it.
THROUGHPUT = Path(__file__).resolve().parent / "THROUGHPUT.md"
# Table 7 on clips, written by bench/eval_ood_video.py (run on its own: `make bench-ood-video`).
OOD_VIDEO = Path(__file__).resolve().parent / "OOD_VIDEO.md"


def _cpu() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def _ms(values) -> str:
    mean, sem = mean_sem(values)
    return f"{mean:.3f} ± {sem:.3f}"


def _schedule(schedule: dict) -> str:
    """The line saying which tasks each process ran, and for how long."""
    def process(names) -> str:
        methods = {}  # section -> its method labels (empty for a whole section), in running order
        for name in names:
            section, _, method = name.partition(": ")
            methods.setdefault(section, []).extend([method] if method else [])
        return " + ".join(f"{section} ({', '.join(labels)})" if labels else section for section, labels in methods.items())

    groups = "; ".join(f"{process(names)} ({wall / 60:.1f} min)" for names, wall in zip(schedule["groups"],
                                                                                        schedule["walls"]))
    how = ("in {} processes side by side, each task (a section, or one method of Tables 1-3) to whichever "
           "came free".format(schedule["jobs"]) if schedule["jobs"] > 1 else "one after another in one process (--jobs 1)")
    return (f"- Schedule: the grid search first; then, {how}: {groups}; then Table 5's timing alone (it measures "
            "latency).")


def _header(r: dict) -> list[str]:
    a = r["args"]
    d = r["durations"]
    before, after = r["load_average"]
    mode = ("**Quick mode (development sizes): most verdicts are undecided at this power; the full mode is "
            "`python bench/evaluate.py`.**" if a["mode"] == "quick" else "Full mode.")
    return [
        "# explainserve evaluation report",
        "",
        f"Generated {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC in {d['total'] / 60:.1f} minutes "
        f"by `{r['command']}`. {mode}",
        "",
        f"- Machine: {_cpu()}, {os.cpu_count()} logical CPUs (shared), {platform.system()} {platform.release()}, "
        f"Python {platform.python_version()}; torch threads: 2 for the grid search and Table 5, 1 for the other "
        f"sections. Load average before / after: "
        f"{' '.join(f'{v:.2f}' for v in before)} / {' '.join(f'{v:.2f}' for v in after)}.",
        "- Versions: " + ", ".join(f"{p} {version(p)}" for p in PACKAGES) + ".",
        f"- Image model: {r['image_model']} (accuracy on the Table 1 subset {100 * r['image_accuracy']:.1f} %); "
        + (f"video model: {r['video_model']} (accuracy on the Table 3 subset {100 * r['video_accuracy']:.1f} %)."
           if "video" in r else f"video model: not run ({r['video_missing']}).")
        + (" **Random-init models: a harness smoke run, the numbers say nothing about the methods.**"
           if a["random_init"] else ""),
        f"- Fixed subsets (seed 0, the first N of each split): {a['image_n']} FashionScenes test images (Tables 1-2; "
        f"{', '.join(COSTLY)} on the first {a['costly_n']}), "
        f"{a['grid_n']} FashionScenes val images (wc/wg grid), {a['filter_n']} test images (Table 4), "
        f"{a['timing_n']} test images timed one at a time (Table 5), {a['ranking_n']} test images (Table 6)"
        + (f", {a['video_n']} MovingFashion test clips (Table 3)." if "video" in r else "; no clips (Table 3 not run)."),
        f"- Superpixels: SWAG's served default n_segments, scaled to the input (the thesis's superpixel size): "
        f"{r['image_segments']} for this image model" + (f", {r['video_segments']} for the clips" if "video" in r else "")
        + ". The default was fixed first, before any run with it (the report of 2026-11-29 ran K = 300 on "
        "64 px images, about 14 px per superpixel against the thesis's 167).",
        "- Every explanation is for the class predicted on the unperturbed input; ± is the standard error of the mean.",
        "- Section times: " + ", ".join(f"{k} {v / 60:.1f} min" for k, v in d.items() if k != "total") + ".",
        _schedule(r["schedule"]),
        f"- Full mode estimated from this run's per-sample section times, its tasks handed out to "
        f"the processes as in this run: {r['full_estimate_min']:.0f} min of wall time on this machine at this load "
        "(`bench_full_estimate_min`).",
        "",
        "## Pre-registration",
        "",
        *r["preregistration"].rstrip("\n").splitlines(),
        "",
    ]


def _grid(r: dict) -> list[str]:
    g = r["grid"]
    wc, wg = g["winner"]
    default = SLIC_DEFAULTS["image"]
    return [
        "## SWAG_I+G weights: grid search",
        "",
        f"wc, wg ∈ {{{', '.join(str(v) for v in GRID)}}}, mean deletion AUC of SWAG_I+G on the val subset "
        f"(K = {r['image_segments']}, the served default for this input size). **Winner: wc = {wc:g}, wg = {wg:g}** (AUC {g['auc'].min():.4f}; "
        f"worst {g['auc'].max():.4f}). The Explainer's image default is wc = {default['wc']:g}, wg = {default['wg']:g}; "
        "Table 1 uses the winner.",
        "",
        "![grid](grid_wc_wg.png)",
        "",
    ]


def _table1_2(r: dict) -> list[str]:
    rows = ["## Table 1: deletion and insertion AUC (FashionScenes test; as thesis Tables 3.7 and 5.2)", "",
            "| method | images | deletion AUC ↓ | insertion AUC ↑ | thesis deletion (ImageNet) |", "|---|---|---|---|---|"]
    for label, m in r["image"].items():
        rows.append(f"| {label} | {len(m['deletion'])} | {_ms(m['deletion'])} | {_ms(m['insertion'])} | "
                    f"{THESIS_DELETION.get(label, '')} |")
    rows += ["", "Thesis: VGG16 Table 3.7 for SWAG and the first Grad-CAM figure, ResNet50 Table 5.2 for Jitter-CAM and "
             "the second.", "", "![deletion](deletion_curves_image.png) ![insertion](insertion_curves_image.png)", "",
             "## Table 2: weak localisation error % (best threshold) and pointing game (as thesis Tables 5.3 and 5.4)",
             "", "| method | value ↓ | mean ↓ | energy ↓ | pointing game % ↑ |", "|---|---|---|---|---|"]
    for label, m in r["image"].items():
        cells = [f"{m[f].best_error:.1f} ({m[f].best_threshold:g})" for f in THRESHOLDS]
        rows.append(f"| {label} | {' | '.join(cells)} | {m['pointing']:.1f} |")
    rows += ["", "IoU > 0.5 with the ground-truth box counts as correct; the pointing game allows 15 px at 224 px "
             "(scaled to the input size). Thesis Table 5.3 (ResNet50, value): Grad-CAM 45.94 %, Jitter-CAM 39.83 %.",
             "", "![gallery](gallery.png)", ""]
    return rows


def _table3(r: dict) -> list[str]:
    if "video" not in r:
        return ["## Table 3: clips (MovingFashion test; as thesis Tables 4.2 and 4.3)", "",
                f"**Not run:** {r['video_missing']}", ""]
    rows = ["## Table 3: clips (MovingFashion test; as thesis Tables 4.2 and 4.3)", "",
            "| method | deletion AUC ↓ | insertion AUC ↑ | loc. error value ↓ | mean ↓ | energy ↓ |",
            "|---|---|---|---|---|---|"]
    for label, m in r["video"].items():
        cells = [f"{m[f].best_error:.1f}" for f in THRESHOLDS]
        rows.append(f"| {label} | {_ms(m['deletion'])} | {_ms(m['insertion'])} | {' | '.join(cells)} |")
    rows += ["", "Deletion and insertion rank voxels (T×H×W); a clip is localised when its mean per-frame IoU "
             "exceeds 0.5 (thesis 4.5.3).", "", "![video deletion](deletion_curves_video.png)", ""]
    return rows


def _table4(r: dict) -> list[str]:
    f = r["filters"]
    rows = ["## Table 4: filter-removal AUC (as thesis Table 6.1)", "",
            f"Model accuracy on the subset: {100 * f['accuracy']:.1f} %. Filters are zeroed 16 at a time, ranked per "
            "image for its ground-truth class.", "", "| ranking | AUC ↓ | thesis ResNet18 |", "|---|---|---|"]
    for ranking, thesis in THESIS_FILTERS.items():
        rows.append(f"| {ranking} | {f[ranking]['auc']:.3f} | {thesis:.3f} |")
    return rows + ["", "![filter removal](filter_removal.png)", ""]


def _table5(r: dict) -> list[str]:
    c = r["cost"]
    swag_g = c["SWAG_G"]
    rows = ["## Table 5: cost, median seconds per explanation on this CPU (batch 1, same run)", "",
            "| method | median s | × SWAG_G |", "|---|---|---|"]
    rows += [f"| {label} | {s:.4f} | {s / swag_g:.1f} |" for label, s in sorted(c.items(), key=lambda kv: kv[1])]
    rows += ["", f"**SWAG_G speed-up: {c['LIME-1000'] / swag_g:.0f}× over LIME-1000, "
             f"{c['LIME_G-1000'] / swag_g:.0f}× over LIME_G-1000, {c['IG-15'] / swag_g:.1f}× over IG-15.** "
             "Thesis Table 3.11 (GPU): SWAG_G 0.07-0.10 s, LIME 4.8-5.8 s.", ""]
    return rows


def _table6(r: dict) -> list[str]:
    t = r["ranking"]
    rows = ["## Table 6: superpixel ranking (as the BMVC paper's Tables 1 and 2)", "",
            f"Shared gradient-SLIC superpixels (mean {t['segments']:.0f} per image). SWAG[source] pools that pixel "
            "score by the segment mean; LIME-n fits on the same superpixels. Removal: % of superpixels removed "
            "when the prediction first changes. Agreement: the method's top superpixel is in LIME-1000's top k. "
            "LIME-1000 (seed 1) shows how far LIME-1000 agrees with itself.", "",
            "| method | best-first % ↓ | worst-first % ↑ | top-1 % ↑ | top-5 % ↑ |", "|---|---|---|---|---|"]
    for label, m in t.items():
        if isinstance(m, dict):
            rows.append(f"| {label} | {m['best']:.1f} | {m['worst']:.1f} | {m['top1']:.1f} | {m['top5']:.1f} |")
    return rows + [""]


def _orderings(r: dict) -> list[str]:
    rows = eval_claims.render(r["claims"])
    if NOTES.exists():
        rows += ["### Investigation notes", "", NOTES.read_text().strip(), ""]
    return rows


def render(results: dict) -> str:
    """The whole report as Markdown."""
    parts = [_header(results), _grid(results), _table1_2(results), _table3(results), _table4(results),
             _table5(results), _table6(results), _orderings(results)]
    if "ood" in results:
        parts.append(eval_ood.section(results["ood"]))
    if OOD_VIDEO.exists():
        parts.append([OOD_VIDEO.read_text().strip(), ""])
    if "suppression" in results:
        parts.append(eval_suppression.section(results["suppression"]))
    if THROUGHPUT.exists():
        parts.append([THROUGHPUT.read_text().strip(), ""])
    return "\n".join(line for part in parts for line in part) + "\n"
