"""The registry against a real ``mlflow server`` (SQLite) with artifacts on a real S3 server.

Adapters are real (vit_tiny + GaRA, saved with gara's adapter_io) and runs are real MLflow
runs. Gate tests write the evaluation report's summary numbers themselves: the report is
the gate's input, so choosing it is how "a worse / a better challenger" is set up. One test
re-scores a champion with a real evaluation.
"""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

from gara.config import AdapterConfig, ModelConfig, Params, parse_params
from gara.errors import ChecksumMismatchError
from gara.evaluate.report import summarize_model, write_report
from gara.evaluate.runner import evaluate_models, resolve_models
from gara.models.adapter_io import load_adapted_segmenter, read_manifest, save_adapter
from gara.models.factory import build_segmenter
from gara.models.inject import adapter_state_dict
from gara.models.segmenter import Prompts
from gara.registry.model import PredictInputError, make_request
from gara.registry.promote import PromotionError, evaluation_rescorer, promote, rollback
from gara.registry.publish import publish
from gara.registry.register import RegistrationError, register
from gara.registry.store import CHALLENGER, CHAMPION, client_for
from gara.tracking import ADAPTER_WEIGHTS_TAG, active_store
from tests.conftest import BASES_BUCKET, publish_base
from tests.test_train import make_dataset

ADAPTER = AdapterConfig(kind="gara", low_rank=4, high_rank=8)


@pytest.fixture(autouse=True)
def _isolated(monkeypatch: pytest.MonkeyPatch, tmp_path: Path, s3_env) -> None:
    # The params' tracking URI must decide, and locks must not land in the user's cache.
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.delenv("GARA_BASE_CHECKPOINT", raising=False)
    monkeypatch.setenv("GARA_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setenv("GARA_S3_ENDPOINT_URL", s3_env.endpoint_url)  # published bases load from here


@pytest.fixture(scope="module", autouse=True)
def _published_tiny_base(s3_server, tiny_vit_checkpoint) -> str:
    return publish_base(s3_server, tiny_vit_checkpoint.path)


@pytest.fixture(scope="module")
def server(mlflow_s3_server) -> str:
    return mlflow_s3_server[0]


def params_for(server: str, name: str, base: Path, **registry) -> Params:
    """Training on a local ``base``; versions name it by its published copy (see publish_base)."""
    return parse_params({
        "model": {"backbone": "vit_tiny", "checkpoint": str(base), "adapter": ADAPTER.model_dump()},
        "train": {"mlflow": {"tracking_uri": server, "experiment": f"registry-{name}"}},
        "registry": {"name": name, "base_uri": f"s3://{BASES_BUCKET}/{base.name}", **registry},
    })


def make_run(server: str, experiment: str, adapter_dir: Path) -> str:
    """A real MLflow run with lineage tags, tagged with the adapter's weights as gara train does."""
    client = client_for(server)
    exp = client.get_experiment_by_name(experiment)
    exp_id = exp.experiment_id if exp else client.create_experiment(experiment)
    manifest = read_manifest(adapter_dir)
    run = client.create_run(exp_id, tags={
        "git_commit": "test", "backbone": manifest.backbone, "adapter_kind": manifest.adapter.kind,
        "base_checkpoint": manifest.base_checkpoint,
        "base_checkpoint_sha256": manifest.base_checkpoint_sha256,
        ADAPTER_WEIGHTS_TAG: manifest.weights_sha256,
    })
    client.set_terminated(run.info.run_id, "FINISHED")
    return run.info.run_id


def make_adapter(folder: Path, base: Path, seed: int) -> Path:
    """vit_tiny + GaRA with non-zero weights (so the adapter changes the masks)."""
    segmenter = build_segmenter(ModelConfig(backbone="vit_tiny", checkpoint=str(base), adapter=ADAPTER))
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in adapter_state_dict(segmenter).values():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.05)
    return save_adapter(segmenter, folder)


N_SOURCES = 12


