"""The Patch on SD3.5: a tiny MMDiT (2 joint blocks, the first an MMDiT-X block with a second, image-only
attention) in current ComfyUI, through the nodes; its CLIP is CLIP-L and CLIP-G (no T5: see the positions test).
The 2024 ComfyUI has no attention override; there only the clear error is checked."""

import pytest
import torch
from engine_builders import reference_plain
from test_flux_patch import dit_patches, expected, sample_flux, spy
from test_nodes_inprocess import apply, encode, encode_text, node


@pytest.fixture(scope="module")
def sd3(comfy):
    if not comfy.has_flux():
        pytest.skip("this ComfyUI has no attention override (the 2024 copy): see the clear-error test")
    return comfy.tiny_sd3_model(), comfy.tiny_sd3_clip()


def sd3_adapter(engine, model, seed=0):
    diffusion = model.model.diffusion_model
    family = engine.families.comfy_family(diffusion)
    layers = [engine.Layer(i, f"layer{i}", key, w) for i, (key, w) in enumerate(family.comfy_layers(diffusion))]
    config = engine.ResamplerConfig(
        dim=64, depth=1, dim_head=32, heads=2, num_queries=4, embedding_dim=64, output_dim=128
    )
    adapter = engine.random_adapter(config, layers, seed=seed)
    adapter.name = "tiny_sd3_adapter.safetensors"
    return adapter


def heads_first(x, heads):
    """(B, L, H*d), or SD3's v (B, L, H, d) -> (B, H, L, d)."""
    return x.reshape(x.shape[0], x.shape[1], heads, -1).transpose(1, 2)


def flat(x):
    return x.flatten(2)  # SD3's v (B, L, H, d) -> (B, L, H*d)


def clip_ids(clip, text):
    return [t[0] for t in clip.tokenize(text)["l"][0]]


def where_of(clip, text, word, rows):
    tokens, piece = clip_ids(clip, text), clip_ids(clip, word)[1]
    where = torch.zeros(rows, len(tokens), dtype=torch.bool)
    where[:, tokens.index(piece)] = True
    return where


def test_the_family_is_found_with_one_layer_per_joint_block(engine, sd3):
    model, _ = sd3
    diffusion = model.model.diffusion_model
    family = engine.families.comfy_family(diffusion)
    assert family.name == "sd35" and family.comfy_layers(diffusion) == [(("double_block", i, 0), 128) for i in (0, 1)]


@pytest.mark.parametrize("block", [0, 1])
def test_exact_formula_and_the_mmdit_x_attention_passes_through(pack, engine, sd3, tiny_clip_vision, block):
    model, clip = sd3
    subjects = encode(pack, sd3_adapter(engine, model), tiny_clip_vision, "bottle")
    text = "a photo of a bottle on a table"
    patched, pos, _ = apply(pack, model, clip, subjects, text)
    calls = spy(patched, ("double_block", block))
    sample_flux(patched, pos, encode_text(clip, ""))
    assert len(calls) == (2 if block == 0 else 1)  # block 0 attends again, over the image alone
    q, k, v, heads, out = calls[0]
    where = where_of(clip, text, "bottle", q.shape[0])
    key_norm = patched.model.diffusion_model.joint_blocks[block].context_block.attn.ln_k.weight
    layer = subjects[0].adapter.layer_index(("double_block", block, 0))
    want = expected(*(heads_first(x, heads) for x in (q, k, v)), heads, subjects[0], layer, key_norm, where)
    torch.testing.assert_close(out.double(), want, atol=1e-4, rtol=1e-4)
    change = (want - reference_plain(q, k, flat(v), heads)).abs()
    assert change[:, where.shape[1] :].max() > 1e-3 and change[:, : where.shape[1]].max() < 1e-12  # text rows: plain
    for q2, k2, v2, h2, out2 in calls[1:]:  # the image-only attention: the host's own, untouched
        assert q2.shape[1] == q.shape[1] - where.shape[1]
        torch.testing.assert_close(out2.double(), reference_plain(q2, k2, flat(v2), h2), atol=1e-5, rtol=1e-5)


def test_every_block_fires_and_strength_zero_is_bit_identical(pack, engine, sd3, tiny_clip_vision):
    model, clip = sd3
    subjects = encode(pack, sd3_adapter(engine, model), tiny_clip_vision, "bottle")
    neg = encode_text(clip, "")
    patched, pos, _ = apply(pack, model, clip, subjects, "a bottle")
    on = sample_flux(patched, pos, neg)
    run = next(iter(dit_patches(patched).values())).run
    assert set(run.fired) == {("double_block", i, 0) for i in range(2)}
    off_model, off_pos, _ = apply(pack, model, clip, subjects, "a bottle", strength=0.0)
    plain = sample_flux(model, off_pos, neg)
    assert torch.equal(sample_flux(off_model, off_pos, neg), plain)
    assert (on - plain).abs().max() > 1e-4


