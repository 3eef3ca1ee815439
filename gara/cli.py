"""The `gara` command line: one typer app over the library's functions."""

from __future__ import annotations

import functools
from collections.abc import Callable
from pathlib import Path

import typer

from gara.errors import USER_ERRORS


class _Typer(typer.Typer):
    """A Typer whose commands report user errors (bad files, params, prompts) as one line
    and exit 2, whether run from the console script or a test's CliRunner."""

    def command(self, *args, **kwargs) -> Callable:
        register = super().command(*args, **kwargs)

        def decorate(fn: Callable) -> Callable:
            @functools.wraps(fn)
            def run(*a, **k):
                try:
                    return fn(*a, **k)
                except USER_ERRORS as exc:
                    typer.echo(f"error: {exc}", err=True)
                    raise typer.Exit(2) from None

            return register(run)

        return decorate


app = _Typer(
    help="GaRA-SAM: make a frozen Segment Anything Model robust with gated-rank adapters.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
)
data_app = _Typer(help="Dataset commands (validate, import another layout, build the embedded sample).",
                  no_args_is_help=True)
app.add_typer(data_app, name="data")


# --- model commands ----------------------------------------------------------------------
@app.command()
def info(
    backbone: str = typer.Option("lite_medsam", help="Backbone name (see `gara backbones`)."),
    adapter: str = typer.Option("gara", help="Adapter kind: gara, lora, adaptformer, or none."),
    rank: int | None = typer.Option(None, help="LoRA / Adaptformer rank (default 16)."),
    low_rank: int | None = typer.Option(None, help="GaRA low rank space r_L (default 16)."),
    high_rank: int | None = typer.Option(None, help="GaRA high rank space r_H (default 256)."),
    targets: str | None = typer.Option(None, help="Projections to adapt, e.g. q,v (default q,k,v)."),
    cobot: bool = typer.Option(False, "--cobot", help="Add SAM-COBOT (reported as cobot_params)."),
    as_json: bool = typer.Option(False, "--json", help="Print the report as JSON."),
) -> None:
    """Parameter report: total, trainable, and per adapted layer (built without weights)."""
    import json

    from gara.config import ModelConfig
    from gara.models.adapters.config import AdapterConfig
    from gara.models.factory import build_segmenter
    from gara.models.inject import parameter_report

    if adapter not in ("gara", "lora", "adaptformer", "none"):
        raise typer.BadParameter(f"{adapter!r}: choose gara, lora, adaptformer or none",
                                 param_hint="--adapter")
    if cobot and adapter == "none":
        raise typer.BadParameter("COBOT plugs into an adapter: choose one with --adapter",
                                 param_hint="--cobot")
    if targets and adapter == "adaptformer":
        raise typer.BadParameter("adaptformer adapts whole MLP blocks, not q/k/v", param_hint="--targets")
    fields = {"rank": rank, "low_rank": low_rank, "high_rank": high_rank, "cobot": cobot}
    fields = {k: v for k, v in fields.items() if v is not None}
    if targets:
        fields["projections"] = [t.strip() for t in targets.split(",") if t.strip()]
    kind = "gara" if adapter == "none" else adapter
    config = ModelConfig(backbone=backbone, adapter=AdapterConfig(kind=kind, **fields))
    segmenter = build_segmenter(config, with_adapter=adapter != "none", pretrained=False)
    report = {"backbone": backbone, "adapter": adapter, **parameter_report(segmenter)}
    if as_json:
        typer.echo(json.dumps(report, indent=2))
        return
    typer.echo(f"backbone {backbone}, adapter {adapter}")
    typer.echo(f"  total params     {report['total_params']:>13,}")
    typer.echo(f"  trainable params {report['trainable_params']:>13,}")
    if cobot:
        typer.echo(f"  of which COBOT   {report['cobot_params']:>13,}  ({report['cobot_units']} units)")
    for row in report["adapted_layers"]:
        ranks = "/".join(str(r) for r in row["ranks"])
        parts = ",".join(row["parts"])
        typer.echo(f"  {row['name']:<48} {row['kind']:<11} r={ranks:<7} {parts:<6} {row['params']:>10,}")


@app.command()
def backbones() -> None:
    """List the registered backbones."""
    from gara.models.backbones import BACKBONES

    width = max(map(len, BACKBONES))
    for name, spec in BACKBONES.items():
        typer.echo(f"{name:<{width}}  {spec.description}")