def gate_records(model: str, gate: float, clear: float, spread: float = 0.0) -> pd.DataFrame:
    """Per-instance records of ``model`` on a fixed evaluation set: N_SOURCES photos, each clean
    + fog + snow, two instances. Every instance of a photo scores ``gate`` (corrupted) or
    ``clear`` (clean), shifted by +spread on even photos and -spread on odd ones: two models
    differ by exactly the difference of their numbers, with a per-photo spread of ``spread``."""
    rows = []
    for source in range(N_SOURCES):
        shift = spread if source % 2 == 0 else -spread
        for offset, corruption in enumerate(("clean", "fog", "snow")):
            image_id = 10 * source + offset
            value = (clear if corruption == "clean" else gate) + shift
            for ann in range(2):
                rows.append({"model": model, "image_id": image_id, "source_image_id": source,
                             "corruption": corruption, "severity": 0 if corruption == "clean" else 3,
                             "kind": "box", "ann_id": 2 * image_id + ann, "source_ann_id": ann,
                             "iou": value, "dice": value, "predicted_iou": 0.0, "effective_rank": 0.0})
    return pd.DataFrame(rows)


def write_gate_report(folder: Path, adapter_dir: Path, gate: float, clear: float,
                      base_scores=(50.0, 70.0), evaluation_set: str = "set-a", spread: float = 0.0) -> Path:
    """A report as gara evaluate writes it (records.csv + metrics.json from them), with chosen numbers."""
    folder.mkdir(parents=True, exist_ok=True)
    sha = read_manifest(adapter_dir).weights_sha256
    records = pd.concat([gate_records("base", *base_scores), gate_records("gara", gate, clear, spread)])
    records.to_csv(folder / "records.csv", index=False)
    metrics = {"primary": "gara", "dataset": "val", "evaluation_set": evaluation_set, "models": {
        "base": summarize_model(records, "base"),
        "gara": {**summarize_model(records, "gara"), "adapter_weights_sha256": sha},
    }}
    (folder / "metrics.json").write_text(json.dumps(metrics), encoding="utf-8")
    (folder / "report.md").write_text(f"# report\ngate {gate}, clear {clear}\n", encoding="utf-8")
    return folder


def candidate(tmp: Path, server: str, params: Params, base: Path, seed: int, gate: float, clear: float,
              **report) -> str:
    """Adapter + run + report -> registered version number."""
    adapter = make_adapter(tmp / f"adapter-{seed}", base, seed)
    make_run(server, params.train.mlflow.experiment, adapter)
    rep = write_gate_report(tmp / f"report-{seed}", adapter, gate, clear, **report)
    return register(params, adapter, rep).version


def champion_of(server: str, name: str) -> str | None:
    try:
        return str(client_for(server).get_model_version_by_alias(name, CHAMPION).version)
    except Exception:
        return None


def tags_of(server: str, name: str, version: str) -> dict[str, str]:
    return client_for(server).get_model_version(name, version).tags


def test_gate_worse_stays_out_better_wins_clear_guard_and_rollback(server, tiny_vit_checkpoint, tmp_path):
    base = tiny_vit_checkpoint.path
    params = params_for(server, "gate", base, gate={"margin": 0.5, "max_clear_drop": 1.0})

    v1 = candidate(tmp_path, server, params, base, 1, gate=55.0, clear=70.0)
    assert tags_of(server, "gate", v1)["gara.gate_score"] == "55.0000"
    assert champion_of(server, "gate") is None  # registering alone never makes a champion
    d1 = promote(params, v1)
    assert d1.promoted and d1.compared_with == "base" and champion_of(server, "gate") == v1
    assert d1.gate_difference == {"delta": 5.0, "ci_low": 5.0, "ci_high": 5.0, "n_sources": N_SOURCES}
    assert tags_of(server, "gate", v1)["gara.decision"] == "promoted"

    v2 = candidate(tmp_path, server, params, base, 2, gate=55.3, clear=71.0)  # below the margin
    d2 = promote(params, v2)
    assert not d2.promoted and champion_of(server, "gate") == v1
    t2 = tags_of(server, "gate", v2)
    assert t2["gara.decision"] == "rejected" and t2["gara.compared_with"] == f"version {v1}"
    assert "+0.30 [+0.30, +0.30]" in t2["gara.decision_reason"]
    assert "does not lie above the margin 0.5" in t2["gara.decision_reason"]
    assert t2["gara.incumbent_gate_score"] == "55.0000" and t2["gara.challenger_gate_score"] == "55.3000"
    assert (t2["gara.gate_delta"], t2["gara.gate_ci_low"], t2["gara.gate_n_sources"]) == ("0.3", "0.3", "12")

    v3 = candidate(tmp_path, server, params, base, 3, gate=60.0, clear=69.5)  # wins, small Clear loss
    assert promote(params, v3).promoted and champion_of(server, "gate") == v3
    assert tags_of(server, "gate", v3)["gara.previous_champion"] == v1
    assert str(client_for(server).get_model_version_by_alias("gate", CHALLENGER).version) == v3

    v4 = candidate(tmp_path, server, params, base, 4, gate=70.0, clear=60.0)  # wins Degrade, loses Clear
    d4 = promote(params, v4)
    assert not d4.promoted and champion_of(server, "gate") == v3
    assert "clear.box.iou interval reaches below -1" in tags_of(server, "gate", v4)["gara.decision_reason"]

    back = rollback(params)
    assert (back.from_version, back.to_version) == (v3, v1) and champion_of(server, "gate") == v1
    assert tags_of(server, "gate", v3)["gara.decision"] == "rolled_back"
    # v1, the first champion, replaced the frozen base (registered when v1 was decided).
    base_version = tags_of(server, "gate", v1)["gara.previous_champion"]
    assert tags_of(server, "gate", base_version)["adapter_kind"] == "none"
    assert rollback(params).to_version == base_version and champion_of(server, "gate") == base_version
    with pytest.raises(PromotionError, match="replaced no earlier champion"):
        rollback(params)  # nothing before the frozen base


