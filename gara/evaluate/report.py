"""The evaluation report: metrics.json (a contract), report.md, plots and per-instance records.

Definitions (every number on 0-100):

- per group, WeSAM's metric: per-instance IoU / Dice averaged within each image, then over
  the group's images (:func:`gara.evaluate.metrics.mean_over_images`);
- **Clear** = that metric over the clean images (severity 0, untagged images included);
- **Degrade** = the mean over corruption types of each type's metric, where a type's
  metric pools all its selected severities (so every type weighs the same, as in the
  paper's "mean over the 15 corruptions").

``metrics.json`` layout (numbers at the leaves, for ``dvc metrics show``)::

    primary, dataset, evaluation_set (fingerprint of images, labels and prompt settings),
    prompts{kinds, n_points, seed}, images{...counts, source_kinds{photo|composite|untagged}},
    corruption_types, severities
    summary{clear|degrade}{box|point}{iou, dice}     for the primary (last) model
    summary.effective_rank{all, clear, degrade}      GaRA models only
    table[corruption][severity][kind]{iou, dice, n_images, n_instances}   ("clean" -> "0")
    models[name]{summary, table, adapter_weights_sha256}   every model compared (sha: adapters only)
    models[name].paired[other]{clear|degrade}{box|point}{iou|dice}
        = {delta, ci_low, ci_high, n_sources}: name - other on the same instances, with the
          bootstrap interval over source images (gara/evaluate/paired.py)
    bootstrap{resamples, confidence, seed, unit}

``paired.csv`` holds the same differences for every ordered pair of models on Clear, Degrade
and each corruption type. The severity plot draws each model's interval as a band.

A value that cannot be computed (no corrupted image, a prompt kind not evaluated) is null.
The definitions themselves are written in report.md, not in metrics.json (``dvc metrics
show`` would print them as columns).
"""

from __future__ import annotations

import io
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from gara.config import BootstrapConfig, Params
from gara.data.corrupt import CLEAN
from gara.data.corruptions import CORRUPTION_NAMES
from gara.data.prompts import PROMPT_KINDS
from gara.evaluate.metrics import METRICS, mean_over_images
from gara.evaluate.paired import NO_DIFFERENCE, SourceBootstrap, paired_table, paired_tree
from gara.evaluate.runner import EvaluationResult, Overlay
from gara.fsutil import atomic_write, atomic_write_json, atomic_write_text

LABELS = {"iou": "IoU", "dice": "Dice"}
DEFINITIONS = {
    "metric": "per-instance IoU / Dice (0-100), averaged within each image, then over images",
    "clear": "the metric over clean images (severity 0; untagged images count as clean)",
    "degrade": "mean over corruption types of each type's metric (all selected severities pooled)",
}


def _num(value: Any) -> float | None:
    """JSON-safe number: NaN / missing -> None, else rounded to 4 decimals."""
    if value is None:
        return None
    value = float(value)
    return None if math.isnan(value) else round(value, 4)


def type_order(types: Sequence[str]) -> list[str]:
    """Corruption types in protocol order (the registry's), unknown ones after, sorted."""
    known = [t for t in CORRUPTION_NAMES if t in types]
    return known + sorted(t for t in set(types) if t not in CORRUPTION_NAMES)


# --- numbers -----------------------------------------------------------------------------


def _split(frame: pd.DataFrame) -> tuple[pd.DataFrame, pd.DataFrame]:
    clean = frame["corruption"] == CLEAN
    return frame[clean], frame[~clean]


def _clear_degrade(frame: pd.DataFrame, values: Sequence[str]) -> dict[str, dict[str, float | None]]:
    clean, corrupted = _split(frame)
    out: dict[str, dict[str, float | None]] = {}
    if len(clean):
        row = mean_over_images(clean, values).iloc[0]
        out["clear"] = {v: _num(row[v]) for v in values}
    else:
        out["clear"] = {v: None for v in values}
    if len(corrupted):
        per_type = mean_over_images(corrupted, values, by=["corruption"])
        out["degrade"] = {v: _num(per_type[v].mean()) for v in values}
    else:
        out["degrade"] = {v: None for v in values}
    return out


