"""The Patch on Flux: a tiny Flux-architecture model in current ComfyUI, through the nodes.

The 2024 ComfyUI has neither Flux nor the attention override; there only the clear error is checked."""

import pytest
import torch
from engine_builders import reference_nested, reference_plain
from test_nodes_inprocess import apply, encode, encode_text, node

from na_engine.attention import NestedBinding


@pytest.fixture(scope="module")
def flux(comfy):
    if not comfy.has_flux():
        pytest.skip("this ComfyUI has no Flux or no attention override (the 2024 copy): see the old-ComfyUI test")
    return comfy.tiny_flux_model(), comfy.tiny_flux_clip()


def flux_adapter(engine, model, seed=0):
    layers = [
        engine.Layer(i, f"layer{i}", key, w)
        for i, (key, w) in enumerate(engine.hosts.comfy_dit.comfy_dit_layers(model.model.diffusion_model))
    ]
    config = engine.ResamplerConfig(
        dim=64, depth=1, dim_head=32, heads=2, num_queries=4, embedding_dim=64, output_dim=64
    )
    adapter = engine.random_adapter(config, layers, seed=seed)
    adapter.name = "tiny_flux_adapter.safetensors"
    return adapter


def sample_flux(model, pos, neg, seed=0):
    import nodes

    latent = {"samples": torch.zeros(1, 16, 8, 8)}  # 4x4 image tokens after Flux's 2x2 patches
    with torch.inference_mode():
        return nodes.KSampler().sample(model, seed, 1, 1.0, "euler", "simple", pos, neg, latent)[0]["samples"]


def dit_patches(model):
    return model.model_options["transformer_options"]["patches_replace"]["dit"]


def spy(model, block):
    """Record (q, k, v, heads, out) of every attention call our patch of ``block`` overrides."""
    patch, calls = dit_patches(model)[block], []
    make = patch._override

    def spying(call, pe, inner):
        override = make(call, pe, inner)

        def recorded(func, q, k, v, heads, **kwargs):
            out = override(func, q, k, v, heads, **kwargs)
            calls.append((q, k, v, heads, out))
            return out

        return recorded

    patch._override = spying
    return calls


def merged(x):
    b, h, n, d = x.shape
    return x.transpose(1, 2).reshape(b, n, h * d)


def expected(q, k, v, heads, subject, layer, key_norm, where):
    """Brute force: the text key RMSNorm on the raw nested keys (Flux's text rotation is the identity), per-query
    values for the image queries, plain attention for the text queries."""
    nk, nv = subject.adapter.nested_kv(layer, subject.tokens)
    x = nk.double().view(nk.shape[0], heads, -1)
    x = (x / (x.pow(2).mean(-1, keepdim=True) + 1e-6).sqrt() * key_norm.double()).reshape(nk.shape)
    t = where.shape[1]
    qm, km, vm = merged(q), merged(k), merged(v)  # (B, L, H*d)
    wide = torch.cat([where, torch.zeros(where.shape[0], km.shape[1] - t, dtype=torch.bool)], 1)
    image = reference_nested(qm[:, t:], km, vm, heads, [NestedBinding(x, nv.double(), wide)])
    return torch.cat([reference_plain(qm[:, :t], km, vm, heads), image], 1)


@pytest.mark.parametrize("block", [("double_block", 1), ("single_block", 0)])
def test_exact_formula_in_double_and_single_blocks(pack, engine, flux, tiny_clip_vision, block):
    model, clip = flux
    subjects = encode(pack, flux_adapter(engine, model), tiny_clip_vision, "bottle")
    patched, pos, _ = apply(pack, model, clip, subjects, "a photo of a bottle on a table")
    calls = spy(patched, block)
    sample_flux(patched, pos, encode_text(clip, ""))
    ((q, k, v, heads, out),) = calls
    bottle = clip.tokenize("bottle")["t5xxl"][0][0][0]
    tokens = [t[0] for t in clip.tokenize("a photo of a bottle on a table")["t5xxl"][0]]
    where = torch.zeros(q.shape[0], len(tokens), dtype=torch.bool)
    where[:, tokens.index(bottle)] = True
    key = (*block, 0)
    diffusion = patched.model.diffusion_model
    key_norm = (
        diffusion.double_blocks[block[1]].txt_attn.norm.key_norm.scale
        if block[0] == "double_block"
        else diffusion.single_blocks[block[1]].norm.key_norm.scale
    )
    want = expected(q, k, v, heads, subjects[0], subjects[0].adapter.layer_index(key), key_norm, where)
    torch.testing.assert_close(out.double(), want, atol=1e-4, rtol=1e-4)
    change = (want - reference_plain(merged(q), merged(k), merged(v), heads)).abs()
    assert change[:, len(tokens) :].max() > 1e-3 and change[:, : len(tokens)].max() == 0