def test_a_mean_gain_within_the_noise_stays_out_and_a_clear_winner_gets_in(server, tiny_vit_checkpoint,
                                                                            tmp_path):
    base = tiny_vit_checkpoint.path
    params = params_for(server, "noise", base)  # default gate: margin 0, max_clear_drop 1
    v1 = candidate(tmp_path, server, params, base, 1, gate=55.0, clear=70.0)
    assert promote(params, v1).promoted
    # +1.0 on average, but +5 on half the photos and -3 on the other half: noise.
    noisy = candidate(tmp_path, server, params, base, 2, gate=56.0, clear=70.0, spread=4.0)
    decision = promote(params, noisy)
    assert not decision.promoted and champion_of(server, "noise") == v1
    assert decision.challenger_gate > decision.incumbent_gate  # the point estimate would have promoted it
    gap = decision.gate_difference
    assert gap["delta"] == pytest.approx(1.0) and gap["ci_low"] < 0 < gap["ci_high"]
    assert "no measurable difference" in tags_of(server, "noise", noisy)["gara.decision_reason"]
    # +3 with a spread of 0.5 around it: a measurable gain.
    winner = candidate(tmp_path, server, params, base, 3, gate=58.0, clear=70.0, spread=0.5)
    decision = promote(params, winner)
    assert decision.promoted and champion_of(server, "noise") == winner
    assert 2.0 < decision.gate_difference["ci_low"] <= 3.0 <= decision.gate_difference["ci_high"] < 4.0


def test_the_frozen_base_is_champion_until_an_adapter_beats_it(server, tiny_vit_checkpoint, tmp_path):
    import mlflow.pyfunc

    base = tiny_vit_checkpoint.path
    params = params_for(server, "first", base)
    v = candidate(tmp_path, server, params, base, 1, gate=50.2, clear=70.0, base_scores=(50.0, 70.0),
                  spread=3.0)
    decision = promote(params, v)
    assert not decision.promoted and decision.compared_with == "base"
    assert "against the frozen base" in tags_of(server, "first", v)["gara.decision_reason"]
    crowned = champion_of(server, "first")
    assert crowned is not None and crowned != v and decision.champion == crowned
    tags = tags_of(server, "first", crowned)
    assert tags["adapter_kind"] == "none" and tags["gara.candidate"] == "base"
    assert tags["gara.gate_score"] == "50.0000" and tags["gara.evaluation_set"] == "set-a"
    # Downstream pulls get the frozen base itself: the same masks as the base model.
    with active_store(server):
        pulled = mlflow.pyfunc.load_model("models:/first@champion")
    image = np.random.default_rng(2).integers(0, 255, (48, 64, 3), dtype=np.uint8)
    out = pulled.predict(make_request(image, boxes=[[4, 4, 40, 30]])).iloc[0]
    frozen = build_segmenter(ModelConfig(backbone="vit_tiny", checkpoint=str(base)), with_adapter=False)
    frozen.eval()
    with torch.inference_mode():
        masks, _ = frozen.predict(image, Prompts(boxes=torch.tensor([[4.0, 4.0, 40.0, 30.0]])))
    np.testing.assert_array_equal(out["masks"], masks)
    assert out["effective_rank"] == {}
    # Another loser against the base leaves that version in place (no second base version).
    again = candidate(tmp_path, server, params, base, 2, gate=49.0, clear=70.0)
    assert not promote(params, again).promoted and champion_of(server, "first") == crowned
    # A measurable gain over the base (paired with the base version's own records) wins.
    better = candidate(tmp_path, server, params, base, 3, gate=53.0, clear=70.0)
    won = promote(params, better)
    assert won.promoted and won.compared_with == f"version {crowned}"
    assert tags_of(server, "first", better)["gara.previous_champion"] == crowned


