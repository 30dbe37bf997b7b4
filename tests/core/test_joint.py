"""na_engine.joint: nested attention in Flux-style joint attention, against a brute-force reference."""

import pytest
import torch
from engine_builders import reference_nested, reference_plain

from na_engine.attention import NestedBinding, sdpa_attention
from na_engine.joint import joint_keys, joint_nested_attention
from na_engine.layers import TABLES, describe, dit_layers, is_joint
from na_engine.tokens import T5_END, find_trigger, word_ids

B, T, N, H, D, M = 2, 6, 12, 2, 8, 4  # rows, text tokens, image tokens, heads, head width, nested tokens
C = H * D


def rope(positions, dim, theta=10000.0):
    """Rotary matrices (L, d/2, 2, 2) laid out as Flux's EmbedND gives them: [[cos, -sin], [sin, cos]]."""
    omega = theta ** -(torch.arange(0, dim, 2, dtype=torch.float64) / dim)
    angle = positions.double()[:, None] * omega  # (L, d/2)
    cos, sin = angle.cos(), angle.sin()
    return torch.stack([torch.stack([cos, -sin], -1), torch.stack([sin, cos], -1)], -2)


def rotate_complex(x, positions, dim, theta=10000.0):
    """The same rotation as a complex product, (..., d) at ``positions`` (..., ) — written independently."""
    omega = theta ** -(torch.arange(0, dim, 2, dtype=torch.float64) / dim)
    turn = torch.polar(torch.ones_like(omega), positions.double()[..., None] * omega)
    pairs = torch.view_as_complex(x.double().reshape(*x.shape[:-1], -1, 2).contiguous())
    return torch.view_as_real(pairs * turn).flatten(-2)


def reference_joint(q, k, v, raw_keys, values, where, strength, norm_weight, trigger_position):
    """Float64 brute force.  Nested keys: per-head RMSNorm with the text key norm, then the rotation of the
    trigger's position; image queries get per-query value tables; text queries plain joint attention."""
    x = raw_keys.double().view(M, H, D)
    x = x / (x.pow(2).mean(-1, keepdim=True) + 1e-6).sqrt() * norm_weight.double()
    x = rotate_complex(x, torch.full((M, H), float(trigger_position)), D).reshape(M, C)
    wide = torch.cat([where, torch.zeros(B, N, dtype=torch.bool)], 1)
    image = reference_nested(q[:, T:], k, v, H, [NestedBinding(x, values.double(), wide, strength)])
    return torch.cat([reference_plain(q[:, :T], k, v, H), image], 1)


def inputs(seed=0, position=2):
    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(B, T + N, C, generator=g) for _ in range(3))
    raw_keys, values = torch.randn(M, C, generator=g) * 3, torch.randn(M, C, generator=g)
    norm_weight = 0.5 + torch.rand(D, generator=g)
    where = torch.zeros(B, T, dtype=torch.bool)
    where[:, position] = True
    return q, k, v, raw_keys, values, norm_weight, where


@pytest.mark.parametrize("stacked", [False, True])
@pytest.mark.parametrize("position", [0, 3])
def test_joint_matches_reference(stacked, position):
    q, k, v, raw_keys, values, norm_weight, where = inputs(position=position)
    pe = rope(torch.arange(T + N) * 0.7, D)  # positions that rotate, unlike Flux's text ids: the rotation counts
    keys = joint_keys(raw_keys, H, norm_weight, pe[position])
    out = joint_nested_attention(q, k, v, H, [NestedBinding(keys, values, where, 0.8)], stacked=stacked)
    ref = reference_joint(q, k, v, raw_keys, values, where, 0.8, norm_weight, position * 0.7)
    assert out.shape == q.shape
    assert (out.double() - ref).abs().max() < 1e-5
    plain = reference_plain(q, k, v, H)
    assert (out.double() - plain)[:, T:].abs().max() > 1e-2  # the image queries did change
    assert (out.double() - plain)[:, :T].abs().max() < 1e-5  # the text queries did not