def summarize_model(records: pd.DataFrame, model: str) -> dict[str, Any]:
    """``{"summary": ..., "table": ...}`` for one model's records (see the module docstring)."""
    frame = records[records["model"] == model]
    summary: dict[str, Any] = {"clear": {}, "degrade": {}}
    for kind in PROMPT_KINDS:
        split = _clear_degrade(frame[frame["kind"] == kind], METRICS)
        for part in ("clear", "degrade"):
            summary[part][kind] = split[part]
    # One effective rank per image (repeated on every instance and prompt kind of it).
    ranks = frame.drop_duplicates("image_id")
    if len(ranks) and ranks["effective_rank"].notna().any():
        split = _clear_degrade(ranks, ["effective_rank"])
        summary["effective_rank"] = {
            "all": _num(ranks["effective_rank"].mean()),
            "clear": split["clear"]["effective_rank"],
            "degrade": split["degrade"]["effective_rank"],
        }
    table: dict[str, dict[str, dict[str, dict[str, float | int | None]]]] = {}
    if len(frame):
        rows = mean_over_images(frame, METRICS, by=["corruption", "severity", "kind"])
        for r in rows.itertuples(index=False):
            cell = table.setdefault(str(r.corruption), {}).setdefault(str(int(r.severity)), {})
            cell[str(r.kind)] = {
                "iou": _num(r.iou), "dice": _num(r.dice),
                "n_images": int(r.n_images), "n_instances": int(r.n_instances),
            }
    return {"summary": summary, "table": table}


def build_metrics(result: EvaluationResult, boot: SourceBootstrap | None = None) -> dict[str, Any]:
    """The ``metrics.json`` document (pure: no files touched); ``boot`` defaults to the default
    bootstrap settings over the result's records."""
    boot = boot or SourceBootstrap(result.records, BootstrapConfig())
    models = {name: summarize_model(result.records, name) for name in result.models}
    for name, sha in result.adapter_weights.items():  # which weights a row scored (registry check)
        if sha:
            models[name]["adapter_weights_sha256"] = sha
    for name in result.models:
        models[name]["paired"] = {
            other: paired_tree(boot, name, other) for other in result.models if other != name
        }
    images = result.images
    config = boot.config
    return {
        "primary": result.primary,
        "dataset": result.dataset,
        "evaluation_set": result.evaluation_set,
        "prompts": {"kinds": list(result.kinds), "n_points": result.n_points, "seed": result.seed},
        "images": {
            "evaluated": len(images),
            "source_images": len({i.source_image_id for i in images}),
            "source_kinds": dict(result.source_kinds),
            "clean": sum(i.is_clean for i in images),
            "corrupted": sum(not i.is_clean for i in images),
            "skipped_without_instances": len(result.skipped),
            "instances": int(len(result.records.drop_duplicates(["image_id", "ann_id"]))),
        },
        "corruption_types": type_order([i.corruption for i in images if not i.is_clean]),
        "severities": sorted({i.severity for i in images if not i.is_clean}),
        "summary": models[result.primary]["summary"],
        "table": models[result.primary]["table"],
        "models": models,
        "bootstrap": {"resamples": config.resamples, "confidence": config.confidence, "seed": config.seed,
                      "unit": "source image"},
    }


# --- text --------------------------------------------------------------------------------


def _fmt(value: float | None) -> str:
    return "-" if value is None else f"{value:.1f}"