# --- data commands (gara data ...) -------------------------------------------------------
@data_app.command("validate")
def data_validate(
    path: Path = typer.Argument(..., help="Dataset folder: annotations.json + its images, or a plain "
                                "folder of images (unlabelled)."),
) -> None:
    """Check a dataset folder; print every problem and exit 1 if there is any."""
    from gara.data.validate import format_problems, ok_summary, validate_dataset

    problems = validate_dataset(path, unlabelled=True)
    if problems:
        typer.echo(format_problems(problems))
        typer.echo(f"{path}: {len(problems)} problem(s)", err=True)
        raise typer.Exit(1)
    typer.echo(ok_summary(path))


@data_app.command("import")
def data_import(
    src: Path = typer.Argument(..., help="What to import: the COCO / LVIS JSON file, or the folder of "
                               "labelme JSONs, SA-1B pairs, a Robust-Seg split, or *_instanceIds.png."),
    fmt: str = typer.Option(..., "--format", help="coco | lvis | labelme | sa1b | robustseg | cityscapes."),
    out: Path = typer.Option(..., "--out", help="Dataset folder to write (new, empty, or an earlier "
                             "import's, which is replaced)."),
    images: Path | None = typer.Option(None, "--images", help="Where the image files live, when apart "
                                       "from SRC (COCO / LVIS image root, Cityscapes leftImg8bit/, ACDC "
                                       "rgb_anon/)."),
    link: bool = typer.Option(False, "--link", help="Hard-link images instead of copying (copies across "
                              "devices)."),
    progress: bool = typer.Option(True, "--progress/--no-progress"),
) -> None:
    """Convert a dataset in another format into this project's (validated; written atomically)."""
    from gara.data.importers import import_dataset

    summary = import_dataset(fmt, src, out, images=images, link=link, progress=progress)
    typer.echo(f"imported {fmt} {src} -> {out}: {summary.images} images, {summary.instances} instances, "
               f"{summary.categories} categories; skipped {len(summary.skipped)}")
    shown = 20
    for what, reason in summary.skipped[:shown]:
        typer.echo(f"  skipped {what}: {reason}")
    if len(summary.skipped) > shown:
        typer.echo(f"  ... and {len(summary.skipped) - shown} more")


@data_app.command("build-sample")
def data_build_sample(
    out: Path = typer.Option(Path("data"), help="Folder that receives train/, val/ and unlabelled/."),
    seed: int = typer.Option(0, min=0, help="Same seed, byte-identical output."),
    train_size: int = typer.Option(300, min=2, help="Train images (real photos included)."),
    val_size: int = typer.Option(32, min=1, help="Val images (real photos included)."),
) -> None:
    """Build the embedded sample dataset (real photos + copy-paste composites, and unlabelled photos)."""
    from gara.data.sample import build_sample
    from gara.data.validate import ok_summary

    for folder in build_sample(out, seed=seed, train_size=train_size, val_size=val_size).values():
        typer.echo(ok_summary(folder).replace("OK: ", "built: ", 1))



# --- parameters: one loader for every command that reads them -------------------------------
def _params_option():
    return typer.Option(None, "--params", help="Parameter file (default: ./params.yaml if present, "
                        "else the built-in defaults; a named file must exist).")


def _set_option():
    return typer.Option([], "--set", help="Override a parameter, e.g. --set train.lr=3e-4 (repeatable; "
                        "YAML values; an unknown key is an error).")


def _load(params: Path | None, sets: list[str], options: dict | None = None):
    """Params file, then --set, then the command's own options (dotted keys; None = not given),
    validated once by gara.config.load_params."""
    from gara.config import load_params, parse_sets

    overrides = parse_sets(sets)
    for key, value in (options or {}).items():
        if value is not None:
            overrides[key] = str(value) if isinstance(value, Path) else value
    return load_params(params, overrides)


# --- corruption commands -----------------------------------------------------------------
def _split_list(text: str) -> list[str]:
    return [part for part in text.replace(",", " ").split() if part]


def _severities(text: str | None) -> list[int] | None:
    if text is None:
        return None
    try:
        return [int(part) for part in _split_list(text)]
    except ValueError:
        raise ValueError(f"--severities {text!r}: expected comma-separated integers in 1..5") from None


