"""Image twins: the frozen base's IoU on photos stored as 16-bit greyscale or rotated with an EXIF
orientation, against their 8-bit, upright twins (the same displayed pixels, the same masks and
prompts). With one image reader for every stage (gara/data/images.py) the pairs must agree to
the last digit (before it, the 16-bit photos were read ~98% white and the rotated ones refused
or misaligned).

For the first N source images of the embedded held-out split (data/val; never labelme-examples),
it writes four datasets beside each other under --out: grey (8-bit), grey16 (the same levels,
16 bits deep), upright (the photo) and exif (stored turned a quarter, EXIF orientation 6, the
masks drawn on the displayed photo), then runs `gara evaluate --model base --data ...` on each
(the pipeline's backbone, LiteMedSAM, from params.yaml) and prints the box and point IoU per
dataset and the paired differences.

    python bench/bench_image_twins.py                 # 8 images, ~1 min on 2 cores
    python bench/bench_image_twins.py --images 32
"""

from __future__ import annotations

import argparse
import io
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
VAL = ROOT / "data" / "val"
EXIF_ORIENTATION = 0x0112


def _png(pixels: np.ndarray, orientation: int | None = None) -> bytes:
    buffer, exif = io.BytesIO(), Image.Exif()
    if orientation is not None:
        exif[EXIF_ORIENTATION] = orientation
    Image.fromarray(pixels).save(buffer, format="PNG", exif=exif)
    return buffer.getvalue()


def _decode(path: Path) -> np.ndarray:
    with Image.open(path) as img:  # the embedded sample: 8-bit RGB JPEGs, no EXIF orientation
        return np.asarray(img.convert("RGB"))


def write_twins(out: Path, n_images: int) -> dict[str, Path]:
    coco = json.loads((VAL / "annotations.json").read_text(encoding="utf-8"))
    entries = coco["images"][:n_images]
    keep = {e["id"] for e in entries}
    annotations = [a for a in coco["annotations"] if a["image_id"] in keep]
    encoders = {
        "grey": lambda rgb: _png(rgb.mean(axis=2).round().astype(np.uint8)),
        "grey16": lambda rgb: _png(rgb.mean(axis=2).round().astype(np.uint16) * 257),
        "upright": lambda rgb: _png(rgb),
        "exif": lambda rgb: _png(np.ascontiguousarray(np.rot90(rgb, k=1)), orientation=6),
    }
    roots = {}
    for name, encode in encoders.items():
        root = out / name
        (root / "images").mkdir(parents=True, exist_ok=True)
        images = []
        for entry in entries:
            file_name = f"images/{Path(entry['file_name']).stem}.png"
            (root / file_name).write_bytes(encode(_decode(VAL / entry["file_name"])))
            images.append({**entry, "file_name": file_name})
        (root / "annotations.json").write_text(json.dumps({**coco, "images": images,
                                                            "annotations": annotations}))
        roots[name] = root
    return roots


def evaluate(root: Path, report: Path) -> dict[str, float]:
    subprocess.run([sys.executable, "-m", "gara.cli", "evaluate", "--model", "base", "--data", str(root),
                    "--out", str(report), "--no-progress"], check=True, cwd=ROOT)
    summary = json.loads((report / "metrics.json").read_text())["summary"]["clear"]
    return {"box": summary["box"]["iou"], "point": summary["point"]["iou"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=8, help="source images of data/val")
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "out" / "image_twins")
    args = parser.parse_args()
    roots = write_twins(args.out / "data", args.images)
    scores = {name: evaluate(root, args.out / "reports" / name) for name, root in roots.items()}
    print(f"\n{args.images} images of data/val, frozen base, IoU on the clean images")
    print(f"{'dataset':<10} {'box IoU':>8} {'point IoU':>10}")
    for name, score in scores.items():
        print(f"{name:<10} {score['box']:>8.2f} {score['point']:>10.2f}")
    for twin, plain in (("grey16", "grey"), ("exif", "upright")):
        box = scores[twin]["box"] - scores[plain]["box"]
        point = scores[twin]["point"] - scores[plain]["point"]
        print(f"{twin} - {plain}: box {box:+.2f}, point {point:+.2f}")


if __name__ == "__main__":
    main()