def summary_rows(metrics: dict[str, Any]) -> tuple[list[str], list[list[str]]]:
    """Header and rows of the model comparison (one row per model)."""
    header = ["model"]
    for metric in METRICS:
        for kind in PROMPT_KINDS:
            header += [f"{kind} {LABELS[metric]} clear", f"{kind} {LABELS[metric]} degrade"]
    header.append("eff. rank")
    rows = []
    for name, doc in metrics["models"].items():
        s = doc["summary"]
        row = [name + (" (primary)" if name == metrics["primary"] else "")]
        for metric in METRICS:
            for kind in PROMPT_KINDS:
                row += [_fmt(s["clear"][kind][metric]), _fmt(s["degrade"][kind][metric])]
        row.append(_fmt(s["effective_rank"]["all"]) if "effective_rank" in s else "-")
        rows.append(row)
    return header, rows


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(["---"] * len(header)) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def format_summary(metrics: dict[str, Any]) -> str:
    """The model comparison as an aligned plain-text table (for the terminal)."""
    header, rows = summary_rows(metrics)
    widths = [max(len(c) for c in col) for col in zip(header, *rows, strict=True)]
    lines = []
    for row in [header, *rows]:
        pairs = enumerate(zip(row, widths, strict=True))
        cells = [c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in pairs]
        lines.append("  ".join(cells))
    return "\n".join(lines)


def _type_cell(table: dict[str, Any], corruption: str, severity: str, kind: str) -> float | None:
    """IoU of one (type, severity, kind) cell of a model's table; None where not evaluated."""
    return table.get(corruption, {}).get(severity, {}).get(kind, {}).get("iou")


def _type_means(records: pd.DataFrame, model: str, kind: str) -> dict[str, float | None]:
    mine = (records["model"] == model) & (records["kind"] == kind)
    frame = records[mine & (records["corruption"] != CLEAN)]
    if not len(frame):
        return {}
    rows = mean_over_images(frame, ["iou"], by=["corruption"])
    return {str(r.corruption): _num(r.iou) for r in rows.itertuples(index=False)}


def _comparisons(names: Sequence[str]) -> list[tuple[str, str]]:
    """Which differences report.md shows: every model against the first (the frozen base in
    the pipeline), then the primary (last) against every other model; paired.csv has all."""
    if len(names) < 2:
        return []
    first, primary = names[0], names[-1]
    pairs = [(m, first) for m in names[1:]]
    return pairs + [(primary, m) for m in names[1:-1]]


def _paired_cell(boot: SourceBootstrap, model: str, other: str, part: str, kind: str) -> str:
    # From the bootstrap itself, not metrics.json's rounded copy: the gate reads the same numbers.
    cell = boot.difference(model, other, part, kind, "iou")
    return "-" if cell is None else cell.describe()


def _write_paired(out: io.StringIO, metrics: dict[str, Any], names: Sequence[str], boot: SourceBootstrap
                  ) -> None:
    pairs = _comparisons(names)
    if not pairs:
        return
    config, n = boot.config, metrics["images"]["source_images"]
    out.write(f"\n## Paired differences (IoU, {config.confidence:.0%} interval over {n} source images)\n\n")
    out.write(
        "Each cell: the first model minus the second on the same instances and prompts, and the "
        f"percentile interval of {config.resamples} bootstrap resamples of the source images (a "
        f"source's clean copy, its corrupted variants and their instances move together; seed "
        f"{config.seed}). \"{NO_DIFFERENCE}\": the interval contains 0.\n\n")
    header = ["comparison"] + [f"{kind} {part}" for kind in PROMPT_KINDS for part in ("clear", "degrade")]
    rows = [[f"{m} - {o}"] + [_paired_cell(boot, m, o, part, kind)
                              for kind in PROMPT_KINDS for part in ("clear", "degrade")]
            for m, o in pairs]
    out.write(markdown_table(header, rows))


def _kinds(kinds: dict[str, int]) -> str:
    """' (31 composite, 1 photo)' for tagged sources; nothing for an untagged dataset."""
    if not kinds or set(kinds) == {"untagged"}:
        return ""
    return " (" + ", ".join(f"{n} {kind}" for kind, n in kinds.items()) + ")"