def test_racing_promotions_end_with_the_better_challenger(server, tiny_vit_checkpoint, tmp_path):
    base = tiny_vit_checkpoint.path
    params = params_for(server, "race", base)
    v0 = candidate(tmp_path, server, params, base, 0, gate=52.0, clear=70.0)
    assert promote(params, v0).promoted
    for round_ in range(2):
        gate = 60.0 + 10 * round_
        worse = candidate(tmp_path, server, params, base, 10 + 2 * round_, gate=gate, clear=70.0)
        better = candidate(tmp_path, server, params, base, 11 + 2 * round_, gate=gate + 5, clear=70.0)
        barrier, errors = threading.Barrier(2), []

        def go(version: str, barrier=barrier, errors=errors) -> None:
            try:
                barrier.wait()
                promote(params, version)
            except Exception as exc:  # surfaced below
                errors.append(exc)

        threads = [threading.Thread(target=go, args=(v,)) for v in (worse, better)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=120)
        assert not errors
        assert champion_of(server, "race") == better, f"round {round_}"
        # The loser either lost to the better one, or won first and was then beaten by it.
        worse_tags, better_tags = tags_of(server, "race", worse), tags_of(server, "race", better)
        assert better_tags["gara.decision"] == "promoted"
        if worse_tags["gara.decision"] == "rejected":
            assert worse_tags["gara.compared_with"] == f"version {better}"
        else:
            assert better_tags["gara.previous_champion"] == worse


def test_register_is_idempotent_and_refuses_mismatches(server, tiny_vit_checkpoint, tmp_path):
    base = tiny_vit_checkpoint.path
    params = params_for(server, "idem", base)
    adapter = make_adapter(tmp_path / "a", base, 1)
    run_id = make_run(server, params.train.mlflow.experiment, adapter)
    report = write_gate_report(tmp_path / "r", adapter, 55.0, 70.0)
    first, again = register(params, adapter, report), register(params, adapter, report)
    assert first.created and not again.created and first.version == again.version
    assert first.run_id == run_id  # found by its weights: the folder names no run

    other = make_adapter(tmp_path / "b", base, 2)
    make_run(server, params.train.mlflow.experiment, other)
    with pytest.raises(RegistrationError, match="evaluate this adapter before registering"):
        register(params, other, report)  # the report scored adapter a
    with pytest.raises(RegistrationError, match="no model row 'lora'"):
        register(params, adapter, report, candidate="lora")
    local_only = params.registry.model_copy(update={"base_uri": None})
    unpublished = params.model_copy(update={"registry": local_only})
    with pytest.raises(RegistrationError, match=rf"base checkpoint {base} is a local path.*base_uri"):
        register(unpublished, adapter, report)


PULL_SCRIPT = """
import json, sys
import numpy as np
import mlflow.pyfunc
from gara.registry.model import make_request
image = np.load(sys.argv[1])
model = mlflow.pyfunc.load_model(sys.argv[2])
out = model.predict(make_request(image, boxes=json.loads(sys.argv[3]))).iloc[0]
np.savez(sys.argv[4], masks=out["masks"], scores=out["scores"])
print(json.dumps(out["effective_rank"]))
"""