@app.command("corrupt")
def corrupt(
    data: str = typer.Option(..., "--data", help="Dataset: a folder (or s3://BUCKET/PREFIX) with "
                             "annotations.json + images, or a local plain folder of images (unlabelled)."),
    out: str = typer.Option(..., "--out", help="Output dataset, a folder or s3://BUCKET/PREFIX (PNG "
                            "images + COCO)."),
    types: str | None = typer.Option(None, help="Comma-separated types (corrupt.types; default: all 17)."),
    severities: str | None = typer.Option(None, help="Comma-separated, e.g. 1,3,5 (corrupt.severities; "
                                          "default 1..5)."),
    seed: int | None = typer.Option(None, help="corrupt.seed."),
    variants_per_image: int | None = typer.Option(
        None, min=1, help="Draw N (type, severity) pairs per image instead of the full grid."
    ),
    balanced: bool = typer.Option(
        False, "--balanced", help="With --variants-per-image: deal the N pairs out so every type "
        "appears equally often over the images (for evaluation sets)."
    ),
    workers: int | None = typer.Option(None, min=1, help="Processes; default: all cores."),
    ray_workers: int | None = typer.Option(
        None, min=0, help="Ray actors instead of processes (corrupt.ray_workers; 0: processes). "
        "Cluster: train.ray_address, else RAY_ADDRESS, else a local Ray."),
    params: Path | None = _params_option(),
    set_: list[str] = _set_option(),
    progress: bool = typer.Option(True, "--progress/--no-progress"),
) -> None:
    """Write every (image, type, severity) of a dataset as a new dataset (folder or s3://BUCKET/PREFIX)."""
    from gara.cluster import RayWorkers
    from gara.data.corrupt import corrupt_dataset

    loaded = _load(params, set_, {"corrupt.types": _split_list(types) if types else None,
                                  "corrupt.severities": _severities(severities),
                                  "corrupt.seed": seed, "corrupt.ray_workers": ray_workers})
    section = loaded.corrupt
    summary = corrupt_dataset(
        data, out, types=section.types, severities=section.severities, seed=section.seed,
        variants_per_image=variants_per_image, workers=workers, progress=progress, balanced=balanced,
        ray_workers=RayWorkers.configured(section.ray_workers, loaded.train),
    )
    typer.echo(
        f"{summary.out}: {summary.images} images ({summary.source_images} sources), "
        f"{summary.annotations} annotations; written {summary.written}, skipped {summary.skipped}"
        f", removed {summary.removed}, dropped instances {summary.dropped_instances}"
        f" [{summary.seconds:.1f} s]"
    )


@app.command("contact-sheet")
def contact_sheet(
    image: Path = typer.Option(..., "--image", help="Image file to corrupt."),
    out: Path = typer.Option(..., "--out", help="PNG to write."),
    types: str | None = typer.Option(None, help="Comma-separated types; default: all 17."),
    severities: str | None = typer.Option(None, help="Comma-separated; default 1..5."),
    seed: int = typer.Option(0),
    cell: int = typer.Option(192, min=32, help="Size of one tile in px."),
) -> None:
    """Render one image under every corruption type (rows) and severity (columns)."""
    from gara.data.corrupt import render_contact_sheet

    type_list = _split_list(types) if types else None
    path = render_contact_sheet(image, out, type_list, _severities(severities), seed=seed, cell=cell)
    typer.echo(f"wrote {path}")


# --- evaluation commands -----------------------------------------------------------------
# The evaluate.* keys that sample the pipeline's evaluation set.
EVALUATE_SAMPLING = ("max_images", "types", "severities")