def test_every_block_fires_and_strength_zero_is_bit_identical(pack, engine, flux, tiny_clip_vision):
    model, clip = flux
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


def test_multi_token_trigger_binds_every_piece(pack, engine, flux, tiny_clip_vision):
    model, clip = flux
    pieces = [t[0] for t in clip.tokenize("sneaker")["t5xxl"][0] if t[0] not in (0, 1)]
    assert len(pieces) == 2  # T5 splits it: the trigger is found as the whole sequence
    subjects = encode(pack, flux_adapter(engine, model), tiny_clip_vision, "sneaker")
    patched, _, _ = apply(pack, model, clip, subjects, "a red sneaker on grass")
    run = next(iter(dit_patches(patched).values())).run
    tokens = [t[0] for t in clip.tokenize("a red sneaker on grass")["t5xxl"][0]]
    start = next(i for i in range(len(tokens)) if tokens[i : i + 2] == pieces)
    assert run.positions[0].tolist() == [start, start + 1]


def test_stacks_on_another_attention_override(pack, engine, flux, tiny_clip_vision):
    """An override set before ours (another pack's) still runs; ours adds the subjects' change to its output."""
    model, clip = flux
    other = model.clone()
    shifted = []

    def plus_one(func, *args, **kwargs):
        shifted.append(1)
        return func(*args, **kwargs) + 1.0

    other.model_options.setdefault("transformer_options", {})["optimized_attention_override"] = plus_one
    subjects = encode(pack, flux_adapter(engine, model), tiny_clip_vision, "bottle")
    patched, pos, _ = apply(pack, other, clip, subjects, "a photo of a bottle")
    calls = spy(patched, ("double_block", 0))
    sample_flux(patched, pos, encode_text(clip, ""))
    ((q, k, v, heads, out),) = calls
    tokens = [t[0] for t in clip.tokenize("a photo of a bottle")["t5xxl"][0]]
    where = torch.zeros(q.shape[0], len(tokens), dtype=torch.bool)
    where[:, tokens.index(clip.tokenize("bottle")["t5xxl"][0][0][0])] = True
    key_norm = patched.model.diffusion_model.double_blocks[0].txt_attn.norm.key_norm.scale
    want = expected(q, k, v, heads, subjects[0], 0, key_norm, where) + 1.0
    torch.testing.assert_close(out.double(), want, atol=1e-4, rtol=1e-4)
    assert len(shifted) >= 4  # every block's call, not only ours


def test_unet_adapter_on_flux_is_refused(pack, engine, flux, tiny_sd15, tiny_clip_vision):
    from test_nodes_inprocess import adapter_for

    model, clip = flux
    subjects = encode(pack, adapter_for(engine, tiny_sd15), tiny_clip_vision, "bottle")
    with pytest.raises(engine.NestedAttentionError, match="Flux with Flux"):
        apply(pack, model, clip, subjects, "a bottle")


def test_old_comfyui_gets_a_clear_error(pack, engine, comfy, tiny_clip_vision, tiny_sd15):
    """The 2024 ComfyUI has no attention override: a DiT model there is refused by name, before any work."""
    if comfy.has_flux():
        pytest.skip("this ComfyUI has the override")
    from test_nodes_inprocess import adapter_for

    class Dit(torch.nn.Module):
        double_blocks = torch.nn.ModuleList()
        single_blocks = torch.nn.ModuleList()

    class Patcher:
        class model:  # noqa: N801  (the shape of ModelPatcher.model)
            diffusion_model = Dit()

    subjects = encode(pack, adapter_for(engine, tiny_sd15), tiny_clip_vision, "bottle")
    with pytest.raises(engine.NestedAttentionError, match="too old for Nested Attention on Flux"):
        node(pack, "NestedAttentionApply").apply(Patcher(), None, subjects, "a bottle")


