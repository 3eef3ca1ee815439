"""SAM-COBOT (inter-block communication + quaternion head) and Adaptformer.

Sizes follow shared/methods/cobot.md; behaviour: exact start at the frozen model, coupling
through P, the folded GaRA evaluation path, a bit-for-bit artifact, real training steps.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from pydantic import ValidationError
from typer.testing import CliRunner

from gara.config import ConfigError, ModelConfig, PromptConfig, load_params
from gara.models.adapter_io import (
    WEIGHTS_FILE,
    AdapterFormatError,
    load_adapted_segmenter,
    load_adapter_weights,
    save_adapter,
)
from gara.models.adapters.cobot import CobotShared, connect_units, quaternion_weight
from gara.models.adapters.cobot import hamilton_matrices as hamilton
from gara.models.adapters.config import DEFAULT_TARGETS, AdapterConfig
from gara.models.adapters.gara import GaRALinear
from gara.models.adapters.projections import layout_for
from gara.models.backbones import build_backbone
from gara.models.factory import build_segmenter
from gara.models.inject import (
    adapter_layers,
    adapter_state_dict,
    adapter_tensors,
    attach_adapter,
    parameter_report,
)
from gara.models.segmenter import Segmenter
from tests.test_adapters import batch_for, make_segmenter, outputs


def info_json(*args: str) -> dict:
    from gara.cli import app

    result = CliRunner().invoke(app, ["info", *args, "--json"])
    assert result.exit_code == 0, result.output
    return json.loads(result.output)


# --- sizes -------------------------------------------------------------------------------
def test_info_reports_cobot_params_for_lora_r4_q_v_on_vit_b():
    """24 units (q and v of 12 blocks), r = 4: C 4*24 + P 24*24 + gamma 24*4 + heads 24*4*1*1."""
    report = info_json("--backbone", "vit_b", "--adapter", "lora", "--rank", "4", "--targets", "q,v",
                       "--cobot")
    assert report["cobot_params"] == 96 + 576 + 96 + 96 == 864
    assert report["cobot_units"] == 24
    assert report["trainable_params"] == 147_456 + 864
    assert sum(row["cobot_params"] for row in report["adapted_layers"]) == 864 - 96 - 576  # C, P: shared


def test_info_reports_adaptformer_r16_with_and_without_cobot_on_vit_b():
    """Adaptformer r16 on 12 MLPs: 12 * (768*16 + 16 + 16*768 + 768) = 304,320; COBOT with 12
    units: C 16*12 + P 12*12 + gamma 12*16 + heads 12*4*4*4 = 1,296."""
    plain = info_json("--backbone", "vit_b", "--adapter", "adaptformer")
    assert plain["trainable_params"] == 12 * (768 * 16 + 16 + 16 * 768 + 768) == 304_320
    assert plain["cobot_params"] == 0
    names = [row["name"] for row in plain["adapted_layers"]]
    assert names == [f"image_encoder.blocks.{i}.mlp" for i in range(12)]
    report = info_json("--backbone", "vit_b", "--adapter", "adaptformer", "--cobot")
    assert report["cobot_params"] == 192 + 144 + 192 + 768 == 1_296
    assert report["trainable_params"] == 304_320 + 1_296


def test_gara_cobot_units_are_rank_spaces_of_each_projection_on_vit_b():
    """72 units (12 blocks x q,k,v x low/high space), one C with r_max = 256 rows:
    C 256*72 + P 72*72 + gamma 36*(16+256) + heads 36*(4*4*4 + 4*64*64) = 625,536."""
    seg = Segmenter(build_backbone("vit_b", pretrained=False))
    attach_adapter(seg, AdapterConfig(kind="gara", cobot=True))
    report = parameter_report(seg)
    assert report["cobot_units"] == 72
    assert report["cobot_params"] == 256 * 72 + 72 * 72 + 36 * 272 + 36 * (64 + 16_384) == 625_536
    assert report["trainable_params"] == 15_989_196 + 625_536


# --- the quaternion head ------------------------------------------------------------------
def test_quaternion_head_equals_the_explicit_block_matrix():
    torch.manual_seed(0)
    blocks = torch.randn(2, 4, 3, 3)  # two units, r = 12
    w = quaternion_weight(blocks, hamilton())
    for unit in range(2):
        r, i, j, k = blocks[unit]
        explicit = torch.cat([
            torch.cat([r, i, j, k], dim=1),
            torch.cat([-i, r, k, -j], dim=1),
            torch.cat([-j, -k, r, i], dim=1),
            torch.cat([-k, j, -i, r], dim=1),
        ])
        torch.testing.assert_close(w[unit], explicit, rtol=0, atol=1e-6)
    identity = torch.zeros(1, 4, 3, 3)
    identity[:, 0] = torch.eye(3)
    assert torch.equal(quaternion_weight(identity, hamilton())[0], torch.eye(12)), "R = I, rest 0: W_h = I"


# --- exact start --------------------------------------------------------------------------
@pytest.mark.parametrize(("backbone", "kind", "cobot"), [
    ("vit_tiny", "lora", True),
    ("vit_tiny", "adaptformer", False),
    ("vit_tiny", "adaptformer", True),
    ("vit_tiny", "gara", True),
])
def test_adapted_model_starts_exactly_at_frozen_model(backbone, kind, cobot):
    frozen = make_segmenter(backbone, None)
    adapted = make_segmenter(backbone, kind, cobot=cobot)
    if cobot:
        assert isinstance(adapted.cobot, CobotShared)
    batch, prompts, _ = batch_for(frozen)
    with torch.no_grad():
        expected = outputs(frozen, batch, prompts)
        assert torch.equal(outputs(adapted, batch, prompts), expected)
        adapted.train()  # dropout and gate sampling on; the zero up-projection still adds 0
        assert torch.equal(outputs(adapted, batch, prompts), expected)


def test_adaptformer_targets_each_block_mlp_and_keeps_the_base_in_inference_mode():
    # LiteMedSAM (TinyViT): one adapter per transformer block's Mlp (the conv stage has none),
    # exact at init on that Mlp too (it normalises its input itself).
    seg = Segmenter(build_backbone("lite_medsam", pretrained=False))
    attach_adapter(seg, AdapterConfig(kind="adaptformer", cobot=True))
    names = list(adapter_layers(seg))
    assert len(names) == 10
    assert all(n.startswith("image_encoder.layers.") and n.endswith(".mlp") for n in names)
    first = adapter_layers(seg)[names[0]]
    x = torch.randn(2, 49, first.in_features)
    with torch.no_grad():
        assert torch.equal(first(x), first.base(x))
    # A pattern that also matches the Linears inside an MLP wraps the MLP once.
    tiny = make_segmenter("vit_tiny", "adaptformer", target_modules=r"blocks\.\d+\.mlp")
    assert list(adapter_layers(tiny)) == [f"image_encoder.blocks.{i}.mlp" for i in range(4)]
    layer = adapter_layers(tiny)["image_encoder.blocks.0.mlp"]
    tiny.train()
    assert layer.training and layer.dropout.training and not layer.base.training
    # delta = scale * up(Dropout(ReLU(down(x)))), checked by hand in evaluation mode.
    tiny.eval()
    with torch.no_grad():
        layer.up.weight.normal_()
        x = torch.randn(2, 8, 8, 128)
        expected = layer.base(x) + torch.relu(x @ layer.down.weight.T + layer.down.bias) @ layer.up.weight.T
        torch.testing.assert_close(layer(x), expected + layer.up.bias)


def test_per_kind_default_targets_and_bad_config_errors():
    assert AdapterConfig().target_modules == r"^image_encoder\..*attn\.qkv$"  # unchanged for LoRA/GaRA
    assert AdapterConfig(kind="lora").target_modules == DEFAULT_TARGETS["lora"]
    assert AdapterConfig(kind="adaptformer").target_modules == DEFAULT_TARGETS["adaptformer"]
    assert AdapterConfig(kind="adaptformer", target_modules="mlp$").target_modules == "mlp$"
    with pytest.raises(ValidationError, match="rank=6"):
        AdapterConfig(kind="lora", rank=6, cobot=True)
    with pytest.raises(ValidationError, match="high_rank=250"):
        AdapterConfig(kind="gara", high_rank=250, cobot=True)
    with pytest.raises(ConfigError, match=r"model\.adapter: .*divisible by 4.*rank=10"):
        load_params(None, {"model.adapter.kind": "adaptformer", "model.adapter.rank": 10,
                          "model.adapter.cobot": True})
    # Capped ranks stay multiples of 4 with COBOT (0.1 * 100 = 10 -> 8).
    assert AdapterConfig(kind="lora", cobot=True, rank_cap_fraction=0.1).capped(16, 100) == 8
    assert AdapterConfig(kind="lora", rank_cap_fraction=0.1).capped(16, 100) == 10


# --- inter-block communication ------------------------------------------------------------
def test_relation_matrix_couples_units_across_blocks():
    """A loss on block 3's q output reaches block 0's column of C only through P[0, l]."""
    seg = make_segmenter("vit_tiny", "lora", rank=4, projections=["q", "v"], cobot=True)
    layers = adapter_layers(seg)
    last = layers["image_encoder.blocks.3.attn.qkv"]
    q_unit = last.cobot.first  # units: (q, v) per block in module order
    assert (q_unit, seg.cobot.C.shape) == (6, (4, 8))
    torch.manual_seed(0)
    with torch.no_grad():
        last.lora_B["q"].normal_()
    x = torch.randn(2, 8, 8, 128)

    def grad_of_c() -> torch.Tensor:
        seg.cobot.C.grad = None
        last(x)[..., :128].square().sum().backward()  # q channels of block 3 only
        return seg.cobot.C.grad

    grad = grad_of_c()
    assert grad[:, q_unit].abs().sum() > 0
    assert grad[:, :q_unit].abs().sum() == 0, "P = I at init: no other unit's coefficients are used"
    with torch.no_grad():
        seg.cobot.P[0, q_unit] = 0.5  # block 0's q unit now feeds block 3's q unit
    grad = grad_of_c()
    assert grad[:, 0].abs().sum() > 0
    assert grad[:, 1:q_unit].abs().sum() == 0
    assert seg.cobot.P.grad[:, q_unit].abs().sum() > 0


def _randomise(seg: Segmenter, seed: int = 0, std: float = 0.1) -> None:
    """Every adapter tensor, COBOT's shared C and P included, moves away from its init."""
    torch.manual_seed(seed)
    with torch.no_grad():
        for _, _, p in adapter_tensors(seg):
            p.add_(torch.randn_like(p) * std)