def render_markdown(metrics: dict[str, Any], result: EvaluationResult, boot: SourceBootstrap) -> str:
    kind = "box" if "box" in result.kinds else result.kinds[0]
    types: list[str] = metrics["corruption_types"]
    severities = [str(s) for s in metrics["severities"]]
    names = list(metrics["models"])
    n = metrics["images"]
    out = io.StringIO()
    out.write("# Evaluation report\n\n")
    out.write(
        f"Dataset `{metrics['dataset']}`: {n['evaluated']} images from {n['source_images']} source images"
        f"{_kinds(n.get('source_kinds') or {})}; {n['clean']} clean, {n['corrupted']} corrupted; "
        f"{n['instances']} instances; "
        f"{n['skipped_without_instances']} images without instances left out. Prompts: "
        f"{', '.join(result.kinds)} ({result.n_points} positive points), seed {result.seed}. "
        f"Primary model: **{metrics['primary']}**.\n\n"
    )
    out.write("Metric: " + DEFINITIONS["metric"] + ". Clear: " + DEFINITIONS["clear"] + ". Degrade: "
              + DEFINITIONS["degrade"] + ".\n\n")
    out.write("## Models\n\n")
    out.write(markdown_table(*summary_rows(metrics)))
    _write_paired(out, metrics, names, boot)
    if types:
        out.write(f"\n## Per corruption type ({kind} IoU, severities pooled)\n\n")
        means = {name: _type_means(result.records, name, kind) for name in names}
        header = ["type", *names]
        if len(names) > 1:
            confidence = metrics["bootstrap"]["confidence"]
            header += [f"{names[-1]} - {names[0]} [{confidence:.0%} interval]", "sources"]
        rows = []
        for part in ("clear", *types):
            label = "clean" if part == "clear" else part
            if part == "clear":
                row = [label] + [_fmt(metrics["models"][m]["summary"]["clear"][kind]["iou"]) for m in names]
            else:
                row = [label] + [_fmt(means[m].get(part)) for m in names]
            if len(names) > 1:
                diff = boot.difference(names[-1], names[0], part, kind, "iou")
                row += ["-", "0"] if diff is None else [diff.describe(), str(diff.n_sources)]
            rows.append(row)
        out.write(markdown_table(header, rows))
        for name in names:
            table = metrics["models"][name]["table"]
            out.write(f"\n### {name}: {kind} IoU by type and severity (clean = severity 0)\n\n")
            clean_iou = _type_cell(table, CLEAN, "0", kind)
            rows = [
                [t, _fmt(clean_iou)] + [_fmt(_type_cell(table, t, s, kind)) for s in severities]
                + [_fmt(means[name].get(t))]
                for t in types
            ]
            out.write(markdown_table(["type", "0", *severities, "mean"], rows))
    gara = [m for m in names if "effective_rank" in metrics["models"][m]["summary"]]
    if gara:
        out.write("\n## GaRA effective rank (active components per adapted layer, mean over images)\n\n")
        rows = []
        for m in gara:
            r = metrics["models"][m]["summary"]["effective_rank"]
            rows.append([m, _fmt(r["all"]), _fmt(r["clear"]), _fmt(r["degrade"])])
        out.write(markdown_table(["model", "all", "clear", "degrade"], rows))
    out.write("\nPlots: `plots/iou_vs_severity.png` (data `plots/iou_vs_severity.csv`), "
              "`plots/overlays.png`. Per-instance values: `records.csv`; every paired difference "
              "(each pair of models, Clear, Degrade, each type): `paired.csv`.\n")
    return out.getvalue()


# --- plots -------------------------------------------------------------------------------


ALL_TYPES = "mean over types"
BAND_MIN_SOURCES = 5  # a bootstrap over fewer source images says nothing: no band is drawn


def _point(name: str, corruption: str, severity: int, cell: Any) -> dict[str, Any]:
    banded = cell.n_sources >= BAND_MIN_SOURCES
    return {"model": name, "corruption": corruption, "severity": severity, "iou": cell.delta,
            "iou_low": cell.ci_low if banded else math.nan, "iou_high": cell.ci_high if banded else math.nan,
            "n_sources": cell.n_sources}


