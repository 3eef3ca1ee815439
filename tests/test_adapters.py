"""The adapter core: exact start at the frozen model, gates, gradients, parameter counts."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from gara.models.adapters.config import AdapterConfig
from gara.models.adapters.gara import GaRALinear, effective_ranks
from gara.models.adapters.gates import gumbel_sigmoid
from gara.models.adapters.lora import LoRALinear
from gara.models.backbones import build_backbone
from gara.models.factory import wrap_backbone
from gara.models.inject import adapter_layers, attach_adapter, parameter_report
from gara.models.segmenter import Prompts, Segmenter


def make_segmenter(backbone: str, kind: str | None, seed: int = 0, **adapter) -> Segmenter:
    torch.manual_seed(seed)
    seg = wrap_backbone(build_backbone(backbone, pretrained=backbone == "lite_medsam"))
    if kind:
        attach_adapter(seg, AdapterConfig(kind=kind, **adapter))
    return seg.eval()


def batch_for(seg: Segmenter, n: int = 2, seed: int = 0):
    rng = np.random.default_rng(seed)
    images = [rng.integers(0, 256, (96 + 16 * i, 128, 3), dtype=np.uint8) for i in range(n)]
    batch, metas = seg.preprocess(images)
    prompts = []
    for meta in metas:
        raw = Prompts(
            boxes=torch.tensor([[10.0, 12.0, 80.0, 70.0], [30.0, 5.0, 120.0, 90.0]]),
            points=torch.tensor([[[40.0, 40.0], [15.0, 20.0]], [[60.0, 50.0], [100.0, 80.0]]]),
            labels=torch.tensor([[1, 0], [1, 1]]),
        )
        prompts.append(seg.prompts_to_input(raw, meta))
    return batch, prompts, metas


def outputs(seg: Segmenter, batch, prompts):
    out = seg(batch, prompts)
    return torch.cat([x.flatten() for x in out.low_res_logits + out.iou_predictions])


@pytest.mark.parametrize("backbone", ["vit_tiny", "lite_medsam", "sam2.1_hiera_tiny_test"])
@pytest.mark.parametrize("kind", ["lora", "gara"])
def test_adapted_model_starts_exactly_at_frozen_model(backbone, kind):
    frozen = make_segmenter(backbone, None)
    adapted = make_segmenter(backbone, kind)
    batch, prompts, _ = batch_for(frozen)
    with torch.no_grad():
        expected = outputs(frozen, batch, prompts)
        assert torch.equal(outputs(adapted, batch, prompts), expected)
        adapted.train()  # gates sample in training, but B = 0 keeps every update at zero
        assert torch.equal(outputs(adapted, batch, prompts), expected)


def _randomise_up_projections(seg: Segmenter, std: float = 0.05) -> None:
    """Give B non-zero values, as after some training (at init B = 0 blocks every gradient
    except B's own)."""
    with torch.no_grad():
        for layer in adapter_layers(seg).values():
            for b in layer.lora_B.values():
                b.normal_(0, std)


def test_gara_evaluation_is_deterministic_and_training_samples_gates():
    seg = make_segmenter("vit_tiny", "gara")
    _randomise_up_projections(seg)
    batch, prompts, _ = batch_for(seg)
    with torch.no_grad():
        first, second = outputs(seg, batch, prompts), outputs(seg, batch, prompts)
        assert torch.equal(first, second)
        seg.train()
        torch.manual_seed(1)
        a = outputs(seg, batch, prompts)
        torch.manual_seed(2)
        b = outputs(seg, batch, prompts)
    assert not torch.equal(a, b), "training mode should sample different gates for other noise"


# SAM 2.1's Hiera: 3 of its 5 blocks widen (dim != dim_out), where the gates read width dim.
@pytest.mark.parametrize(("backbone", "blocks"), [("vit_tiny", 4), ("sam2.1_hiera_tiny_test", 5)])
def test_one_backward_reaches_factors_and_every_gate_but_no_base_parameter(backbone, blocks):
    seg = make_segmenter(backbone, "gara")
    _randomise_up_projections(seg)
    seg.train()
    batch, prompts, _ = batch_for(seg, n=8)
    torch.manual_seed(0)
    out = seg(batch, prompts)
    loss = sum(x.sigmoid().mean() for x in out.low_res_logits) + sum(x.sum() for x in out.iou_predictions)
    loss.backward()
    layers = adapter_layers(seg)
    assert len(layers) == blocks
    for name, layer in layers.items():
        assert isinstance(layer, GaRALinear)
        assert layer.lora_A.grad is not None and layer.lora_A.grad.abs().sum() > 0, name
        for part, b in layer.lora_B.items():
            assert b.grad is not None and b.grad.abs().sum() > 0, f"{name} B_{part}"
        for gate in ("space_gate", "low_gate", "high_gate"):
            grads = [p.grad for p in getattr(layer, gate).parameters()]
            assert all(g is not None for g in grads), f"{name}.{gate} got no gradient"
            assert sum(g.abs().sum() for g in grads) > 0, f"{name}.{gate} gradient is zero"
    for pname, p in seg.named_parameters():
        if ".base." in pname or not p.requires_grad:
            assert not p.requires_grad and p.grad is None, pname


def test_gumbel_sigmoid_is_hard_forward_and_soft_backward():
    logits = torch.tensor([-3.0, -0.1, 0.1, 3.0], requires_grad=True)
    assert gumbel_sigmoid(logits, 0.5, training=False).tolist() == [0.0, 0.0, 1.0, 1.0]
    torch.manual_seed(0)
    z = gumbel_sigmoid(logits, 0.5, training=True)
    assert set(z.detach().tolist()) <= {0.0, 1.0}
    z.sum().backward()
    assert (logits.grad > 0).all(), "straight-through gradient of sigmoid is positive"


def test_gara_evaluation_computes_only_selected_space_and_matches_full_computation():
    """The evaluation path (active components only, per space group) equals the dense
    formula dW(x) = sum_i c_i b_i a_i^T computed over all components."""
    torch.manual_seed(0)
    base = torch.nn.Linear(32, 96)
    from gara.models.adapters.projections import layout_for

    class Attn(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.qkv = base

    layer = GaRALinear(base, layout_for(base, Attn()), low_rank=4, high_rank=16).eval()
    with torch.no_grad():
        for b in layer.lora_B.values():
            b.normal_()
        # Bias the space gate so that some inputs pick each space.
        x = torch.randn(12, 5, 32)
        x[:6] += 2.0
        y = layer(x)
        coeff, space = layer.gate_coefficients(x.mean(1))
        assert 0 < space.sum() < len(space), "test needs inputs in both spaces"
        z = torch.einsum("ntc,prc->ntpr", x, layer.lora_A) * coeff[:, None, None, :]
        dense = base(x).clone()
        for i, part in enumerate(("q", "k", "v")):
            dense[..., i * 32 : (i + 1) * 32] += z[:, :, i] @ layer.lora_B[part].T
        torch.testing.assert_close(y, dense, rtol=1e-5, atol=1e-5)
        # Selected-only: an input that chose the low space has no high component active.
        low_rows = space == 0
        assert (coeff[low_rows][:, 4:] == 0).all() and (coeff[~low_rows][:, :4] == 0).all()


def test_effective_rank_is_observable_per_image_and_block():
    seg = make_segmenter("vit_tiny", "gara")
    batch, prompts, _ = batch_for(seg, n=3)
    with torch.no_grad():
        seg(batch, prompts)
    ranks = effective_ranks(seg, batch_size=3)
    assert len(ranks) == 4
    for name, r in ranks.items():
        layer = adapter_layers(seg)[name]
        assert r.shape == (3,)
        assert ((r >= 0) & (r <= layer.high_rank)).all()


def test_gara_parameter_count_on_vit_b_matches_the_method_arithmetic():
    """ViT-B: 12 blocks, width C = 768, separate Q/K/V paths, r_L = 16, r_H = 256.

    factors  = 12 * 3 paths * (16 + 256) * (C + C)                      = 15,040,512
    gates    = 12 * [space (C*64 + 64 + 64*1 + 1)
                     + low (C*16 + 16 + 16*16 + 16 + 16*16 + 16)
                     + high (C*16 + 16 + 16*16 + 16 + 16*256 + 256)]    =    948,684
    total    = 15,989,196 (~16.0 M, as the method note says)
    """
    c = 768
    factors = 12 * 3 * (16 + 256) * (c + c)
    gates = 12 * ((c * 64 + 64 + 64 + 1) + (c * 16 + 16 + 272 + 272) + (c * 16 + 16 + 272 + 16 * 256 + 256))
    seg = Segmenter(build_backbone("vit_b", pretrained=False))
    attach_adapter(seg, AdapterConfig(kind="gara"))
    report = parameter_report(seg)
    assert report["trainable_params"] == factors + gates == 15_989_196
    assert len(report["adapted_layers"]) == 12
    assert all(row["ranks"] == [16, 256] for row in report["adapted_layers"])


def test_lora_on_q_and_v_only_leaves_k_untouched():
    seg = make_segmenter("vit_tiny", "lora", rank=4, projections=["q", "v"])
    frozen = make_segmenter("vit_tiny", None)
    layer = next(iter(adapter_layers(seg).values()))
    assert isinstance(layer, LoRALinear) and layer.part_names == ("q", "v")
    with torch.no_grad():
        for b in layer.lora_B.values():
            b.normal_()
        x = torch.randn(2, 8, 8, 128)
        delta = layer(x) - layer.base(x)
    assert delta[..., 128:256].abs().max() == 0, "k slice must not change"
    assert delta[..., :128].abs().max() > 0 and delta[..., 256:].abs().max() > 0
    assert parameter_report(seg)["trainable_params"] == 4 * 2 * 4 * (128 + 128)
    assert parameter_report(frozen)["trainable_params"] == 0


def test_tinyvit_qkv_is_split_per_head():
    """LiteMedSAM's qkv interleaves q|k|v per head; the adapter's Q path must only touch
    the query channels that the attention reads as queries."""
    seg = make_segmenter("lite_medsam", "lora", rank=2, projections=["q"])
    name, layer = next(iter(adapter_layers(seg).items()))
    attn = seg.get_submodule(name.rsplit(".", 1)[0])
    with torch.no_grad():
        layer.lora_B["q"].normal_()
        x = torch.randn(1, 49, layer.in_features)
        delta = (layer(x) - layer.base(x)).view(1, 49, attn.num_heads, -1)
    q, k, v = delta.split([attn.key_dim, attn.key_dim, attn.d], dim=3)
    assert q.abs().max() > 0 and k.abs().max() == 0 and v.abs().max() == 0


def test_bad_target_pattern_names_candidates():
    seg = Segmenter(build_backbone("vit_tiny", pretrained=False))
    with pytest.raises(ValueError, match=r"matches no Linear layer.*attn\.qkv"):
        attach_adapter(seg, AdapterConfig(target_modules=r"nothing_here$"))


@pytest.mark.parametrize("backbone", ["vit_tiny", "lite_medsam"])
def test_encoder_stages_run_the_encoders_own_forward_and_find_the_frozen_prefix(backbone):
    from gara.models.stages import frozen_prefix_length, run_stages

    x = torch.randn(2, 3, 256, 256)
    for kind in (None, "gara", "lora", "adaptformer"):
        seg = make_segmenter(backbone, kind)
        stages = seg.encoder_stages()
        length = frozen_prefix_length(stages)
        # Without adapters every stage is frozen; with any, only the patch embedding (ViT) or the
        # patch embedding + convolutional stage (TinyViT) precede the first adapted stage.
        expected = len(stages) if kind is None else {"vit_tiny": 1, "lite_medsam": 2}[backbone]
        assert length == expected, (kind, [s.name for s in stages])
        with torch.no_grad():
            whole = seg.encode(x)
            split = run_stages(stages, run_stages(stages, x, stop=length), start=length)
        assert torch.equal(whole, split)


def test_gate_bias_starts_every_component_on():
    """gate_bias > 0: every component is on at evaluation and in (nearly) every training draw,
    so GaRA starts as a LoRA of the space its gate picks; None leaves it to the random init."""
    x = torch.randn(4, 64, 128)
    for bias, expect_all in ((4.0, True), (None, False)):
        seg = make_segmenter("vit_tiny", "gara", low_rank=8, high_rank=32, gate_bias=bias)
        layer = next(m for m in seg.modules() if isinstance(m, GaRALinear))
        layer.eval()
        coeff, space = layer.gate_coefficients(x.mean(dim=1))
        active = (coeff != 0).sum(dim=-1)
        full = torch.where(space > 0.5, torch.full_like(active, 32), torch.full_like(active, 8))
        assert torch.equal(active, full) == expect_all, (bias, active.tolist())
        layer.train()
        torch.manual_seed(0)
        coeff, space = layer.gate_coefficients(x.mean(dim=1).repeat(50, 1))
        on = (coeff != 0).float().sum() / torch.where(space > 0.5, 32.0, 8.0).sum()
        assert (on > 0.95) == expect_all, (bias, float(on))
