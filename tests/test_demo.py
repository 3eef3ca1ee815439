"""``gara demo`` as a team deciding on a champion uses it: a real server on 127.0.0.1 over a
registered champion (real LiteMedSAM weights, a GaRA adapter), its API through the client
library, and the page in a real headless Chromium. Each answer is checked against the models
run in this process without the demo, the registry or the page."""

from __future__ import annotations

import io
import socket
import struct
import sys
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from gara.config import AdapterConfig, ModelConfig, parse_params
from gara.data.coco import mask_bbox
from gara.data.corruptions import apply_corruption
from gara.data.dataset import InstanceDataset
from gara.demo.client import DemoClient
from gara.demo.screenshot import page_at, segment_annotation
from gara.demo.session import DEFAULT_SAMPLES, MAX_UPLOAD_PIXELS, DemoError
from gara.evaluate.metrics import mask_iou
from gara.models.adapter_io import load_adapted_segmenter, read_manifest, save_adapter
from gara.models.adapters.gara import effective_ranks
from gara.models.factory import build_segmenter
from gara.models.inject import adapter_layers, adapter_state_dict
from gara.models.segmenter import Prompts
from gara.registry.promote import promote
from gara.registry.register import register
from gara.train.loop import block_name
from tests.conftest import free_port, running_server
from tests.test_registry import write_gate_report

pytestmark = pytest.mark.slow

NAME = "demo"
SAMPLES = Path("data/val")
SAMPLE_ID, SAMPLE_FILE = "sample-1", "images/000001.jpg"
ANNOTATION = 8  # a large object on that photo
MISSING = "models:/not-registered@champion"


@pytest.fixture(scope="module")
def champion(tmp_path_factory) -> dict:
    """A GaRA adapter on LiteMedSAM (weights perturbed so it answers differently from the base),
    registered and promoted in a SQLite store; the params file that names that store."""
    root = tmp_path_factory.mktemp("demo")
    raw = {"model": {"backbone": "lite_medsam",
                     "adapter": AdapterConfig(kind="gara", low_rank=4, high_rank=8).model_dump()},
           "train": {"mlflow": {"tracking_uri": f"sqlite:///{root}/mlflow.db", "experiment": NAME}},
           "registry": {"name": NAME}}
    params = parse_params(raw)
    segmenter = build_segmenter(ModelConfig.model_validate(raw["model"]))
    generator = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for tensor in adapter_state_dict(segmenter).values():
            tensor.copy_(torch.randn(tensor.shape, generator=generator) * 0.05)
    adapter = save_adapter(segmenter, root / "adapter")
    version = register(params, adapter, write_gate_report(root / "report", adapter, 60.0, 71.0)).version
    assert promote(params, version).promoted
    (root / "params.yaml").write_text(yaml.safe_dump(raw), encoding="utf-8")
    return {"params": root / "params.yaml", "adapter": adapter, "root": root}


@pytest.fixture(scope="module")
def demo_url(champion) -> str:
    """``gara demo`` with the champion (the default spec) and a spec that cannot load."""
    port = free_port()
    cmd = [sys.executable, "-m", "gara.cli", "demo", "--params", str(champion["params"]), "--port", str(port),
           "--model", f"models:/{NAME}@champion", "--model", MISSING]
    health = f"http://127.0.0.1:{port}/api/health"
    with running_server(cmd, health, champion["root"] / "demo.log", timeout=180):
        yield f"http://127.0.0.1:{port}/"
    with pytest.raises(ConnectionRefusedError):  # stopped: nothing listens there any more
        socket.create_connection(("127.0.0.1", port), timeout=5).close()


@pytest.fixture
def client(demo_url) -> DemoClient:
    with DemoClient(demo_url) as c:
        yield c


def in_process(adapter: Path, image: np.ndarray, prompts: Prompts) -> dict[str, tuple]:
    """The reference: the frozen base built from the backbone, and the adapter folder, in this
    process: (masks, predicted IoU) of each, and the adapter's effective rank per block."""
    base = build_segmenter(ModelConfig(backbone="lite_medsam"), with_adapter=False).eval()
    adapted = load_adapted_segmenter(adapter).eval()
    with torch.inference_mode():
        answers = {"base": base.predict(image, prompts), "model": adapted.predict(image, prompts)}
        ranks = {block_name(k): float(v[0]) for k, v in effective_ranks(adapted, 1).items()}
    return {**answers, "ranks": ranks,
            "capacity": {block_name(n): layer.high_rank for n, layer in adapter_layers(adapted).items()}}