@app.command("evaluate")
def evaluate(
    model: list[str] = typer.Option(
        ..., "--model",
        help="base | ADAPTER_DIR | models:/NAME@ALIAS | models:/NAME/VERSION | runs:/ID/PATH, "
        "optionally NAME=SPEC; repeat to compare (the last one is the primary model).",
    ),
    data: str | None = typer.Option(None, help="Your dataset folder, evaluated whole unless --max-images / "
                                    "--types / --severities narrow it (default: evaluate.data, sampled "
                                    "by the evaluate.* params, as the pipeline's stage is)."),
    out: str | None = typer.Option(None, help="Report folder (default: evaluate.out)."),
    params: Path | None = _params_option(),
    set_: list[str] = _set_option(),
    max_images: int | None = typer.Option(None, min=1, help="Source images (each with its variants); "
                                          "default: all of --data, else evaluate.max_images."),
    types: str | None = typer.Option(None, help="Comma-separated corruption types; default: all in --data, "
                                     "else evaluate.types."),
    severities: str | None = typer.Option(None, help="Comma-separated, e.g. 1,3,5; default: all in --data, "
                                          "else evaluate.severities."),
    ray_workers: int | None = typer.Option(
        None, min=0, help="Ray actors scoring shards of the images (evaluate.ray_workers; 0: this "
        "process). Cluster: train.ray_address, else RAY_ADDRESS, else a local Ray."),
    progress: bool = typer.Option(True, "--progress/--no-progress"),
) -> None:
    """IoU / Dice per corruption x severity x prompt kind; metrics.json, report.md, plots."""
    from gara.evaluate.report import evaluate_to_report, format_summary

    # An explicit --data is the user's dataset: the params' sampling is the pipeline stage's, so
    # it is reset here (a --set or an option given on this command line still narrows it).
    whole = [f"evaluate.{key}=null" for key in EVALUATE_SAMPLING] if data is not None else []
    loaded = _load(params, whole + set_, {
        "evaluate.data": data, "evaluate.out": out, "evaluate.max_images": max_images,
        "evaluate.types": _split_list(types) if types else None,
        "evaluate.severities": _severities(severities), "evaluate.ray_workers": ray_workers})
    metrics, result = evaluate_to_report(loaded, model, progress=progress)
    images, seconds = len(result.images), result.seconds
    typer.echo(format_summary(metrics))
    typer.echo(
        f"{loaded.evaluate.out}: {images} images x {len(result.models)} models in {seconds:.1f} s "
        f"({seconds / max(1, images):.2f} s/image); primary {result.primary}"
    )


# --- training commands -------------------------------------------------------------------
@app.command("train")
def train_command(
    params: Path | None = _params_option(),
    set_: list[str] = _set_option(),
    workers: int | None = typer.Option(None, min=1, help="Ray workers (train.num_workers)."),
    epochs: int | None = typer.Option(None, min=1, help="Epochs (train.epochs)."),
    out: Path | None = typer.Option(None, help="Adapter output folder (train.out)."),
) -> None:
    """Train adapters on the frozen base with Ray Train; track the run in MLflow."""
    from gara.tracking import redact_uri
    from gara.train.launcher import train

    loaded = _load(params, set_, {"train.num_workers": workers, "train.epochs": epochs, "train.out": out})
    result = train(loaded)
    typer.echo(f"adapter: {result.adapter_dir}")
    typer.echo(f"mlflow run: {result.run_id} ({redact_uri(result.tracking_uri)})")


# --- registry commands -------------------------------------------------------------------
@app.command("register")
def register_command(
    adapter: Path = typer.Option(..., help="Adapter folder written by gara train."),
    report: Path = typer.Option(Path("reports/eval"), help="Evaluation report folder (metrics.json)."),
    candidate: str | None = typer.Option(None, help="Report row of this adapter (default: registry."
                                         "candidate, else the report's primary model)."),
    params: Path | None = _params_option(),
    set_: list[str] = _set_option(),
    out: Path | None = typer.Option(None, help="Write the registered version as JSON here."),
) -> None:
    """Register an evaluated adapter as a model version (alias challenger)."""
    from gara.registry.register import register

    version = register(_load(params, set_), adapter, report, candidate, out)
    verb = "registered" if version.created else "already registered as"
    typer.echo(f"{verb} {version.model_uri} (@challenger) from run {version.run_id}: "
               f"gate {version.gate_score:.2f}, clear {version.clear_score:.2f}")


