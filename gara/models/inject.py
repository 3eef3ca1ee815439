"""Put adapters on a model: find target modules by name, wrap them, freeze the rest.

LoRA and GaRA wrap Linear layers; Adaptformer wraps whole modules (a block's MLP). With
COBOT the units' shared tensors (C, P) live once on the model's root as ``cobot``.
"""

from __future__ import annotations

import re

from torch import nn

from gara.models.adapters.adaptformer import AdaptformerLayer, io_features
from gara.models.adapters.cobot import CobotShared, connect_units
from gara.models.adapters.config import AdapterConfig
from gara.models.adapters.gara import GaRALinear
from gara.models.adapters.layer import AdapterLayer
from gara.models.adapters.lora import LoRALinear
from gara.models.adapters.projections import layout_for

SHARED_NAME = "cobot"  # attribute of the model root that holds COBOT's shared C and P


def freeze(model: nn.Module) -> None:
    for p in model.parameters():
        p.requires_grad_(False)


def _make_layer(config: AdapterConfig, target: nn.Module, parent: nn.Module) -> AdapterLayer:
    if config.kind == "adaptformer":
        rank = config.capped(config.rank, io_features(target)[0])
        return AdaptformerLayer(target, rank, dropout=config.dropout, scale=config.scale, cobot=config.cobot)
    layout = layout_for(target, parent)
    # A layer that is not a fused qkv has one part, "out": adapt all of it.
    names = config.projections if set(config.projections) <= set(layout.parts) else ["out"]
    layout = layout.select(names)
    width = target.in_features
    if config.kind == "lora":
        rank = config.capped(config.rank, width)
        return LoRALinear(target, layout, rank=rank, scale=config.scale, cobot=config.cobot)
    return GaRALinear(
        target,
        layout,
        low_rank=config.capped(config.low_rank, width),
        high_rank=config.capped(config.high_rank, width),
        space_gate_hidden=config.space_gate_hidden,
        component_gate_hidden=config.component_gate_hidden,
        tau=config.tau,
        scale=config.scale,
        cobot=config.cobot,
        gate_bias=config.gate_bias,
    )


def _find_targets(model: nn.Module, config: AdapterConfig) -> list[str]:
    """Names of the modules to wrap, in module order. LoRA/GaRA: matching Linear layers.
    Adaptformer: matching modules that contain a Linear, outermost only (a pattern that
    also matches ``mlp.lin1`` inside ``mlp`` wraps the MLP once)."""
    pattern = re.compile(config.target_modules)
    if config.kind != "adaptformer":
        return [n for n, m in model.named_modules() if isinstance(m, nn.Linear) and pattern.search(n)]
    targets: list[str] = []
    for name, module in model.named_modules():
        if not name or not pattern.search(name) or any(name.startswith(f"{t}.") for t in targets):
            continue
        if any(isinstance(m, nn.Linear) for m in module.modules()):
            targets.append(name)
    return targets


def inject_adapters(model: nn.Module, config: AdapterConfig) -> list[str]:
    """Freeze every base parameter and wrap each target module that matches the config.

    Returns the wrapped layers' names. Raises ValueError, listing candidate names, when the
    pattern matches nothing.
    """
    if adapter_layers(model):
        raise ValueError("model already has adapters; build a fresh backbone to inject again")
    freeze(model)
    targets = _find_targets(model, config)
    if not targets:
        if config.kind == "adaptformer":
            what, names = "module with a Linear layer", [n for n, _ in model.named_modules() if n]
            hint = [n for n in names if n.endswith(".mlp")][:4] or names[:4]
        else:
            what, names = "Linear layer", [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]
            hint = [n for n in names if "qkv" in n][:4] or names[:4]
        raise ValueError(
            f"adapter.target_modules {config.target_modules!r} matches no {what}; "
            f"examples of names in this model: {hint}"
        )
    for name in targets:
        parent_name, _, attr = name.rpartition(".")
        parent = model.get_submodule(parent_name)
        setattr(parent, attr, _make_layer(config, getattr(parent, attr), parent))
    shared = connect_units(model, gamma=config.cobot_gamma)
    if shared is not None:
        model.add_module(SHARED_NAME, shared)
    return targets


def adapter_layers(model: nn.Module) -> dict[str, AdapterLayer]:
    return {n: m for n, m in model.named_modules() if isinstance(m, AdapterLayer)}


def adapter_tensors(model: nn.Module) -> list[tuple[str, str, nn.Parameter]]:
    """(owner name, full tensor name, tensor) for every adapter tensor, in module order: each
    layer's own tensors, and COBOT's shared C and P (owner ``cobot``) once."""
    rows = []
    for owner, module in model.named_modules():
        if isinstance(module, AdapterLayer):
            params = module.adapter_parameters()
        elif isinstance(module, CobotShared):
            params = dict(module.named_parameters())
        else:
            continue
        rows += [(owner, f"{owner}.{pname}", p) for pname, p in params.items()]
    return rows


def adapter_state_dict(model: nn.Module) -> dict[str, nn.Parameter]:
    """Only the adapters' tensors, keyed by full name, in module order."""
    return {key: p for _, key, p in adapter_tensors(model)}


def attach_adapter(model: nn.Module, config: AdapterConfig) -> list[str]:
    """Inject adapters and remember their config on the model (saving needs it)."""
    layers = inject_adapters(model, config)
    model.adapter_config = config
    return layers


def parameter_report(model: nn.Module) -> dict:
    """Total and trainable parameter counts, one row per adapted layer, and COBOT's share:
    ``cobot_params`` (shared C and P + every unit's gamma and head; included in trainable)."""
    layers = []
    for name, layer in adapter_layers(model).items():
        layers.append({
            "name": name,
            "kind": layer.adapter_kind,
            "parts": list(layer.part_names),
            "ranks": layer.ranks,
            "params": sum(p.numel() for p in layer.adapter_parameters().values()),
            "cobot_params": layer.cobot_parameter_count(),
        })
    shared = [m for m in model.modules() if isinstance(m, CobotShared)]
    total = sum(p.numel() for p in model.parameters())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return {
        "total_params": total,
        "trainable_params": trainable,
        "frozen_params": total - trainable,
        "cobot_units": sum(len(m.unit_ranks) for m in shared),
        "cobot_params": sum(row["cobot_params"] for row in layers)
        + sum(p.numel() for m in shared for p in m.parameters()),
        "adapted_layers": layers,
    }
