"""The adapter artifact: ``adapter.safetensors`` (adapter tensors only) + ``adapter.json``.

The JSON says what the tensors are for (adapter kind and sizes, target layers, backbone)
and which base checkpoint they belong to (URI + sha256): the base is referenced, never
copied. Loading checks both files against each other and against the model.

The frozen base itself has the same form with ``adapter: null`` and no tensors
(:func:`save_frozen_base`): the registry serves it as a model version when no adapter has
beaten it, through the very same loading path.
"""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from gara.fsutil import atomic_write, atomic_write_json
from gara.models.adapters.config import AdapterConfig
from gara.models.backbones import build_backbone
from gara.models.checkpoints import file_sha256
from gara.models.factory import wrap_backbone
from gara.models.inject import (
    adapter_layers,
    adapter_state_dict,
    adapter_tensors,
    attach_adapter,
    parameter_report,
)
from gara.models.manifest import (
    CONFIG_FILE,
    WEIGHTS_FILE,
    AdapterFormatError,
    AdapterManifest,
    read_manifest,
)
from gara.models.segmenter import Segmenter


def save_adapter(segmenter: Segmenter, directory: str | Path) -> Path:
    """Write the adapter of ``segmenter`` into ``directory`` (weights first, JSON last)."""
    config: AdapterConfig | None = getattr(segmenter, "adapter_config", None)
    if config is None:
        raise AdapterFormatError("this segmenter has no adapter to save")
    return _save(segmenter, config, Path(directory))


def save_frozen_base(segmenter: Segmenter, directory: str | Path) -> Path:
    """Write an adapter-free folder for the frozen base of ``segmenter`` (its checkpoint is
    referenced by URI + sha256, as for any adapter)."""
    if segmenter.checkpoint_sha256 is None:
        raise AdapterFormatError("a base built without pretrained weights cannot be referenced")
    return _save(segmenter, None, Path(directory))


def _save(segmenter: Segmenter, config: AdapterConfig | None, directory: Path) -> Path:
    state = {k: v.detach().cpu().contiguous() for k, v in adapter_state_dict(segmenter).items()}
    if config is None and state:
        raise AdapterFormatError(
            "save_frozen_base: this segmenter carries an adapter; save it with save_adapter")
    weights = directory / WEIGHTS_FILE
    atomic_write(weights, lambda tmp: save_file(state, str(tmp), metadata={"format": "pt"}))
    manifest = AdapterManifest(
        adapter=config,
        backbone=segmenter.backbone_name,
        base_checkpoint=segmenter.checkpoint,
        base_checkpoint_sha256=segmenter.checkpoint_sha256,
        weights_sha256=file_sha256(weights),
        adapted_layers=list(adapter_layers(segmenter)),
        trainable_params=parameter_report(segmenter)["trainable_params"],
    )
    atomic_write_json(directory / CONFIG_FILE, manifest.model_dump(mode="json"))
    return directory


def load_adapter_weights(segmenter: Segmenter, directory: str | Path) -> None:
    """Load saved adapter tensors into a segmenter that already carries the same adapters.

    Fails, naming the first layer that does not fit, before changing anything.
    """
    directory = Path(directory)
    manifest = read_manifest(directory)
    weights = directory / WEIGHTS_FILE
    if not weights.is_file():
        raise AdapterFormatError(f"{weights}: missing")
    actual = file_sha256(weights)
    if actual != manifest.weights_sha256:
        raise AdapterFormatError(
            f"{weights}: sha256 {actual} differs from {CONFIG_FILE}'s {manifest.weights_sha256} "
            "(the two files are from different saves, or the weights were modified)"
        )
    saved = load_file(str(weights))
    expected = adapter_tensors(segmenter)
    for layer, name, param in expected:
        if name not in saved:
            raise AdapterFormatError(
                f"layer {layer}: tensor {name} is not in {weights} (the adapter was made for "
                f"another model: backbone {manifest.backbone!r}, layers {manifest.adapted_layers[:3]}...)"
            )
        if saved[name].shape != param.shape:
            raise AdapterFormatError(
                f"layer {layer}: {name} has shape {tuple(saved[name].shape)} in {weights} but "
                f"{tuple(param.shape)} in this {segmenter.backbone_name!r} model"
            )
    known = {name for _, name, _ in expected}
    extra = [k for k in saved if k not in known]
    if extra:
        raise AdapterFormatError(f"{weights}: tensors this model has no place for, e.g. {extra[0]}")
    with torch.no_grad():
        for _, name, param in expected:
            param.copy_(saved[name])


def load_adapted_segmenter(
    directory: str | Path,
    checkpoint: str | None = None,
    s3_endpoint_url: str | None = None,
) -> Segmenter:
    """Rebuild base + adapter from an adapter folder.

    The base comes from ``checkpoint`` (a path or s3:// URL; default: the one recorded in
    the folder, or the backbone's packaged weights) and must have the recorded sha256.
    """
    manifest = read_manifest(directory)
    if checkpoint is None and manifest.base_checkpoint is None:
        raise AdapterFormatError(
            f"{directory}: the adapter was trained on a {manifest.backbone} without pretrained "
            "weights, so its base cannot be rebuilt; load it with load_adapter_weights into that model"
        )
    backbone = build_backbone(
        manifest.backbone,
        checkpoint=checkpoint or manifest.base_checkpoint,
        checkpoint_sha256=manifest.base_checkpoint_sha256,
        s3_endpoint_url=s3_endpoint_url,
    )
    segmenter = wrap_backbone(backbone)
    if manifest.adapter is not None:
        attach_adapter(segmenter, manifest.adapter)
    load_adapter_weights(segmenter, directory)  # the frozen base: checks that the file holds nothing
    segmenter.adapter_weights_sha256 = manifest.weights_sha256  # reports record what they scored
    segmenter.eval()
    return segmenter