def test_pull_by_alias_in_a_fresh_process_matches_the_in_process_model(
    server, mlflow_s3_server, s3_server, tiny_vit_checkpoint, tmp_path
):
    base = tiny_vit_checkpoint.path
    params = params_for(server, "gara-sam-pull", base)
    adapter = make_adapter(tmp_path / "adapter", base, 7)
    make_run(server, params.train.mlflow.experiment, adapter)
    version = register(params, adapter, write_gate_report(tmp_path / "report", adapter, 60.0, 71.0)).version
    assert promote(params, version).promoted

    rng = np.random.default_rng(0)
    image = rng.integers(0, 255, (90, 120, 3), dtype=np.uint8)
    boxes = [[10.0, 12.0, 60.0, 70.0], [50.0, 20.0, 110.0, 85.0]]
    np.save(tmp_path / "image.npy", image)
    # Version artifacts come through the server; only the published base is read from S3.
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")}
    env["MLFLOW_TRACKING_URI"] = server
    proc = subprocess.run(
        [sys.executable, "-c", PULL_SCRIPT, str(tmp_path / "image.npy"), "models:/gara-sam-pull@champion",
         json.dumps(boxes), str(tmp_path / "out.npz")],
        env=env, capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    pulled = np.load(tmp_path / "out.npz")
    local = load_adapted_segmenter(adapter)
    with torch.inference_mode():
        masks, scores = local.predict(image, Prompts(boxes=torch.tensor(boxes)))
    assert pulled["masks"].shape == (2, 90, 120) and pulled["masks"].dtype == bool
    np.testing.assert_array_equal(pulled["masks"], masks)
    np.testing.assert_allclose(pulled["scores"], scores, rtol=1e-5, atol=1e-6)
    ranks = json.loads(proc.stdout.strip().splitlines()[-1])
    assert ranks and all(0 <= r <= 12 for r in ranks.values())  # GaRA: per-block effective rank

    # The version holds the adapter and the code, not the base: measure what landed in the S3 bucket.
    bucket = mlflow_s3_server[1]
    mv = client_for(server).get_model_version("gara-sam-pull", version)
    pages = s3_server.client().get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix="mlflow/")
    model_id = mv.source.removeprefix("models:/")
    model_objects = [o for page in pages for o in page["Contents"] if f"/models/{model_id}/" in o["Key"]]
    model_bytes = sum(o["Size"] for o in model_objects)
    adapter_bytes = (adapter / "adapter.safetensors").stat().st_size
    base_bytes = base.stat().st_size
    print(f"registered model {model_bytes} B, adapter weights {adapter_bytes} B, base {base_bytes} B")
    code_bytes = sum(o["Size"] for o in model_objects if o["Key"].endswith("/code/gara.zip"))
    print(f"... of which code {code_bytes} B")
    assert any(o["Key"].endswith("adapter/adapter.safetensors") for o in model_objects)
    assert any(o["Key"].endswith("artifacts/model_card.md") for o in model_objects)
    assert 0 < code_bytes < 2 * 1024 * 1024
    assert adapter_bytes + code_bytes <= model_bytes <= adapter_bytes + code_bytes + 64 * 1024


def test_base_location_is_configurable_and_a_tampered_base_is_refused(
    server, s3_env, tiny_vit_checkpoint, tmp_path, monkeypatch
):
    import mlflow.pyfunc

    original = tiny_vit_checkpoint.path
    copy = tmp_path / "base-copy.pth"
    copy.write_bytes(original.read_bytes())
    published = publish_base(s3_env, copy)
    params = params_for(server, "tamper", copy)
    adapter = make_adapter(tmp_path / "adapter", copy, 3)
    make_run(server, params.train.mlflow.experiment, adapter)
    version = register(params, adapter, write_gate_report(tmp_path / "report", adapter, 60.0, 71.0)).version
    uri = f"models:/tamper/{version}"
    with active_store(server):
        recorded = mlflow.pyfunc.load_model(uri)
        assert recorded.unwrap_python_model().manifest.base_checkpoint == published  # never the local path
        assert tags_of(server, "tamper", version)["base_checkpoint"] == published
        copy.unlink()  # the training machine's file plays no part in loading
        image = np.full((40, 50, 3), 90, np.uint8)
        out = recorded.predict(make_request(image, boxes=[[5, 5, 30, 30]])).iloc[0]
        assert out["masks"].shape == (1, 40, 50)

        data = bytearray(original.read_bytes())
        data[-100] ^= 0xFF  # one flipped byte
        s3_env.client().put_object(Bucket=BASES_BUCKET, Key="tampered.pth", Body=bytes(data))
        monkeypatch.setenv("GARA_CACHE_DIR", str(tmp_path / "cold-cache"))
        with pytest.raises(ChecksumMismatchError, match=r"sha256 is [0-9a-f]{64}, expected"):
            mlflow.pyfunc.load_model(uri, model_config={"base_checkpoint": f"s3://{BASES_BUCKET}/tampered.pth"})
        s3_env.client().put_object(Bucket=BASES_BUCKET, Key="base-copy.pth", Body=bytes(data))
        with pytest.raises(ChecksumMismatchError):
            mlflow.pyfunc.load_model(uri)  # the published object itself replaced
        monkeypatch.setenv("GARA_BASE_CHECKPOINT", str(original))  # the environment can point elsewhere
        assert mlflow.pyfunc.load_model(uri) is not None


