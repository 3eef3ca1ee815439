"""WeSAM (gara/train/wesam.py): weak labels only, the anchor, the contrastive term.

The data is the embedded default corrupted by the pipeline's own code (bench.bench_wesam's
recipe); steps run through the per-step method the Ray loop calls. Whether the anchor keeps
self-training from collapsing and whether WeSAM beats the frozen base are research claims that
hold in some image orders only: bench/bench_wesam.py measures them over orders, with their
spread. The Ray/MLflow path is in tests/test_train.py.
"""

from __future__ import annotations

import math
import os
from pathlib import Path

import numpy as np
import pytest
import torch

from bench.bench_wesam import DATA, PAPER_LORA, REPO, corrupt_embedded, wesam_train
from gara.config import ConfigError, ModelConfig, TrainConfig, load_params
from gara.data.coco import read_coco, write_coco
from gara.data.dataset import InstanceDataset
from gara.data.weak_labels import WeakLabelDataset
from gara.models.adapters.config import AdapterConfig
from gara.models.factory import build_segmenter
from gara.models.inject import adapter_layers
from gara.train.anchor import adapters_disabled
from gara.train.wesam import build_wesam_batch, instance_contrast


def boxes_only(src: Path, dst: Path) -> Path:
    """A copy of a dataset folder whose annotations keep their bbox and lose every mask."""
    coco = read_coco(src)
    dst.mkdir(parents=True)
    for entry in coco["images"]:
        (dst / entry["file_name"]).parent.mkdir(parents=True, exist_ok=True)
        os.link(src / entry["file_name"], dst / entry["file_name"])  # a symlink out would be refused
    anns = [{k: v for k, v in a.items() if k != "segmentation"} for a in coco["annotations"]]
    write_coco(dst, {**coco, "annotations": anns})
    return dst


@pytest.fixture(scope="module")
def corrupted(tmp_path_factory) -> dict[str, Path]:
    if not (DATA / "train" / "annotations.json").is_file():
        pytest.skip("the embedded sample is not here: run `dvc pull data.dvc`")
    return corrupt_embedded(tmp_path_factory.mktemp("wesam-data"))


# --- weak labels only -----------------------------------------------------------------------
def test_wesam_trains_from_boxes_only_and_never_touches_a_mask(corrupted, tmp_path, monkeypatch):
    data = boxes_only(corrupted["train"], tmp_path / "boxes")
    assert all("segmentation" not in a for a in read_coco(data)["annotations"])

    def no_masks(*args, **kwargs):
        raise AssertionError("WeSAM decoded a mask")

    # The one decoder of masks in the project (and its name inside the weak-label module).
    monkeypatch.setattr("gara.data.coco.annotation_mask", no_masks)
    monkeypatch.setattr("gara.data.weak_labels.annotation_mask", no_masks)
    torch.manual_seed(0)
    seg = build_segmenter(ModelConfig(backbone="vit_tiny", adapter=PAPER_LORA), pretrained=False)
    before = {k: p.detach().clone() for k, p in seg.named_parameters() if p.requires_grad}
    history = wesam_train(seg, data, steps=2, lr=1e-3)
    assert all(math.isfinite(h["loss"]) and h["loss"] > 0 for h in history)
    assert {"loss/self", "loss/anchor", "loss/contrast"} <= set(history[0])
    assert any(not torch.equal(before[k], p) for k, p in seg.named_parameters() if p.requires_grad)

    sample = WeakLabelDataset(data)[0]
    assert "masks" not in sample and sample["points"] is None
    # Clicks are simulated from a segmentation: a bbox-only dataset refuses them, by name.
    with pytest.raises(ValueError, match="'point' is derived from a 'segmentation'"):
        WeakLabelDataset(data, kinds=["box", "point"])
    # And the step refuses samples that carry full masks (the supervised dataset's).
    monkeypatch.undo()
    with pytest.raises(TypeError, match="weak labels only"):
        build_wesam_batch(seg, [InstanceDataset(corrupted["train"])[0]], TrainConfig().wesam, 4, 0, 0)