@app.command("promote")
def promote_command(
    version: str | None = typer.Option(None, help="Version to decide on (default: --registered, "
                                       "else the @challenger alias)."),
    registered: Path | None = typer.Option(None, help="JSON written by gara register --out."),
    rollback: bool = typer.Option(False, "--rollback", help="Move champion back to the previous champion."),
    params: Path | None = _params_option(),
    set_: list[str] = _set_option(),
    out: Path | None = typer.Option(None, help="Write the decision as JSON here."),
) -> None:
    """Make the challenger champion if it beats the current one on the gate metric (or roll back)."""
    import json

    from gara.registry import promote as promotion
    from gara.registry.store import CHALLENGER, client_for, registry_uri

    loaded = _load(params, set_)
    if rollback:
        result = promotion.rollback(loaded, out)
        typer.echo(f"{result.name}: champion moved back from version {result.from_version} "
                   f"to {result.to_version}")
        return
    if version is None and registered is not None:
        version = str(json.loads(registered.read_text(encoding="utf-8"))["version"])
    if version is None:
        from mlflow.exceptions import MlflowException

        client = client_for(registry_uri(loaded))
        try:
            version = str(client.get_model_version_by_alias(loaded.registry.name, CHALLENGER).version)
        except MlflowException:
            raise promotion.PromotionError(
                f"model {loaded.registry.name} has no @{CHALLENGER} version to decide on: run gara register "
                "first, or name one with --version") from None
    decision = promotion.promote(loaded, version, promotion.evaluation_rescorer(loaded), out)
    verdict = "promoted to champion" if decision.promoted else "not promoted"
    typer.echo(f"{decision.name} version {decision.version}: {verdict} ({decision.reason}); "
               f"champion is version {decision.champion}")


@app.command("publish")
def publish_command(
    adapter: Path = typer.Option(..., help="Adapter folder written by gara train."),
    report: Path = typer.Option(Path("reports/eval"), help="Evaluation report folder that scored it."),
    out: Path | None = typer.Option(None,
                             help="Record of what the store holds (default reports/registry/publish.json; "
                             "read first: in step = nothing to do)."),
    params: Path | None = _params_option(),
    set_: list[str] = _set_option(),
) -> None:
    """Register + promote (the pipeline's registry stage), unless the store already holds the outcome."""
    from gara.registry.publish import DEFAULT_RECORD, publish

    out = out or DEFAULT_RECORD
    result = publish(_load(params, set_), adapter, report, out)
    if result.in_step:
        typer.echo(f"{result.store}: {result.name} version {result.version} (these weights, this evaluation) "
                   f"and a champion are there, as {out} records; nothing to do")
        return
    verdict = "promoted to champion" if result.promoted else "not promoted"
    typer.echo(f"{result.store}: {result.name} version {result.version} {verdict} ({result.reason}); "
               f"champion is version {result.champion}")


def _floats(text: str, n: tuple[int, ...], what: str) -> list[float]:
    try:
        values = [float(v) for v in text.split(",")]
    except ValueError:
        raise ValueError(f"{what} {text!r}: expected comma-separated numbers") from None
    if len(values) not in n:
        raise ValueError(f"{what} {text!r}: expected {' or '.join(map(str, n))} numbers")
    return values


def _pyfunc(params: Path | None, sets: list[str], model: str | None):
    """The model a predict command runs (default: the registry's champion), loaded once."""
    from gara.registry.pull import load_pyfunc

    loaded = _load(params, sets)  # a bad params file reports itself, not as a --model error
    try:
        return load_pyfunc(loaded, model)
    except ValueError as exc:
        raise ValueError(f"--model {exc}") from None


def _prompts(box: list[str], point: list[str]):
    """--box / --point options -> (boxes, points, point_labels) in the request's layout."""
    boxes = [_floats(b, (4,), "--box") for b in box] or None
    points = labels = None
    if point:
        parsed = [_floats(p, (2, 3), "--point") for p in point]
        points, labels = [[p[:2] for p in parsed]], [[int(p[2]) if len(p) == 3 else 1 for p in parsed]]
        if boxes is not None and len(boxes) != 1:
            raise ValueError("--point with several --box: points describe one object, so give one box")
    return boxes, points, labels