def severity_curves(boot: SourceBootstrap, models: Sequence[str], types: Sequence[str], kind: str = "box"
                    ) -> pd.DataFrame:
    """model, corruption, severity, iou, iou_low, iou_high, n_sources: every type's IoU per severity
    with its interval over source images (none below BAND_MIN_SOURCES sources), plus ``mean over
    types`` (Degrade per severity). Severity 0 is the clean value, repeated per type so each
    curve starts from clean."""
    rows = []
    severities = sorted(boot.records.loc[boot.records["corruption"] != CLEAN, "severity"].unique())
    for name in models:
        clean = boot.value(name, "clear", kind, "iou")
        for t in [ALL_TYPES, *types] if types else [CLEAN]:
            if clean is not None:
                rows.append(_point(name, t, 0, clean))
            if t == CLEAN:
                continue
            part = "degrade" if t == ALL_TYPES else t
            for sev in severities:
                cell = boot.value(name, part, kind, "iou", severity=int(sev))
                if cell is not None:
                    rows.append(_point(name, t, int(sev), cell))
    columns = ["model", "corruption", "severity", "iou", "iou_low", "iou_high", "n_sources"]
    frame = pd.DataFrame(rows, columns=columns)
    frame[columns[3:6]] = frame[columns[3:6]].round(4)
    return frame


def _save_figure(fig: Any, path: Path) -> Path:
    import matplotlib.pyplot as plt

    try:
        return atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=100))
    finally:
        plt.close(fig)


def plot_severity(curves: pd.DataFrame, models: Sequence[str], path: Path, kind: str) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    types = list(dict.fromkeys(curves["corruption"])) or [CLEAN]
    ncols = min(6, len(types))
    nrows = math.ceil(len(types) / ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(2.6 * ncols, 2.2 * nrows + 0.6), squeeze=False,
                             sharex=True, sharey=True)
    for ax, t in zip(axes.flat, types, strict=False):
        sub = curves[curves["corruption"] == t]
        for name in models:
            line = sub[sub["model"] == name].sort_values("severity")
            drawn = ax.plot(line["severity"], line["iou"], marker="o", markersize=3, label=name)
            ax.fill_between(line["severity"], line["iou_low"], line["iou_high"], alpha=0.15,
                            color=drawn[0].get_color(), linewidth=0)
        ax.set_title(t, fontsize=9, fontweight="bold" if t == ALL_TYPES else "normal")
        ax.set_ylim(0, 100)
        ax.set_xticks(range(0, 6))
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(types):]:
        ax.axis("off")
    for ax in axes[:, 0]:
        ax.set_ylabel(f"{kind} IoU")
    for ax in axes[-1, :]:
        ax.set_xlabel("severity (0 = clean)")
    handles, labels = axes.flat[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="upper center", ncol=max(1, len(models)), fontsize=9, frameon=False,
               title=f"bands: 95% interval over source images (where >= {BAND_MIN_SOURCES})",
               title_fontsize=8)
    fig.tight_layout(rect=(0, 0, 1, 1 - 0.5 / (2.2 * nrows + 0.6)))
    return _save_figure(fig, path)


_COLORS = np.array([
    (31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189),
    (140, 86, 75), (227, 119, 194), (188, 189, 34), (23, 190, 207), (127, 127, 127),
], dtype=np.float32)


def blend_masks(image: np.ndarray, masks: np.ndarray, alpha: float = 0.5) -> np.ndarray:
    """Colour each instance mask over the image (instance k in colour k)."""
    out = image.astype(np.float32).copy()
    for k, m in enumerate(masks):
        out[m] = (1 - alpha) * out[m] + alpha * _COLORS[k % len(_COLORS)]
    return out.astype(np.uint8)


def _draw_prompts(ax: Any, overlay: Overlay) -> None:
    from matplotlib.patches import Rectangle

    p = overlay.prompts
    for k in range(len(p)):
        color = _COLORS[k % len(_COLORS)] / 255
        if p.boxes is not None:
            x0, y0, x1, y1 = p.boxes[k].tolist()
            ax.add_patch(Rectangle((x0, y0), x1 - x0, y1 - y0, fill=False, edgecolor=color, linewidth=1.2))
        if p.points is not None:
            pts = p.points[k].numpy()
            ax.scatter(pts[:, 0], pts[:, 1], s=14, color=color, edgecolors="white", linewidths=0.6)