def test_clones_share_the_patch_state_and_other_layouts_pass_through(pack, engine, flux, tiny_clip_vision, caplog):
    import copy

    model, clip = flux
    subjects = encode(pack, flux_adapter(engine, model), tiny_clip_vision, "bottle")
    patched, _, _ = apply(pack, model, clip, subjects, "a bottle")
    patch = dit_patches(patched)[("double_block", 0)]
    twin = copy.deepcopy(patch)
    assert twin.run is patch.run and twin.key_norm is patch.key_norm
    seen = []

    def func(q, k, v, heads, **kwargs):
        seen.append(q.shape)
        return q

    override = patch._override(None, None, None)
    q = torch.randn(1, 6, 8)  # merged layout, as a model other than Flux may call it
    assert override(func, q, q, q, 2, skip_reshape=False) is q and seen == [q.shape]
    assert "not applied there" in caplog.text


def test_the_comfy_patch_and_the_diffusers_processor_agree_on_one_flux(pack, engine, comfy, tiny_clip_vision):
    """One tiny Flux, its weights in ComfyUI's layout and in diffusers' (comfy.utils.flux_to_diffusers): the same
    velocity without a subject, and with the same subject through each host's own path (the nodes; install)."""
    import importlib

    from tiny_diffusers import flux_transformer_from_comfy

    if not comfy.has_flux():
        pytest.skip("this ComfyUI has no Flux")
    from comfy.utils import flux_to_diffusers

    model, clip = comfy.tiny_flux_model(mlp_ratio=4.0), comfy.tiny_flux_clip()  # diffusers' blocks have mlp 4
    diffusion = model.model.diffusion_model
    transformer = flux_transformer_from_comfy(diffusion, flux_to_diffusers(comfy.TINY_FLUX))
    layers = importlib.import_module(engine.__name__ + ".layers").dit_layers(2, 2, 64)  # names for both hosts
    adapter = engine.random_adapter(flux_adapter(engine, model).config, layers, seed=3)
    subjects = encode(pack, adapter, tiny_clip_vision, "bottle")
    text = "a photo of a bottle on a table"
    patched, pos, _ = apply(pack, model, clip, subjects, text)
    context, pooled = pos[0][0], pos[0][1]["pooled_output"]  # (1, T, 64), (1, 64)
    x, sigma = torch.randn(1, 16, 8, 8, generator=torch.Generator().manual_seed(0)), torch.tensor([0.7])

    def comfy_velocity(patcher):
        options = patcher.model_options
        c = {"c_crossattn": context, "y": pooled, "transformer_options": options.get("transformer_options", {})}

        def forward(x_, t_, c_crossattn, y, transformer_options):
            return diffusion(x_, t_, context=c_crossattn, y=y, transformer_options=transformer_options)

        wrapper = options.get("model_function_wrapper")
        with torch.no_grad():
            if wrapper is None:
                return forward(x, sigma, **c)
            return wrapper(forward, {"input": x, "timestep": sigma, "c": c, "cond_or_uncond": [0]})

    processors = importlib.import_module(engine.__name__ + ".hosts.diffusers_processor").install(
        transformer, adapter.layers
    )
    binding = importlib.import_module(engine.__name__ + ".binding")
    tokens = [t[0] for t in clip.tokenize(text)["t5xxl"][0]]
    where = torch.zeros(1, len(tokens), dtype=torch.bool)
    where[0, tokens.index(clip.tokenize("bottle")["t5xxl"][0][0][0])] = True

    def diffusers_velocity(placements):
        packed = x.view(1, 16, 4, 2, 4, 2).permute(0, 2, 4, 1, 3, 5).reshape(1, 16, 64)  # (1, N, C*2*2)
        rows, cols = torch.meshgrid(torch.arange(4.0), torch.arange(4.0), indexing="ij")
        img_ids = torch.stack([torch.zeros(4, 4), rows, cols], -1).reshape(16, 3)
        with torch.no_grad(), processors.bound(binding.ModelCall(placements, (4, 4))):
            out = transformer(
                hidden_states=packed,
                timestep=sigma,
                encoder_hidden_states=context,
                pooled_projections=pooled,
                img_ids=img_ids,
                txt_ids=torch.zeros(len(tokens), 3),
            ).sample  # (1, N, 64)
        return out.view(1, 4, 4, 16, 2, 2).permute(0, 3, 1, 4, 2, 5).reshape(1, 16, 8, 8)

    plain = comfy_velocity(model)
    torch.testing.assert_close(diffusers_velocity([]), plain, atol=1e-4, rtol=1e-4)
    nested = comfy_velocity(patched)
    bound = diffusers_velocity([binding.Placement(subjects[0], where)])
    torch.testing.assert_close(bound, nested, atol=1e-4, rtol=1e-4)
    assert (nested - plain).abs().max() > 1e-3  # the subject changed the output, in both hosts alike
