"""The diffusers host on Flux: NestedJointAttnProcessor in a tiny FluxTransformer2DModel, against brute force."""

import pytest
import torch
from engine_builders import TINY_RESAMPLER, reference_nested, reference_plain
from tiny_diffusers import tiny_flux_transformer

import na_engine.joint as joint
from na_engine import random_adapter
from na_engine.attention import NestedBinding
from na_engine.binding import ModelCall, Placement
from na_engine.hosts.diffusers_processor import install
from na_engine.layers import dit_layers
from na_engine.subjects import Subject

T, N = 5, 16  # text tokens, image tokens (a 4x4 latent at patch 1)


def model_inputs(seed=0) -> dict:
    g = torch.Generator().manual_seed(seed)
    img_ids = torch.stack(torch.meshgrid(torch.zeros(1), torch.arange(4.0), torch.arange(4.0), indexing="ij"), -1)
    txt_ids = torch.zeros(T, 3)
    txt_ids[:, 0] = torch.arange(T) * 0.5  # text positions that rotate, unlike Flux's: the rotation must count
    return dict(
        hidden_states=torch.randn(1, N, 8, generator=g),
        encoder_hidden_states=torch.randn(1, T, 32, generator=g),
        pooled_projections=torch.randn(1, 16, generator=g),
        timestep=torch.tensor([0.5]),
        img_ids=img_ids.reshape(-1, 3),
        txt_ids=txt_ids,
    )


def run(model, call, processors, seed=0):
    with torch.no_grad(), processors.bound(call):
        return model(**model_inputs(seed)).sample


@pytest.fixture
def flux():
    model = tiny_flux_transformer()
    adapter = random_adapter(TINY_RESAMPLER, dit_layers(1, 1, 32), seed=2)
    subject = Subject(torch.randn(4, TINY_RESAMPLER.output_dim), adapter, "bottle")
    where = torch.zeros(1, T, dtype=torch.bool)
    where[0, 3] = True
    return model, subject, where, install(model, adapter.layers)


def spy(monkeypatch):
    calls = []
    real = joint.joint_nested_attention

    def recorded(q, k, v, heads, bindings, *args, **kwargs):
        out = real(q, k, v, heads, bindings, *args, **kwargs)
        calls.append((q, k, v, heads, out))
        return out

    monkeypatch.setattr(joint, "joint_nested_attention", recorded)  # as joint_layer calls it
    return calls


def rotate_complex(x, angle):
    """x (..., d) turned pair by pair by ``angle`` (d/2,), as complex numbers: written apart from the host's."""
    pairs = torch.view_as_complex(x.double().reshape(*x.shape[:-1], -1, 2).contiguous())
    return torch.view_as_real(pairs * torch.polar(torch.ones_like(angle), angle)).flatten(-2)


@pytest.mark.parametrize("block", [0, 1])  # the double block, the single block
def test_exact_formula_in_double_and_single_blocks(flux, monkeypatch, block):
    model, subject, where, processors = flux
    calls = spy(monkeypatch)
    run(model, ModelCall([Placement(subject, where)], (4, 4)), processors)
    q, k, v, heads, out = calls[block]
    attn = model.transformer_blocks[0].attn if block == 0 else model.single_transformer_blocks[0].attn
    norm = attn.norm_added_k if block == 0 else attn.norm_k
    nk, nv = subject.adapter.nested_kv(block, subject.tokens)
    x = nk.double().view(-1, heads, 16)
    x = x / (x.pow(2).mean(-1, keepdim=True) + norm.eps).sqrt() * norm.weight.double()
    angle = _angles(model, position=3)
    keys = rotate_complex(x, angle).reshape(nk.shape)
    wide = torch.cat([where, torch.zeros(1, N, dtype=torch.bool)], 1)
    want = torch.cat(
        [
            reference_plain(q[:, :T], k, v, heads),
            reference_nested(q[:, T:], k, v, heads, [NestedBinding(keys, nv.double(), wide)]),
        ],
        1,
    )
    torch.testing.assert_close(out.double(), want, atol=1e-5, rtol=1e-5)
    assert (want - reference_plain(q, k, v, heads))[:, T:].abs().max() > 1e-3
    assert len(processors.fired) == 2


def _angles(model, position):
    """The rotation angles (d/2,) of text position ``position`` (ids (position * 0.5, 0, 0)), from the model's
    own RoPE module: its cos and sin give the angle of each channel pair."""
    ids = torch.tensor([[position * 0.5, 0.0, 0.0]])
    cos, sin = model.pos_embed(ids)
    return torch.atan2(sin[0, 0::2], cos[0, 0::2]).double()


def test_no_call_no_subject_and_strength_zero_are_the_plain_model(flux):
    model, subject, where, processors = flux
    fresh = tiny_flux_transformer()
    plain = run(fresh, None, install(fresh, subject.adapter.layers))
    assert torch.allclose(run(model, None, processors), plain, atol=1e-6)
    off = ModelCall([Placement(subject, where, strength=0.0)], (4, 4))
    assert torch.allclose(run(model, off, processors), plain, atol=1e-6)
    nobody = ModelCall([], (4, 4))  # a call that binds no subject: a trainer's batch that dropped them all
    assert torch.allclose(run(model, nobody, processors), plain, atol=1e-6)
    on = ModelCall([Placement(subject, where)], (4, 4))
    assert (run(model, on, processors) - plain).abs().max() > 1e-4


def test_gradients_reach_the_adapter_through_both_blocks(flux):
    model, subject, where, processors = flux
    tokens = subject.tokens.clone().requires_grad_(True)
    trained = subject.with_(tokens=tokens)
    with processors.bound(ModelCall([Placement(trained, where)], (4, 4))):
        out = model(**model_inputs()).sample
    out.square().mean().backward()
    assert tokens.grad.abs().sum() > 0
    assert all(subject.adapter.to_k[i].weight.grad is not None for i in range(2))