def sample(file_name: str) -> dict:
    dataset = InstanceDataset(SAMPLES)
    return dataset[[dataset.entry(i)[0]["file_name"] for i in range(len(dataset))].index(file_name)]


def png_header(width: int, height: int) -> bytes:
    """A PNG that declares width x height and holds no pixels: only its header is ever read."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IEND", b"")


def ground_truth_box() -> list[float]:
    truth = sample(SAMPLE_FILE)
    return truth["boxes"][list(truth["ann_ids"]).index(ANNOTATION)].tolist()


def test_the_api_answers_as_the_models_do_in_process(client, champion):
    info = client.info()
    names = [c["name"] for c in info["columns"]]
    base_sha = read_manifest(champion["adapter"]).base_checkpoint_sha256
    assert names == [f"frozen base (lite_medsam {base_sha[:8]})", f"models:/{NAME}@champion", MISSING]
    assert [c["error"] is None for c in info["columns"]] == [True, True, False]
    assert MISSING in info["columns"][2]["error"] and "not found" in info["columns"][2]["error"]
    assert len(info["samples"]) == 32 and "fog" in [c["name"] for c in info["corruptions"]]

    truth = sample(SAMPLE_FILE)
    fogged, gt = apply_corruption(truth["image"], "fog", 4, seed=0, masks=truth["masks"], key=SAMPLE_FILE)
    np.testing.assert_array_equal(client.picture(SAMPLE_ID, "fog", 4), fogged)  # what the models see

    k = list(truth["ann_ids"]).index(ANNOTATION)
    box = ground_truth_box()
    answer = client.segment(SAMPLE_ID, box=box, corruption="fog", severity=4, annotation_id=ANNOTATION)
    expected = in_process(champion["adapter"], fogged, Prompts(boxes=torch.tensor([box])))
    base, model, missing = answer["columns"]
    assert answer["annotation"]["id"] == ANNOTATION
    np.testing.assert_array_equal(answer["annotation"]["mask"], gt[k])  # the truth, fogged as the image
    for column, (masks, scores) in ((base, expected["base"]), (model, expected["model"])):
        np.testing.assert_array_equal(column["mask"], masks[0])
        assert column["predicted_iou"] == pytest.approx(float(scores[0]), abs=1e-6)
        assert column["iou"] == pytest.approx(mask_iou(masks[0], gt[k]) / 100)  # fractions, as predicted
    assert not np.array_equal(base["mask"], model["mask"])  # the adapter changes the answer
    assert base["effective_rank"] == {}
    assert model["effective_rank"] == pytest.approx(expected["ranks"]) and len(expected["ranks"]) == 10
    assert model["rank_capacity"] == expected["capacity"]  # LiteMedSAM's TinyViT: 10 blocks
    assert missing["mask"] is None and MISSING in missing["error"]


def test_a_chosen_object_is_prompted_with_its_box_as_warped_by_a_geometric_corruption(client, champion):
    truth = sample(SAMPLE_FILE)
    warped, gt = apply_corruption(truth["image"], "elastic", 5, seed=0, masks=truth["masks"], key=SAMPLE_FILE)
    k = list(truth["ann_ids"]).index(ANNOTATION)
    x, y, w, h = mask_bbox(gt[k])
    assert [x, y, x + w, y + h] != ground_truth_box()  # the warp moved the object's box
    answer = client.segment(SAMPLE_ID, corruption="elastic", severity=5, annotation_id=ANNOTATION)
    assert answer["prompt"]["box"] == [x, y, x + w, y + h]
    expected = in_process(champion["adapter"], warped, Prompts(boxes=torch.tensor([[x, y, x + w, y + h]])))
    for column, key in zip(answer["columns"][:2], ("base", "model"), strict=True):
        np.testing.assert_array_equal(column["mask"], expected[key][0][0])
        assert column["iou"] == pytest.approx(mask_iou(expected[key][0][0], gt[k]) / 100)


def test_an_upload_with_points_answers_as_in_process(client, champion):
    """A photo in stored orientation with EXIF orientation 6 is used upright, as displayed."""
    truth = sample(SAMPLE_FILE)
    upright = truth["image"]
    stored = np.ascontiguousarray(np.rot90(upright, k=1))  # orientation 6: displayed = rotated 90 clockwise
    buffer = io.BytesIO()
    exif = Image.Exif()
    exif[0x0112] = 6
    Image.fromarray(stored).save(buffer, format="PNG", exif=exif)
    added = client.upload(buffer.getvalue(), "rotated.png")
    assert (added["height"], added["width"]) == upright.shape[:2]

    points, labels = [[180.0, 150.0], [30.0, 30.0]], [1, 0]
    answer = client.segment(added["id"], points=points, point_labels=labels, corruption="gaussian_noise",
                            severity=2)
    noisy, _ = apply_corruption(upright, "gaussian_noise", 2, seed=0, key=added["id"])
    expected = in_process(champion["adapter"], noisy, Prompts(points=torch.tensor([points]),
                                                               labels=torch.tensor([labels])))
    for column, key in zip(answer["columns"][:2], ("base", "model"), strict=True):
        np.testing.assert_array_equal(column["mask"], expected[key][0][0])
        assert column["iou"] is None  # an upload has no ground truth
    assert answer["annotation"] is None


def test_bad_requests_are_one_line_errors(client):
    with pytest.raises(DemoError, match=r"^broken.png: not a readable image"):
        client.upload(b"\x89PNG\r\n\x1a\n not really", "broken.png")
    with pytest.raises(DemoError, match=r"^empty.jpg: the file is empty$"):
        client.upload(b"", "empty.jpg")
    side = int(MAX_UPLOAD_PIXELS ** 0.5) + 1
    huge = io.BytesIO()
    Image.new("L", (side, side)).save(huge, format="PNG")  # a few KB that decode to 16.8 MP
    limit = f"{MAX_UPLOAD_PIXELS:,} pixels"
    with pytest.raises(DemoError, match=rf"^huge.png: {side}x{side} is over the limit of {limit}"):
        client.upload(huge.getvalue(), "huge.png")
    with pytest.raises(DemoError, match=r"^bomb.png: over the limit of"):
        client.upload(png_header(20000, 20000), "bomb.png")  # Pillow's own refusal, > 179 MP
    with pytest.raises(DemoError, match=r"^box 0 \[10.0, 10.0, 500.0, 30.0\] is empty or outside the 320x"):
        client.segment(SAMPLE_ID, box=[10, 10, 500, 30])
    with pytest.raises(DemoError, match=r"^unknown corruption type 'smoke'"):
        client.segment(SAMPLE_ID, box=[10, 10, 50, 30], corruption="smoke")
    with pytest.raises(DemoError, match=r"^annotation 999 is not on images/000001.jpg"):
        client.segment(SAMPLE_ID, box=[10, 10, 50, 30], annotation_id=999)
    plain = io.BytesIO()
    Image.new("RGB", (64, 48), "gray").save(plain, format="PNG")
    upload = client.upload(plain.getvalue(), "plain.png")["id"]
    with pytest.raises(DemoError, match=rf"^annotation 1 is not on {upload}; its annotations: \[\]$"):
        client.segment(upload, box=[1, 1, 30, 30], annotation_id=1)  # an upload has no ground truth
    with pytest.raises(DemoError, match=r"^draw a box or click a point first$"):
        client.segment(SAMPLE_ID)
    with pytest.raises(DemoError, match=r"^no sample image 'sample-999'$"):
        client.segment("sample-999", box=[10, 10, 50, 30])
    with pytest.raises(DemoError, match=r"^box: List should have at least 4 items"):
        client.segment(SAMPLE_ID, box=[10, 10, 50])


TINTED_PIXELS = """() => {
  const plain = document.createElement("canvas");
  return [...document.querySelectorAll("#results .column canvas")].map((canvas) => {
    plain.width = canvas.width;
    plain.height = canvas.height;
    const ctx = plain.getContext("2d");
    ctx.drawImage(state.image, 0, 0, canvas.width, canvas.height);
    const a = ctx.getImageData(0, 0, canvas.width, canvas.height).data;
    const b = canvas.getContext("2d").getImageData(0, 0, canvas.width, canvas.height).data;
    let changed = 0;
    for (let i = 0; i < a.length; i += 4) {
      const diff = Math.abs(a[i] - b[i]) + Math.abs(a[i + 1] - b[i + 1]) + Math.abs(a[i + 2] - b[i + 2]);
      if (diff > 30) changed++;
    }
    return changed;
  });
}"""


def test_chromium_shows_the_controls_and_both_masks(demo_url, client, champion, tmp_path):
    with page_at(demo_url) as page:
        for control in ("#sample", "#upload", "#corruption", "#severity", "#annotation", "#segment",
                        "#clear", "#input-canvas", "input[name=mode][value=box]"):
            assert page.locator(control).is_visible(), control
        assert page.locator("#error").is_visible()  # the model that cannot load, named on the page
        assert MISSING in page.locator("#error").inner_text()

        segment_annotation(page, ANNOTATION, "fog", 4)
        shown = page.locator("#results .column .predicted-iou").all_inner_texts()
        api = client.segment(SAMPLE_ID, corruption="fog", severity=4, annotation_id=ANNOTATION)
        assert shown == [f"{100 * c['predicted_iou']:.1f}" for c in api["columns"][:2]]
        # Each column's canvas (scale 1) differs from the plain picture where its mask is tinted.
        changed = page.evaluate(TINTED_PIXELS)
        for count, column in zip(changed, api["columns"][:2], strict=True):
            area = int(column["mask"].sum())
            assert 0.9 * area <= count <= area + 1500, (count, area)  # + the box outline
        blocks = len(read_manifest(champion["adapter"]).adapted_layers)
        assert page.locator("#results .column .ranks .row").count() == blocks  # the champion's only

        # A box dragged with the mouse around object 8 (shown at scale 1: 320x240), whose own
        # box is [166, 79, 295, 225]: the page scores it on that object.
        done = int(page.locator("#results").get_attribute("data-done"))
        page.click("#clear")
        canvas = page.locator("#input-canvas").bounding_box()
        page.mouse.move(canvas["x"] + 170, canvas["y"] + 80)
        page.mouse.down()
        page.mouse.move(canvas["x"] + 290, canvas["y"] + 220, steps=5)
        page.mouse.up()
        page.wait_for_function(f"Number(document.getElementById('results').dataset.done) > {done}")
        assert page.locator("#results .column .predicted-iou").count() == 2
        status = page.locator("#status").inner_text()
        assert f"ground truth #{ANNOTATION} hanes_socks (matched by box" in status

        page.set_input_files("#upload", files=[{"name": "notes.png", "mimeType": "image/png",
                                                "buffer": b"not an image"}])
        page.wait_for_function("document.getElementById('error').textContent.includes('notes.png')")
        assert "not a readable image" in page.locator("#error").inner_text()

        shot = tmp_path / "demo.png"
        page.screenshot(path=str(shot), full_page=True)
        button = page.locator("#segment").bounding_box()
    image = np.asarray(Image.open(shot).convert("RGB"))
    assert image.shape[1] == 1500 and image.shape[0] >= 600
    assert len(np.unique(image.reshape(-1, 3), axis=0)) > 1000  # photos and masks, not a blank page
    x, y, w, h = (int(round(button[k])) for k in ("x", "y", "width", "height"))
    pixels = image[y:y + h, x:x + w].reshape(-1, 3).astype(int)
    blue = np.abs(pixels - [0x24, 0x57, 0xC5]).sum(axis=1) < 30  # the Segment button, where the DOM puts it
    assert blue.mean() > 0.5


def test_the_command_names_its_default_samples_and_refuses_a_folder_without_annotations(tmp_path):
    from typer.testing import CliRunner

    from gara.cli import app

    runner = CliRunner()
    shown = runner.invoke(app, ["demo", "--help"], env={"COLUMNS": "200"}).output
    assert f"(default: {DEFAULT_SAMPLES}, the embedded held-out split)" in shown
    result = runner.invoke(app, ["demo", "--data", str(tmp_path)])
    assert result.exit_code == 2
    expected = f"error: --data {tmp_path}: no annotations.json there; give a dataset folder"
    assert result.output.strip() == expected