@app.command("predict")
def predict_command(
    image: Path | None = typer.Option(None, help="One RGB image file (PNG / JPEG): writes mask PNGs."),
    images: Path | None = typer.Option(None, help="A folder of images, each with the same --box / --point: "
                                       "writes a COCO results JSON."),
    coco: Path | None = typer.Option(None, help="A COCO file whose annotations' bbox (and point_coords) are "
                                     "the prompts: writes a COCO results JSON."),
    images_root: Path | None = typer.Option(None, "--images-root", help="Where --coco's file_names live "
                                            "(default: the COCO file's folder)."),
    box: list[str] = typer.Option([], help="x0,y0,x1,y1 in pixels; repeat for several objects."),
    point: list[str] = typer.Option([], help="x,y[,label] (label 1 = foreground, default; 0 = "
                                    "background); all points describe one object."),
    model: str | None = typer.Option(None, help="models:/NAME@ALIAS, models:/NAME/VERSION, runs:/... or a "
                                     "model folder (default: models:/<registry.name>@champion)."),
    out: Path | None = typer.Option(None, help="--image: mask PNG (several objects: NAME_0.png, ...; default "
                                    "mask.png). --images / --coco: results JSON (default results.json)."),
    params: Path | None = _params_option(),
    set_: list[str] = _set_option(),
    progress: bool = typer.Option(True, help="Show a progress bar (batch modes)."),
) -> None:
    """Segment prompted objects with a registered model: one image to mask PNGs, or a folder / COCO
    file to a COCO results JSON (RLE masks, predicted IoU, effective rank)."""
    chosen = [name for name, value in (("--image", image), ("--images", images), ("--coco", coco)) if value]
    if len(chosen) != 1:
        raise ValueError(f"give exactly one of --image, --images, --coco (got {', '.join(chosen) or 'none'})")
    if image is not None:
        request = _one_request(image, box, point)  # checked before the (slow) model load
        _write_masks(_pyfunc(params, set_, model).predict(request).iloc[0], out or Path("mask.png"))
        return
    from gara.fsutil import atomic_write_json
    from gara.registry import batch

    if coco is not None:
        if box or point:
            raise ValueError("--coco takes its prompts from the annotations; drop --box / --point")
        items = batch.items_from_coco(coco, images_root)
    else:
        items = batch.items_from_folder(images, *_prompts(box, point))
    results = batch.predict_items(_pyfunc(params, set_, model), items, progress=progress)
    target = atomic_write_json(out or Path("results.json"), results)
    typer.echo(f"wrote {target}: {len(results)} masks on {len(items)} images")


@app.command("demo")
def demo_command(
    model: list[str] = typer.Option([], help="A model to show beside the frozen base: models:/NAME@ALIAS, "
                                    "models:/NAME/VERSION, runs:/... or a model folder; repeat for several "
                                    "(default: models:/<registry.name>@champion)."),
    data: Path | None = typer.Option(None, help="Dataset folder whose images (with ground truth) the page "
                                     "offers as samples (default: data/val, the embedded held-out split)."),
    port: int = typer.Option(8765, min=1, max=65535, help="Port on 127.0.0.1."),
    params: Path | None = _params_option(),
    set_: list[str] = _set_option(),
) -> None:
    """A web page on 127.0.0.1: pick a sample or upload a photo, corrupt it with our generator, draw
    a box or click points, and see the frozen base and each model side by side (predicted IoU,
    effective rank per block, IoU against ground truth on dataset images)."""
    from gara.demo.server import serve
    from gara.demo.session import DemoSession
    from gara.registry.pull import champion_uri

    loaded = _load(params, set_)
    session = DemoSession.open(loaded, model or [champion_uri(loaded)], data)
    serve(session, port)


def _one_request(image: Path, box: list[str], point: list[str]):
    from gara.registry.model import make_request

    boxes, points, labels = _prompts(box, point)
    if not image.is_file():
        raise FileNotFoundError(f"--image {image}: no such file")
    return make_request(image.read_bytes(), boxes, points, labels)


def _write_masks(row, out: Path) -> None:
    """One predicted row -> mask PNG(s) at ``out`` (NAME_k.png for several objects), atomically."""
    from PIL import Image

    from gara.fsutil import atomic_write

    masks = row["masks"]
    paths = [out] if len(masks) == 1 else [
        out.with_name(f"{out.stem}_{k}{out.suffix}") for k in range(len(masks))]
    for mask, path in zip(masks, paths, strict=True):
        png = Image.fromarray(mask.astype("uint8") * 255)
        atomic_write(path, lambda tmp, png=png: png.save(tmp, format="PNG"))
    ranks = row["effective_rank"] or {}
    rank_note = f"; mean effective rank {sum(ranks.values()) / len(ranks):.1f}" if ranks else ""
    scores = ", ".join(f"{s:.3f}" for s in row["scores"])
    typer.echo(f"wrote {', '.join(map(str, paths))} (predicted IoU {scores}{rank_note})")


def main() -> None:
    """Entry point (user errors exit 2 with one line: see _Typer)."""
    import logging

    from gara.allocator import keep_freed_memory

    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    keep_freed_memory()  # CPU forwards without page-faulting their big activations back in
    app()


if __name__ == "__main__":
    main()
