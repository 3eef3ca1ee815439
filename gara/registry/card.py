"""The model card every registered version carries (``model_card.md`` and its description).

A team that pulls a version without our repository reads here what it is (base and its
sha256, adapter, training data and corruptions), how well it did against the frozen base
on the evaluation set (deltas with their paired 95% intervals, from the report it was
registered from), what it is for and where it is known to fall short.
"""

from __future__ import annotations

from typing import Any

from gara.data.prompts import PROMPT_KINDS
from gara.evaluate.metrics import METRICS
from gara.evaluate.paired import NO_DIFFERENCE, PARTS, Interval
from gara.evaluate.report import markdown_table
from gara.models.backbones import get_backbone_spec

# Backbones whose prompt encoder was trained on boxes only: their point answers are near the floor.
BOX_ONLY_BACKBONES = ("lite_medsam",)


def _score_rows(metrics: dict[str, Any], candidate: str, base_row: str) -> list[list[str]]:
    doc = metrics["models"][candidate]
    paired = doc.get("paired", {}).get(base_row, {})
    rows = []
    for part in PARTS:
        for kind in PROMPT_KINDS:
            for metric in METRICS:
                value = doc["summary"].get(part, {}).get(kind, {}).get(metric)
                if value is None:
                    continue
                delta = paired.get(part, {}).get(kind, {}).get(metric)
                vs_base = Interval(**delta).describe() if delta else "-"
                rows.append([part, kind, metric, f"{value:.1f}", vs_base])
    return rows


def model_card(
    manifest: Any, base_uri: str, tags: dict[str, str], metrics: dict[str, Any], candidate: str,
    base_row: str, registered_name: str,
) -> str:
    """Markdown for one version: identity, evidence against the frozen base, use and limits."""
    adapter = manifest.adapter
    what = ("the frozen base itself, no adapter" if adapter is None else
            f"{adapter.kind} adapter ({manifest.trainable_params:,} trainable parameters on "
            f"{len(manifest.adapted_layers)} layers of the image encoder)")
    images = metrics.get("images", {})
    kinds = ", ".join(f"{n} {kind}" for kind, n in sorted(images.get("source_kinds", {}).items()))
    bootstrap = metrics.get("bootstrap", {})
    lines = [
        f"# {registered_name}: {manifest.backbone} + {adapter.kind if adapter else 'no adapter'}",
        "",
        f"- **What**: {what}; the base's weights are not in this version, they are loaded by reference.",
        f"- **Base**: `{base_uri}`, sha256 `{manifest.base_checkpoint_sha256}` (verified at load).",
        f"- **Adapter weights**: sha256 `{manifest.weights_sha256}`.",
        f"- **Trained on**: data `{tags.get('dvc_data_hash', 'unknown')}`, corruption set "
        f"`{tags.get('corruption_set', 'unknown')}`, code `{tags.get('git_commit', 'unknown')}`.",
        f"- **Evaluated on**: set `{metrics.get('evaluation_set')}` ({metrics.get('dataset', '')}): "
        f"{images.get('source_images', '?')} source images ({kinds or 'kinds not recorded'}), "
        f"{images.get('evaluated', '?')} images, {images.get('instances', '?')} instances, "
        f"{len(metrics.get('corruption_types', []))} corruption types at severities "
        f"{metrics.get('severities', [])}.",
        "",
        f"## Scores (report row `{candidate}`; 0-100)",
        "",
        f"Against the frozen base (`{base_row}`) on the same images and prompts: difference with its "
        f"95% interval from a paired bootstrap over source images ({bootstrap.get('resamples', '?')} "
        f"resamples); \"{NO_DIFFERENCE}\" when the interval contains 0.",
        "",
        markdown_table(["images", "prompt", "metric", "score", f"minus {base_row}"],
                        _score_rows(metrics, candidate, base_row)).rstrip(),
        "",
        "## Intended use",
        "",
        "Promptable segmentation (boxes and/or points per object) of RGB photos that may be degraded "
        "by noise, blur, weather, low light or compression. Input and output are documented in the "
        "model's signature: PNG/JPEG bytes plus prompts in, masks (arrays or COCO RLE with "
        "`params={\"mask_format\": \"rle\"}`), predicted IoU and per-block effective rank out.",
        "",
        "## Known limits",
        "",
        "- Scores hold for the evaluation set above; on other photos measure before you rely on them "
        f"(`gara evaluate --model models:/{registered_name}/VERSION --data YOUR_COCO_SET`).",
    ]
    if manifest.backbone in BOX_ONLY_BACKBONES:
        lines.append(f"- {manifest.backbone} was trained to answer box prompts: point prompts score near "
                     "the floor. Prompt it with boxes.")
    if images.get("source_images", 0) and images.get("source_images", 0) < 100:
        lines.append(f"- The evidence rests on {images['source_images']} source images: per-corruption "
                     "differences have wide intervals.")
    transform = get_backbone_spec(manifest.backbone).transform
    resized = (f"resized to {transform.size} px on its longest side" if transform.resize == "longest_side"
               else f"stretched to {transform.size} x {transform.size} px")
    lines.append(f"- The encoder sees the image {resized}; masks are upsampled to the image's "
                 "resolution, so structures thinner than that grid may be lost.")
    return "\n".join(lines) + "\n"