def test_unbound_rows_and_zero_strength_are_the_base_bit_for_bit():
    q, k, v, raw_keys, values, norm_weight, where = inputs()
    keys = joint_keys(raw_keys, H, norm_weight)
    base = sdpa_attention(q, k, v, H)
    off = joint_nested_attention(q, k, v, H, [NestedBinding(keys, values, where, 0.0)])
    assert torch.equal(off, base)
    where[1] = False
    out = joint_nested_attention(q, k, v, H, [NestedBinding(keys, values, where, 1.0)])
    assert torch.equal(out[1], base[1])
    assert (out[0] - base[0]).abs().max() > 1e-2


def test_gradients_reach_the_nested_keys_and_values():
    q, k, v, raw_keys, values, norm_weight, where = inputs()
    raw_keys.requires_grad_(True)
    values.requires_grad_(True)
    out = joint_nested_attention(q, k, v, H, [NestedBinding(joint_keys(raw_keys, H, norm_weight), values, where)])
    out[:, T:].sum().backward()
    assert raw_keys.grad.abs().sum() > 0 and values.grad.abs().sum() > 0


def test_joint_keys_rotation_is_the_complex_product_and_zero_position_is_identity():
    _, _, _, raw_keys, _, norm_weight, _ = inputs()
    normed = joint_keys(raw_keys, H, norm_weight)
    assert torch.allclose(joint_keys(raw_keys, H, norm_weight, rope(torch.zeros(1), D)[0]), normed, atol=1e-6)
    turned = joint_keys(raw_keys, H, norm_weight, rope(torch.tensor([5.0]), D)[0])
    expect = rotate_complex(normed.view(M, H, D), torch.full((M, H), 5.0), D).reshape(M, C)
    assert torch.allclose(turned.double(), expect, atol=1e-5)


def test_trigger_mask_longer_than_the_text_is_refused():
    q, k, v, raw_keys, values, norm_weight, _ = inputs()
    where = torch.ones(B, T + N, dtype=torch.bool)
    with pytest.raises(ValueError, match="do not fit a joint sequence"):
        joint_nested_attention(q, k, v, H, [NestedBinding(raw_keys, values, where)])


def test_flux_layer_table():
    flux = TABLES["flux"]
    assert len(flux) == 57 and is_joint(flux) and not is_joint(TABLES["sdxl"])
    assert flux[0].comfy == ("double_block", 0, 0) and flux[19].comfy == ("single_block", 0, 0)
    assert flux[-1].diffusers == "single_transformer_blocks.37.attn" and {x.width for x in flux} == {3072}
    assert describe(flux).startswith("Flux (57 layers") and describe(dit_layers(2, 3, 64)).startswith("an unknown")


def test_t5_word_ids_and_multi_token_trigger():
    """T5 chunks have no BOS, end with </s> = 1 and pad with 0; a word of two pieces is found whole."""
    word = [(805, 1.0), (7, 1.0), (T5_END, 1.0), (0, 1.0), (0, 1.0)]
    ids = word_ids(word, T5_END)
    assert ids == [805, 7]
    prompt = [(3, 1.0), (805, 1.0), (7, 1.0), (30, 1.0), (T5_END, 1.0), (0, 1.0)]
    assert find_trigger([prompt], ids, "shoe", "a shoe") == [1, 2]


def test_flux_adapter_file_round_trip_and_inspect(tmp_path):
    from engine_builders import TINY_RESAMPLER

    from na_engine import inspect, load_adapter, random_adapter, save_adapter

    adapter = random_adapter(TINY_RESAMPLER, dit_layers(2, 3, 32), seed=3)
    path = str(tmp_path / "flux_tiny.safetensors")
    save_adapter(adapter, path)
    loaded = load_adapter(path)
    assert loaded.layers == adapter.layers and torch.equal(loaded.to_k[4].weight, adapter.to_k[4].weight)
    report = inspect(path)
    assert "joint-attention layers (DiT): 5, 2 double-stream and 3 single-stream blocks, width 32" in report