def _png(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG")
    return buffer.getvalue()


def test_bad_predict_input_gets_a_clear_error(server, tiny_vit_checkpoint, tmp_path):
    import mlflow.pyfunc

    base = tiny_vit_checkpoint.path
    params = params_for(server, "badinput", base)
    adapter = make_adapter(tmp_path / "adapter", base, 4)
    make_run(server, params.train.mlflow.experiment, adapter)
    version = register(params, adapter, write_gate_report(tmp_path / "report", adapter, 60.0, 71.0)).version
    with active_store(server):
        model = mlflow.pyfunc.load_model(f"models:/badinput/{version}")
    rgb = np.zeros((40, 50, 3), np.uint8)
    cases = [
        ({"image": _png(rgb), "boxes": [[10, 10, 80, 30]]}, r"row 0: box 0 .* outside the 50x40 image"),
        ({"image": _png(rgb), "boxes": []}, r"row 0: no prompts; give boxes and/or points"),
        ({"image": _png(rgb), "boxes": [[1, 2, 3]]}, r"boxes must have shape \(K, 4\)"),
        ({"image": b"not an image", "boxes": [[1, 1, 9, 9]]}, r"row 0: image: not a readable image"),
        ({"image": _png(rgb), "points": [[[5, 5]]]}, r"points need point_labels"),
    ]
    for request, message in cases:
        with pytest.raises(PredictInputError, match=message):
            model.unwrap_python_model().predict(None, request)
    with pytest.raises(PredictInputError, match="RGB array of shape"):
        make_request(np.zeros((40, 50, 4), np.uint8), boxes=[[1, 1, 9, 9]])
    ok = model.predict(make_request(rgb, points=[[[10, 10], [30, 30]]], point_labels=[[1, 0]]))
    assert ok.iloc[0]["masks"].shape == (1, 40, 50)


def test_cli_predict_writes_masks_and_reports_bad_input_in_one_line(server, tiny_vit_checkpoint, tmp_path,
                                                                   monkeypatch):
    from typer.testing import CliRunner

    from gara.cli import app

    base = tiny_vit_checkpoint.path
    params = params_for(server, "gara-sam", base)  # the default name: predict needs no --model
    adapter = make_adapter(tmp_path / "adapter", base, 5)
    make_run(server, params.train.mlflow.experiment, adapter)
    version = register(params, adapter, write_gate_report(tmp_path / "report", adapter, 60.0, 71.0)).version
    assert promote(params, version).promoted
    pixels = np.random.default_rng(1).integers(0, 255, (48, 64, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(tmp_path / "im.png")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", server)
    monkeypatch.chdir(tmp_path)  # no params.yaml here: defaults + the environment's store
    runner = CliRunner()
    result = runner.invoke(app, ["predict", "--image", "im.png", "--box", "4,4,40,30", "--box", "20,10,60,44",
                                 "--out", "mask.png"])
    assert result.exit_code == 0, result.output
    for k in (0, 1):
        mask = np.asarray(Image.open(tmp_path / f"mask_{k}.png"))
        assert mask.shape == (48, 64) and set(np.unique(mask)) <= {0, 255}
    bad = runner.invoke(app, ["predict", "--image", "im.png", "--box", "4,4,400,30"])
    assert bad.exit_code == 2 and "outside the 64x48 image" in bad.output
    assert "Traceback" not in bad.output


def test_champion_from_another_evaluation_set_is_rescored_not_compared_blindly(
    server, tiny_vit_checkpoint, tmp_path
):
    base = tiny_vit_checkpoint.path
    data = make_dataset(tmp_path / "val", 3, 5)
    params = params_for(server, "rescore", base, gate={"margin": 0.0, "max_clear_drop": 100.0})
    params.evaluate.data = str(data)
    params.evaluate.prompts.kinds = ["box"]
    champion = candidate(tmp_path, server, params, base, 1, gate=1.0, clear=1.0, base_scores=(0.0, 0.0),
                         evaluation_set="an-older-set")
    assert promote(params, champion).promoted

    adapter = make_adapter(tmp_path / "challenger", base, 2)
    make_run(server, params.train.mlflow.experiment, adapter)
    models = resolve_models(["base", f"gara={adapter}"], params.model)
    write_report(evaluate_models(models, data, params.evaluate, progress=False), tmp_path / "eval")
    challenger = register(params, adapter, tmp_path / "eval").version

    with pytest.raises(PromotionError, match="not comparable"):
        promote(params, challenger)  # without a way to re-score, no blind comparison
    decision = promote(params, challenger, rescore=evaluation_rescorer(params))
    assert "re-scored on set" in decision.compared_with
    # The champion's real score on the new set, not the 1.0 its old report claimed.
    assert decision.incumbent_gate != 1.0


def test_cli_promote_without_a_challenger_is_a_one_line_error(server, tmp_path, monkeypatch):
    from typer.testing import CliRunner

    from gara.cli import app

    (tmp_path / "params.yaml").write_text(
        f"registry:\n  name: nochallenger\ntrain:\n  mlflow:\n    tracking_uri: {server}\n", encoding="utf-8")
    monkeypatch.chdir(tmp_path)
    result = CliRunner().invoke(app, ["promote"])
    assert result.exit_code == 2 and "Traceback" not in result.output
    assert "has no @challenger version to decide on" in result.output


def test_publish_does_nothing_in_step_and_publishes_again_into_a_store_that_lacks_it(
        server, tiny_vit_checkpoint, tmp_path):
    """The pipeline's registry stage runs on every dvc repro: a no-op while the store holds the
    outcome (checked over REST for a server, by SQL for a sqlite file), a full publish into a
    store that never saw the training run, or that lost the version the record names.
    (tests/test_pipeline_e2e.py deletes the pipeline's mlflow.db between two dvc repro.)"""
    base = tiny_vit_checkpoint.path
    adapter = make_adapter(tmp_path / "a", base, 1)
    report = write_gate_report(tmp_path / "r", adapter, 70.0, 70.0)  # beats the base (50 / 70)
    record = tmp_path / "reports" / "publish.json"
    db = tmp_path / "mlflow.db"
    for store in (server, f"sqlite:///{db}", f"sqlite:///{db}"):
        if db.exists():  # the store loses the model; the record still names its version
            client_for(store).delete_registered_model("pub")
        params = params_for(store, "pub", base)
        first = publish(params, adapter, report, record)
        assert not first.in_step and first.promoted and first.champion == first.version
        client = client_for(store)
        assert str(client.get_model_version_by_alias("pub", CHAMPION).version) == first.version
        training = client.get_run(client.get_model_version("pub", first.version).run_id)
        assert training.data.tags["gara.training_run"].startswith("not in this store")
        count = len(client.search_model_versions("name = 'pub'"))

        again = publish(params, adapter, report, record)
        assert again.in_step and again.version == first.version
        assert len(client.search_model_versions("name = 'pub'")) == count  # nothing written
        assert json.loads(record.read_text())["store"] == store

    # A record that is not one (hand-edited, or written by an older release) proves nothing:
    # publish runs in full, finds its version again and rewrites the record.
    partial = json.loads(record.read_text())
    del partial["version"]
    record.write_text(json.dumps(partial))
    rewritten = publish(params, adapter, report, record)
    assert not rewritten.in_step and rewritten.version == first.version
    assert json.loads(record.read_text())["version"] == first.version