def test_stacks_on_another_attention_override(pack, engine, sd3, tiny_clip_vision):
    model, clip = sd3
    other = model.clone()
    shifted = []

    def plus_one(func, *args, **kwargs):
        shifted.append(1)
        return func(*args, **kwargs) + 1.0

    other.model_options.setdefault("transformer_options", {})["optimized_attention_override"] = plus_one
    subjects = encode(pack, sd3_adapter(engine, model), tiny_clip_vision, "bottle")
    patched, pos, _ = apply(pack, other, clip, subjects, "a photo of a bottle")
    calls = spy(patched, ("double_block", 1))
    sample_flux(patched, pos, encode_text(clip, ""))
    ((q, k, v, heads, out),) = calls
    where = where_of(clip, "a photo of a bottle", "bottle", q.shape[0])
    key_norm = patched.model.diffusion_model.joint_blocks[1].context_block.attn.ln_k.weight
    want = expected(*(heads_first(x, heads) for x in (q, k, v)), heads, subjects[0], 1, key_norm, where) + 1.0
    torch.testing.assert_close(out.double(), want, atol=1e-4, rtol=1e-4)
    assert len(shifted) >= 3  # every attention call, not only ours


def test_multi_piece_trigger_binds_every_piece(pack, engine, sd3, tiny_clip_vision):
    model, clip = sd3
    pieces = clip_ids(clip, "kettlebell")[1:3]
    assert clip_ids(clip, "kettlebell")[3] == 49407  # CLIP splits it in two: found as the whole sequence
    subjects = encode(pack, sd3_adapter(engine, model), tiny_clip_vision, "kettlebell")
    patched, _, _ = apply(pack, model, clip, subjects, "a red kettlebell on grass")
    run = next(iter(dit_patches(patched).values())).run
    tokens = clip_ids(clip, "a red kettlebell on grass")
    start = next(i for i in range(len(tokens)) if tokens[i : i + 2] == pieces)
    assert run.positions[0].tolist() == [start, start + 1]


def test_with_a_t5_the_trigger_binds_in_the_clip_and_the_t5_parts(engine, sd3):
    """The context is [CLIP-L | CLIP-G] (77 a chunk), then T5's tokens: the positions of both parts, T5's after
    the CLIP chunks (read from the real SD3 tokenizer; a CLIP object with a T5 encoder, never run here)."""
    model, clip = sd3
    family = engine.families.comfy_family(model.model.diffusion_model)
    text = "a kettlebell and a kettlebell"
    tokens = clip.tokenize(text)
    t5 = [t[0] for t in tokens["t5xxl"][0]]
    t5_pieces = [i for i in [t[0] for t in clip.tokenize("kettlebell")["t5xxl"][0]] if i not in (0, 1)]
    t5_at = [i for i in range(len(t5)) if t5[i : i + len(t5_pieces)] == t5_pieces]
    l_ids = clip_ids(clip, text)
    l_at = [i for i in range(len(l_ids)) if l_ids[i : i + 2] == clip_ids(clip, "kettlebell")[1:3]]

    class WithT5:
        tokenize = clip.tokenize
        cond_stage_model = type("Encoder", (), {"clip_l": object(), "clip_g": object(), "t5xxl": object()})()

    found = family.comfy_positions(WithT5(), tokens, "kettlebell", text)
    width = len(tokens["l"]) * 77
    assert len(l_at) == len(t5_at) == 2
    t5_found = [width + s + j for s in t5_at for j in range(len(t5_pieces))]
    assert found == [p for s in l_at for p in (s, s + 1)] + t5_found
    assert family.comfy_positions(clip, tokens, "kettlebell", text) == found[:4]  # this CLIP: no T5 part


def test_the_override_missing_or_a_layout_with_registers_is_refused(pack, engine, comfy, tiny_clip_vision,
                                                                    tiny_sd15, monkeypatch):  # fmt: skip
    import comfy.ldm.modules.attention as attention
    from test_nodes_inprocess import adapter_for

    class MMDiT(torch.nn.Module):  # SD3's block list, and the registers some MMDiTs put before the text
        joint_blocks = torch.nn.ModuleList()
        register_length = 4

    class Patcher:
        class model:  # noqa: N801  (the shape of ModelPatcher.model)
            diffusion_model = MMDiT()

    subjects = encode(pack, adapter_for(engine, tiny_sd15), tiny_clip_vision, "bottle")
    apply_node = node(pack, "NestedAttentionApply")
    if hasattr(attention, "wrap_attn"):
        with pytest.raises(engine.NestedAttentionError, match="4 register tokens before the text"):
            apply_node.apply(Patcher(), None, subjects, "a bottle")
    monkeypatch.delattr(attention, "wrap_attn", raising=False)
    with pytest.raises(engine.NestedAttentionError, match="too old for Nested Attention on SD3.5"):
        apply_node.apply(Patcher(), None, subjects, "a bottle")
