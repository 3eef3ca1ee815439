"""The adapter artifact: safetensors + JSON, bit-for-bit round trip, clear refusals."""

from __future__ import annotations

import hashlib
import json

import pytest
import torch

from gara.config import ModelConfig
from gara.models.adapter_io import (
    CONFIG_FILE,
    WEIGHTS_FILE,
    AdapterFormatError,
    load_adapted_segmenter,
    load_adapter_weights,
    read_manifest,
    save_adapter,
    save_frozen_base,
)
from gara.models.adapters.config import AdapterConfig
from gara.models.factory import build_segmenter
from gara.models.inject import adapter_layers
from tests.test_adapters import batch_for, outputs


@pytest.fixture
def tiny_base(tiny_vit_checkpoint) -> str:
    return str(tiny_vit_checkpoint.path)


def _trained_like(config: ModelConfig, seed: int = 3):
    seg = build_segmenter(config)
    torch.manual_seed(seed)
    with torch.no_grad():  # stand-in for training: every adapter tensor gets new values
        for layer in adapter_layers(seg).values():
            for p in layer.adapter_parameters().values():
                p.add_(torch.randn_like(p) * 0.05)
    return seg.eval()


@pytest.mark.parametrize("kind", ["gara", "lora"])
def test_save_then_load_reproduces_outputs_bit_for_bit(tiny_base, tmp_path, kind):
    config = ModelConfig(backbone="vit_tiny", checkpoint=tiny_base, adapter=AdapterConfig(kind=kind))
    seg = _trained_like(config)
    save_adapter(seg, tmp_path / "adapter")
    assert sorted(p.name for p in (tmp_path / "adapter").iterdir()) == [CONFIG_FILE, WEIGHTS_FILE]
    manifest = read_manifest(tmp_path / "adapter")
    assert manifest.backbone == "vit_tiny" and manifest.adapter.kind == kind
    assert manifest.base_checkpoint_sha256 == hashlib.sha256(open(tiny_base, "rb").read()).hexdigest()
    assert manifest.adapted_layers == [f"image_encoder.blocks.{i}.attn.qkv" for i in range(4)]

    loaded = load_adapted_segmenter(tmp_path / "adapter")
    batch, prompts, _ = batch_for(seg)
    with torch.no_grad():
        assert torch.equal(outputs(loaded, batch, prompts), outputs(seg, batch, prompts))


def test_adapter_file_holds_adapter_tensors_only(tiny_base, tmp_path):
    from safetensors.torch import load_file

    seg = _trained_like(ModelConfig(backbone="vit_tiny", checkpoint=tiny_base))
    save_adapter(seg, tmp_path / "a")
    tensors = load_file(str(tmp_path / "a" / WEIGHTS_FILE))
    assert not any(".base." in k for k in tensors)
    assert sum(t.numel() for t in tensors.values()) == read_manifest(tmp_path / "a").trainable_params


def test_loading_into_another_shape_names_the_first_mismatched_layer(tiny_base, tmp_path):
    seg = _trained_like(ModelConfig(backbone="vit_tiny", checkpoint=tiny_base))
    save_adapter(seg, tmp_path / "a")
    other = build_segmenter(ModelConfig(backbone="vit_small"), pretrained=False)
    before = {k: v.clone() for k, v in other.state_dict().items()}
    with pytest.raises(AdapterFormatError, match=r"layer image_encoder\.blocks\.0\.attn\.qkv: .*shape"):
        load_adapter_weights(other, tmp_path / "a")
    assert all(torch.equal(v, before[k]) for k, v in other.state_dict().items()), "nothing changed"


def test_weights_and_json_from_different_saves_are_refused(tiny_base, tmp_path):
    config = ModelConfig(backbone="vit_tiny", checkpoint=tiny_base)
    save_adapter(_trained_like(config, seed=1), tmp_path / "a")
    save_adapter(_trained_like(config, seed=2), tmp_path / "b")
    (tmp_path / "a" / WEIGHTS_FILE).write_bytes((tmp_path / "b" / WEIGHTS_FILE).read_bytes())
    with pytest.raises(AdapterFormatError, match="sha256"):
        load_adapted_segmenter(tmp_path / "a")


def test_broken_json_is_refused_with_the_file_named(tmp_path):
    (tmp_path / CONFIG_FILE).write_text(json.dumps({"adapter": {"kind": "dora"}}))
    with pytest.raises(AdapterFormatError, match=CONFIG_FILE):
        read_manifest(tmp_path)


def test_the_frozen_base_saves_as_an_adapter_free_folder(tiny_base, tmp_path):
    config = ModelConfig(backbone="vit_tiny", checkpoint=tiny_base)
    frozen = build_segmenter(config, with_adapter=False).eval()
    folder = save_frozen_base(frozen, tmp_path / "base")
    manifest = read_manifest(folder)
    assert manifest.adapter is None and manifest.adapted_layers == [] and manifest.trainable_params == 0
    assert manifest.base_checkpoint_sha256 == frozen.checkpoint_sha256
    loaded = load_adapted_segmenter(folder)
    assert not adapter_layers(loaded)
    batch, prompts, _ = batch_for(frozen)
    with torch.no_grad():
        assert torch.equal(outputs(loaded, batch, prompts), outputs(frozen, batch, prompts))
    with pytest.raises(AdapterFormatError, match="carries an adapter"):
        save_frozen_base(build_segmenter(config), tmp_path / "not-frozen")
