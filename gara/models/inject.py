"""Put adapters on a model: find target Linear layers by name, wrap them, freeze the rest."""

from __future__ import annotations

import re

from torch import nn

from gara.models.adapters.config import AdapterConfig
from gara.models.adapters.gara import GaRALinear
from gara.models.adapters.lora import LoRALinear
from gara.models.adapters.lowrank import LowRankAdapterLinear
from gara.models.adapters.projections import layout_for


def freeze(model: nn.Module) -> None:
    for p in model.parameters():
        p.requires_grad_(False)


def _make_layer(config: AdapterConfig, linear: nn.Linear, parent: nn.Module) -> LowRankAdapterLinear:
    layout = layout_for(linear, parent)
    # A layer that is not a fused qkv has one part, "out": adapt all of it.
    names = config.projections if set(config.projections) <= set(layout.parts) else ["out"]
    layout = layout.select(names)
    width = linear.in_features
    if config.kind == "lora":
        return LoRALinear(linear, layout, rank=config.capped(config.rank, width), scale=config.scale)
    return GaRALinear(
        linear,
        layout,
        low_rank=config.capped(config.low_rank, width),
        high_rank=config.capped(config.high_rank, width),
        space_gate_hidden=config.space_gate_hidden,
        component_gate_hidden=config.component_gate_hidden,
        tau=config.tau,
        scale=config.scale,
    )


def inject_adapters(model: nn.Module, config: AdapterConfig) -> list[str]:
    """Freeze every base parameter and wrap each Linear whose name matches the config.

    Returns the wrapped layers' names. Raises ValueError, listing candidate names, when the
    pattern matches nothing.
    """
    if adapter_layers(model):
        raise ValueError("model already has adapters; build a fresh backbone to inject again")
    freeze(model)
    pattern = re.compile(config.target_modules)
    targets = [
        name
        for name, module in model.named_modules()
        if isinstance(module, nn.Linear) and pattern.search(name)
    ]
    if not targets:
        linears = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]
        hint = [n for n in linears if "qkv" in n][:4] or linears[:4]
        raise ValueError(
            f"adapter.target_modules {config.target_modules!r} matches no Linear layer; "
            f"examples of names in this model: {hint}"
        )
    for name in targets:
        parent_name, _, attr = name.rpartition(".")
        parent = model.get_submodule(parent_name)
        setattr(parent, attr, _make_layer(config, getattr(parent, attr), parent))
    return targets


def adapter_layers(model: nn.Module) -> dict[str, LowRankAdapterLinear]:
    return {n: m for n, m in model.named_modules() if isinstance(m, LowRankAdapterLinear)}


def adapter_tensors(model: nn.Module) -> list[tuple[str, str, nn.Parameter]]:
    """(layer name, full tensor name, tensor) for every adapter tensor, in module order."""
    return [
        (layer_name, f"{layer_name}.{pname}", p)
        for layer_name, layer in adapter_layers(model).items()
        for pname, p in layer.adapter_parameters().items()
    ]


def adapter_state_dict(model: nn.Module) -> dict[str, nn.Parameter]:
    """Only the adapters' tensors, keyed by full name, in module order."""
    return {key: p for _, key, p in adapter_tensors(model)}


def attach_adapter(model: nn.Module, config: AdapterConfig) -> list[str]:
    """Inject adapters and remember their config on the model (saving needs it)."""
    layers = inject_adapters(model, config)
    model.adapter_config = config
    return layers


def parameter_report(model: nn.Module) -> dict:
    """Total and trainable parameter counts, and one row per adapted layer."""
    layers = []
    for name, layer in adapter_layers(model).items():
        row = {
            "name": name,
            "kind": layer.adapter_kind,
            "parts": list(layer.part_names),
            "params": sum(p.numel() for p in layer.adapter_parameters().values()),
        }
        if isinstance(layer, GaRALinear):
            row["ranks"] = [layer.low_rank, layer.high_rank]
        else:
            row["ranks"] = [layer.rank]
        layers.append(row)
    total = sum(p.numel() for p in model.parameters())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return {
        "total_params": total,
        "trainable_params": trainable,
        "frozen_params": total - trainable,
        "adapted_layers": layers,
    }