# --- GaRA + COBOT: evaluation path --------------------------------------------------------
def test_gara_cobot_evaluation_matches_the_dense_formula():
    """Eval computes only the active components with COBOT folded into A and B; it must equal
    both the dense training-path computation (same gates, no noise) and the formula written
    out: h = W_h^T (c * (c_l + gamma_l) * A x) per rank space, delta = B h."""
    torch.manual_seed(0)
    base = torch.nn.Linear(32, 96)

    class Attn(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.qkv = base

    attn = Attn()
    layer = GaRALinear(base, layout_for(base, attn), low_rank=4, high_rank=16, cobot=True)
    attn.qkv = layer
    attn.cobot = connect_units(attn, gamma=1.0)
    _randomise(attn)
    layer.eval()
    with torch.no_grad():
        x = torch.randn(12, 5, 32)
        x[:6] += 2.0
        y = layer(x)
        coeff, space = layer.gate_coefficients(x.mean(1))
        assert 0 < space.sum() < len(space), "test needs inputs in both spaces"
        dense = base(x).clone()
        layer._add_low_rank(dense, x, coeff)
        torch.testing.assert_close(y, dense, rtol=1e-5, atol=1e-5)

        cp = attn.cobot.C @ attn.cobot.P  # columns: low q,k,v then high q,k,v
        z = torch.einsum("ntc,prc->ntpr", x, layer.lora_A)
        by_hand = base(x).clone()
        for i, part in enumerate(("q", "k", "v")):
            for s, cut in enumerate((slice(0, 4), slice(4, 20))):
                r = cut.stop - cut.start
                u = coeff[:, None, cut] * (cp[:r, 3 * s + i] + layer.cobot.gamma[i, cut]) * z[:, :, i, cut]
                h = u @ quaternion_weight(layer.cobot.heads[s][i], hamilton())
                by_hand[..., 32 * i : 32 * (i + 1)] += h @ layer.lora_B[part][:, cut].T
        torch.testing.assert_close(y, by_hand, rtol=1e-5, atol=1e-5)


# --- the artifact -------------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["lora", "adaptformer", "gara"])
def test_cobot_adapter_saves_and_loads_bit_for_bit(tiny_vit_checkpoint, tmp_path, kind):
    from safetensors.torch import load_file

    config = ModelConfig(backbone="vit_tiny", checkpoint=str(tiny_vit_checkpoint.path),
                         adapter=AdapterConfig(kind=kind, cobot=True, high_rank=32))
    seg = build_segmenter(config)
    _randomise(seg, seed=3)
    seg.eval()
    save_adapter(seg, tmp_path / "a")
    saved = load_file(str(tmp_path / "a" / WEIGHTS_FILE))
    assert {"cobot.C", "cobot.P"} <= set(saved) and not any(".base." in k for k in saved)
    assert sum("cobot.C" in k for k in saved) == 1, "C is stored once, not per unit"
    assert any(k.endswith(".cobot.gamma") for k in saved) and any(".cobot.heads." in k for k in saved)

    loaded = load_adapted_segmenter(tmp_path / "a")
    original, restored = adapter_state_dict(seg), adapter_state_dict(loaded)
    assert list(restored) == list(original)
    assert all(torch.equal(restored[k], original[k]) for k in original)
    batch, prompts, _ = batch_for(seg)
    with torch.no_grad():
        assert torch.equal(outputs(loaded, batch, prompts), outputs(seg, batch, prompts))

    plain = build_segmenter(config.model_copy(update={"adapter": AdapterConfig(kind=kind, high_rank=32)}))
    with pytest.raises(AdapterFormatError, match="no place for"):
        load_adapter_weights(plain, tmp_path / "a")


# --- training -----------------------------------------------------------------------------
def _samples(n: int, size: int) -> list[dict]:
    rng = np.random.default_rng(0)
    h, w = size * 3 // 4, size
    samples = []
    for i in range(n):
        masks = np.zeros((2, h, w), bool)
        masks[0, 10:60, 20:90] = True
        masks[1, 70:150, 100:200] = True
        samples.append({
            "image": rng.integers(0, 256, (h, w, 3), dtype=np.uint8), "masks": masks,
            "boxes": np.zeros((2, 4), np.float32), "category_ids": np.ones(2, np.int64),
            "ann_ids": np.arange(2, dtype=np.int64) + 2 * i, "iscrowd": np.zeros(2, bool),
            "image_id": i, "file_name": f"{i}.png", "meta": {},
        })
    return samples


@pytest.mark.parametrize("kind", ["lora", "adaptformer", "gara"])
def test_training_steps_reach_and_change_every_cobot_tensor(kind):
    """Step 1 moves the zero up-projections; from step 2 on COBOT's tensors get gradients.
    Every trainable tensor gets a gradient (DDP runs with find_unused_parameters=False)."""
    from gara.train.batches import build_batch
    from gara.train.loop import train_step
    from gara.train.losses import LossWeights

    torch.manual_seed(0)
    seg = make_segmenter("vit_tiny", kind, cobot=True, high_rank=32)
    params = {name: p for name, p in seg.named_parameters() if p.requires_grad}
    cobot = {n: p.detach().clone() for n, p in params.items() if n.startswith("cobot.") or ".cobot." in n}
    assert len(cobot) >= 2 + 2 * len(adapter_layers(seg))  # C, P + gamma and a head per layer
    optimizer = torch.optim.Adam(params.values(), lr=1e-3, weight_decay=0.0)
    samples = _samples(2, seg.transform.size)
    seg.train()
    for step in range(2):
        batch = build_batch(seg, samples, PromptConfig(kinds=["box"]), seed=0, epoch=step)
        train_step(seg, seg, batch, optimizer, LossWeights(20.0, 1.0, 1.0), grad_clip=1.0)
    missing = [n for n, p in params.items() if p.grad is None]
    assert not missing, f"tensors the loss does not reach: {missing}"
    layers = adapter_layers(seg)
    for name, before in cobot.items():
        owner, _, tensor = name.partition(".cobot.")
        if tensor.startswith("heads.") and isinstance(layers.get(owner), GaRALinear):
            # A rank space's head learns only from inputs whose space gate chose it.
            high = layers[owner].last_space > 0.5
            if not (high if tensor == "heads.1" else ~high).any():
                continue
        assert params[name].grad.abs().sum() > 0, f"{name}: zero gradient"
        assert not torch.equal(params[name].detach(), before), f"{name} did not change"


def test_cobot_gamma_sets_the_bottleneck_scale_at_the_start():
    """The authors' init doubles the bottleneck (u = (c + gamma) z = 2z); cobot_gamma=0 starts
    at plain LoRA's scale: with the same A and B, LoRA+COBOT then equals LoRA exactly."""
    doubled = make_segmenter("vit_tiny", "lora", rank=4, cobot=True)
    unit = make_segmenter("vit_tiny", "lora", rank=4, cobot=True, cobot_gamma=0.0)
    plain = make_segmenter("vit_tiny", "lora", rank=4)
    for name, layer in adapter_layers(doubled).items():
        assert torch.equal(layer.cobot.scales(), torch.full_like(layer.cobot.scales(), 2.0))
        assert torch.equal(adapter_layers(unit)[name].cobot.scales(), torch.ones_like(layer.cobot.scales()))
    torch.manual_seed(1)
    with torch.no_grad():
        for name, layer in adapter_layers(plain).items():
            for part, b in layer.lora_B.items():
                b.normal_(std=0.05)
                adapter_layers(unit)[name].lora_B[part].copy_(b)
                adapter_layers(doubled)[name].lora_B[part].copy_(b)
            for seg in (unit, doubled):
                adapter_layers(seg)[name].lora_A.copy_(layer.lora_A)
    batch, prompts, _ = batch_for(plain)
    base = make_segmenter("vit_tiny", None)
    with torch.no_grad():
        frozen, lora = outputs(base, batch, prompts), outputs(plain, batch, prompts)
        assert torch.allclose(outputs(unit, batch, prompts), lora, atol=1e-5)
        assert not torch.allclose(outputs(doubled, batch, prompts), lora, atol=1e-3)
        assert not torch.equal(lora, frozen)