def test_weak_labels_from_a_full_dataset(corrupted):
    ds = WeakLabelDataset(corrupted["train"], kinds=["box", "point", "polygon"], n_points=5)
    full = InstanceDataset(corrupted["train"])[0]
    sample = ds[0]
    k = len(full["masks"])
    assert sample["boxes"].shape == (k, 4) and sample["points"].shape == (k, 10, 2)
    assert sample["point_labels"].tolist() == [[1] * 5 + [0] * 5] * k
    labels = zip(full["masks"], sample["points"], sample["boxes"], sample["polygon_boxes"], strict=True)
    for mask, pts, box, coarse in labels:
        inside = mask[pts[:, 1].astype(int), pts[:, 0].astype(int)]
        assert inside[:5].all() and not inside[5:].any()  # positives in, negatives out
        assert (coarse[:2] >= box[:2] - 1).all() and (coarse[2:] <= box[2:] + 1).all()  # within the bbox
    again = WeakLabelDataset(corrupted["train"], kinds=["point"], n_points=5)[0]
    assert np.array_equal(again["points"], sample["points"])  # one annotator: the same clicks


# --- the anchor and the contrastive term ----------------------------------------------------
@pytest.mark.parametrize("kind", ["lora", "gara"])
def test_the_anchor_is_the_frozen_base_exactly(tiny_vit_checkpoint, kind):
    config = ModelConfig(backbone="vit_tiny", checkpoint=str(tiny_vit_checkpoint.path),
                         adapter=AdapterConfig(kind=kind))
    torch.manual_seed(0)
    adapted = build_segmenter(config).eval()
    with torch.no_grad():
        for p in adapted.parameters():
            if p.requires_grad:
                p.normal_(0, 0.2)  # a trained adapter: its path changes the output
    base = build_segmenter(config, with_adapter=False).eval()
    images = torch.randn(2, 3, 256, 256)
    from gara.models.segmenter import Prompts

    prompts = [Prompts(boxes=torch.tensor([[10.0, 20.0, 120.0, 200.0]]))] * 2
    with torch.no_grad():
        expected = base(images, prompts).low_res_logits
        with adapters_disabled(adapted):
            anchor = adapted(images, prompts).low_res_logits
        after = adapted(images, prompts).low_res_logits
    assert all(torch.equal(a, e) for a, e in zip(anchor, expected, strict=True))
    assert not all(torch.equal(a, e) for a, e in zip(after, expected, strict=True))  # adapters back on
    # A switch the forward reads, not a patched method: nothing on the instances changed.
    layers = adapter_layers(adapted).values()
    assert all(layer.adapter_enabled and "forward" not in vars(layer) for layer in layers)


def test_contrastive_loss_is_zero_for_one_instance_and_positive_when_mismatched():
    torch.manual_seed(0)
    embedding = torch.randn(16, 8, 8)  # (C, h, w); logits are 4x finer, as SAM's decoder
    logits = torch.full((3, 1, 32, 32), -10.0)
    for i, rows in enumerate((slice(0, 8), slice(12, 20), slice(24, 32))):
        logits[i, 0, rows] = 10.0  # three instances in three bands of the image
    region = [(32, 32)]

    def loss(teacher_logits, anchor_logits):
        return float(instance_contrast(embedding[None], [teacher_logits], embedding[None], [anchor_logits],
                                       region, tau=0.3))

    assert loss(logits[:1], logits[:1]) == 0.0
    matched, mismatched = loss(logits, logits), loss(logits, logits[[1, 2, 0]])
    assert mismatched > math.log(3) > matched > 0  # worse than chance when every pair is wrong


def test_loss_terms_switch_off_one_by_one_and_not_all_at_once(tmp_path):
    assert TrainConfig().method == "supervised"
    params = load_params(REPO / "params.yaml", {"train.method": "wesam", "train.wesam.anchor": False})
    assert params.train.wesam.anchor == 0 and params.train.wesam.self_training == 1
    off = {f"train.wesam.{k}": False for k in ("self_training", "anchor", "contrastive")}
    with pytest.raises(ConfigError, match="train.wesam: .*nothing to train"):
        load_params(REPO / "params.yaml", off)
    with pytest.raises(ConfigError, match="train.method"):
        load_params(REPO / "params.yaml", {"train.method": "wesm"})