def plot_overlays(overlays: Sequence[Overlay], models: Sequence[str], path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from gara.evaluate.metrics import instance_scores

    rows = max(1, len(overlays))
    cols = 1 + len(models)
    fig, axes = plt.subplots(rows, cols, figsize=(2.8 * cols, 2.6 * rows), squeeze=False)
    if not overlays:
        axes[0, 0].text(0.5, 0.5, "no overlay images (evaluate.overlay_images = 0)", ha="center")
    for r, ov in enumerate(overlays):
        label = CLEAN if ov.info.is_clean else f"{ov.info.corruption} s{ov.info.severity}"
        panels = [("ground truth", ov.gt)] + [(m, ov.predictions.get(m)) for m in models]
        for c, (title, masks) in enumerate(panels):
            ax = axes[r, c]
            ax.axis("off")
            if masks is None:
                continue
            ax.imshow(blend_masks(ov.image, masks))
            _draw_prompts(ax, ov)
            if c:
                iou = float(np.mean(instance_scores(masks, ov.gt)[0]))
                title = f"{title}: IoU {iou:.1f}"
            ax.set_title(title, fontsize=8)
        axes[r, 0].text(-0.04, 0.5, f"image {ov.info.source_image_id}\n{label}", rotation=90,
                        transform=axes[r, 0].transAxes, ha="right", va="center", fontsize=8)
    fig.tight_layout()
    return _save_figure(fig, path)


# --- everything --------------------------------------------------------------------------


def write_report(result: EvaluationResult, out: str | Path, bootstrap: BootstrapConfig | None = None
                 ) -> dict[str, Any]:
    """Write metrics.json, report.md, paired.csv, records.csv and plots/ into ``out``; return the
    metrics."""
    out = Path(out)
    boot = SourceBootstrap(result.records, bootstrap or BootstrapConfig())
    metrics = build_metrics(result, boot)
    kind = "box" if "box" in result.kinds else result.kinds[0]
    curves = severity_curves(boot, result.models, metrics["corruption_types"], kind)
    pairs = paired_table(boot, result.models, metrics["corruption_types"])
    atomic_write(out / "records.csv", lambda tmp: result.records.to_csv(tmp, index=False))
    atomic_write(out / "paired.csv", lambda tmp: pairs.to_csv(tmp, index=False))
    atomic_write(out / "plots" / "iou_vs_severity.csv", lambda tmp: curves.to_csv(tmp, index=False))
    plot_severity(curves, result.models, out / "plots" / "iou_vs_severity.png", kind)
    plot_overlays(result.overlays, result.models, out / "plots" / "overlays.png")
    atomic_write_text(out / "report.md", render_markdown(metrics, result, boot))
    atomic_write_json(out / "metrics.json", metrics)  # last: its presence means a complete report
    return metrics


def evaluate_to_report(
    params: Params, model_specs: Sequence[str], progress: bool = True
) -> tuple[dict[str, Any], EvaluationResult]:
    """What ``gara evaluate`` does (and the retrain flow): resolve the ``--model`` specs, score
    them on ``params.evaluate`` (in this process, or on ``evaluate.ray_workers`` Ray actors), write
    the report into ``evaluate.out``; returns (metrics, result)."""
    from gara.cluster import RayWorkers
    from gara.evaluate.runner import evaluate_models, evaluate_on_ray, resolve_models

    config, tracking_uri = params.evaluate, params.train.mlflow.tracking_uri
    if config.ray_workers > 0:
        result = evaluate_on_ray(model_specs, params.model, tracking_uri, config.data, config,
                                 RayWorkers.configured(config.ray_workers, params.train), progress=progress)
    else:
        models = resolve_models(model_specs, params.model, tracking_uri)
        result = evaluate_models(models, config.data, config, progress=progress)
    return write_report(result, config.out, config.bootstrap), result
