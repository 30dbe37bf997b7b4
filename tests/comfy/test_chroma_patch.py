"""The Patch on Chroma: a tiny Chroma-architecture model (Flux's blocks, a T5 alone) in current ComfyUI, through the
nodes.  The 2024 ComfyUI has no Chroma; there only the clear errors are checked."""

import pytest
import torch
from engine_builders import reference_plain
from test_flux_patch import dit_patches, expected, flux_adapter, merged, sample_flux, spy
from test_nodes_inprocess import apply, encode, encode_text, node


@pytest.fixture(scope="module")
def chroma(comfy):
    if not comfy.has_chroma():
        pytest.skip("this ComfyUI has no Chroma or no attention override (the 2024 copy): see the clear-error tests")
    return comfy.tiny_chroma_model(), comfy.tiny_t5_clip()


def t5_ids(clip, text):
    return [t[0] for t in clip.tokenize(text)["t5xxl"][0]]


def test_the_family_is_found_and_its_layers_are_fluxs(engine, chroma):
    model, _ = chroma
    diffusion = model.model.diffusion_model
    family = engine.families.comfy_family(diffusion)
    assert family.name == "chroma" and family.title == "Chroma"
    keys = [key for key, _ in family.comfy_layers(diffusion)]
    assert keys == [(b, i, 0) for b in ("double_block", "single_block") for i in range(2)]


@pytest.mark.parametrize("block", [("double_block", 1), ("single_block", 0)])
def test_exact_formula_in_double_and_single_blocks(pack, engine, chroma, tiny_clip_vision, block):
    model, clip = chroma
    subjects = encode(pack, flux_adapter(engine, model), tiny_clip_vision, "bottle")
    text = "a photo of a bottle on a table"
    patched, pos, _ = apply(pack, model, clip, subjects, text)
    calls = spy(patched, block)
    sample_flux(patched, pos, encode_text(clip, ""))
    ((q, k, v, heads, out),) = calls
    tokens = t5_ids(clip, text)
    where = torch.zeros(q.shape[0], len(tokens), dtype=torch.bool)
    where[:, tokens.index(t5_ids(clip, "bottle")[0])] = True
    diffusion = patched.model.diffusion_model
    key_norm = (
        diffusion.double_blocks[block[1]].txt_attn.norm.key_norm.scale
        if block[0] == "double_block"
        else diffusion.single_blocks[block[1]].norm.key_norm.scale
    )
    want = expected(q, k, v, heads, subjects[0], subjects[0].adapter.layer_index((*block, 0)), key_norm, where)
    torch.testing.assert_close(out.double(), want, atol=1e-4, rtol=1e-4)
    change = (want - reference_plain(merged(q), merged(k), merged(v), heads)).abs()
    assert change[:, len(tokens) :].max() > 1e-3 and change[:, : len(tokens)].max() == 0


def test_every_block_fires_and_strength_zero_is_bit_identical(pack, engine, chroma, tiny_clip_vision):
    model, clip = chroma
    subjects = encode(pack, flux_adapter(engine, model), tiny_clip_vision, "bottle")
    neg = encode_text(clip, "")
    patched, pos, _ = apply(pack, model, clip, subjects, "a bottle")
    on = sample_flux(patched, pos, neg)
    run = next(iter(dit_patches(patched).values())).run
    assert set(run.fired) == {(b, i, 0) for b in ("double_block", "single_block") for i in range(2)}
    off_model, off_pos, _ = apply(pack, model, clip, subjects, "a bottle", strength=0.0)
    plain = sample_flux(model, off_pos, neg)
    assert torch.equal(sample_flux(off_model, off_pos, neg), plain)
    assert (on - plain).abs().max() > 1e-4


def test_stacks_on_another_attention_override(pack, engine, chroma, tiny_clip_vision):
    model, clip = chroma
    other = model.clone()
    shifted = []

    def plus_one(func, *args, **kwargs):
        shifted.append(1)
        return func(*args, **kwargs) + 1.0

    other.model_options.setdefault("transformer_options", {})["optimized_attention_override"] = plus_one
    subjects = encode(pack, flux_adapter(engine, model), tiny_clip_vision, "bottle")
    patched, pos, _ = apply(pack, other, clip, subjects, "a photo of a bottle")
    calls = spy(patched, ("single_block", 1))
    sample_flux(patched, pos, encode_text(clip, ""))
    ((q, k, v, heads, out),) = calls
    tokens = t5_ids(clip, "a photo of a bottle")
    where = torch.zeros(q.shape[0], len(tokens), dtype=torch.bool)
    where[:, tokens.index(t5_ids(clip, "bottle")[0])] = True
    key_norm = patched.model.diffusion_model.single_blocks[1].norm.key_norm.scale
    layer = subjects[0].adapter.layer_index(("single_block", 1, 0))
    want = expected(q, k, v, heads, subjects[0], layer, key_norm, where) + 1.0
    torch.testing.assert_close(out.double(), want, atol=1e-4, rtol=1e-4)
    assert len(shifted) >= 4  # every block's call, not only ours


def test_multi_piece_trigger_binds_every_piece(pack, engine, chroma, tiny_clip_vision):
    model, clip = chroma
    pieces = [i for i in t5_ids(clip, "sneaker") if i not in (0, 1)]
    assert len(pieces) == 2  # T5 splits it: the trigger is found as the whole sequence
    subjects = encode(pack, flux_adapter(engine, model), tiny_clip_vision, "sneaker")
    patched, _, _ = apply(pack, model, clip, subjects, "a red sneaker on grass, a sneaker")
    run = next(iter(dit_patches(patched).values())).run
    tokens = t5_ids(clip, "a red sneaker on grass, a sneaker")
    starts = [i for i in range(len(tokens)) if tokens[i : i + 2] == pieces]
    assert len(starts) == 2 and run.positions[0].tolist() == [p for s in starts for p in (s, s + 1)]


def test_a_chroma_clip_without_t5_is_refused_by_name(pack, engine, chroma, tiny_clip, tiny_clip_vision):
    model, _ = chroma
    subjects = encode(pack, flux_adapter(engine, model), tiny_clip_vision, "bottle")
    with pytest.raises(engine.NestedAttentionError, match="no t5xxl text encoder.*type chroma"):
        apply(pack, model, tiny_clip, subjects, "a bottle")


def test_a_comfyui_without_the_override_is_refused_for_chroma(pack, engine, comfy, tiny_clip_vision, tiny_sd15,
                                                              monkeypatch):  # fmt: skip
    """Where ComfyUI has no attention override (the 2024 copy; here taken away), a Chroma model is refused by name,
    before any work."""
    import comfy.ldm.modules.attention as attention
    from test_nodes_inprocess import adapter_for

    monkeypatch.delattr(attention, "wrap_attn", raising=False)

    class Chroma(torch.nn.Module):  # the class name ComfyUI's Chroma has, with its two block lists
        double_blocks = torch.nn.ModuleList()
        single_blocks = torch.nn.ModuleList()

    class Patcher:
        class model:  # noqa: N801  (the shape of ModelPatcher.model)
            diffusion_model = Chroma()

    subjects = encode(pack, adapter_for(engine, tiny_sd15), tiny_clip_vision, "bottle")
    with pytest.raises(engine.NestedAttentionError, match="too old for Nested Attention on Chroma"):
        node(pack, "NestedAttentionApply").apply(Patcher(), None, subjects, "a bottle")
