"""The nodes inside a real ComfyUI (COMFYUI_PATH or the 2024 copy), on tiny random-weight models."""

import logging

import pytest
import torch


def adapter_for(engine, model, clip_width=64, token_dim=64, queries=4, seed=0):
    layers = [
        engine.Layer(i, f"layer{i}", key, w)
        for i, (key, w) in enumerate(engine.hosts.comfy_layers.comfy_unet_layers(model.model.diffusion_model))
    ]
    config = engine.ResamplerConfig(
        dim=64, depth=1, dim_head=32, heads=2, num_queries=queries, embedding_dim=clip_width, output_dim=token_dim
    )
    adapter = engine.random_adapter(config, layers, seed=seed)
    adapter.name = "tiny_adapter.safetensors"
    return adapter


def node(pack, name):
    return pack.NODE_CLASS_MAPPINGS[name]()


def encode(pack, adapter, clip_vision, trigger, images=None, **kw):
    images = torch.rand(2, 48, 40, 3) if images is None else images
    return node(pack, "NestedSubjectEncoder").encode(adapter, clip_vision, images, trigger, **kw)[0]


def apply(pack, model, clip, subjects, text, capture=False, **kw):
    prompt = {"9": {"inputs": {"capture": ["1", 2]}}} if capture else {}
    return node(pack, "NestedAttentionApply").apply(model, clip, subjects, text, prompt=prompt, unique_id="1", **kw)


def sample(model, pos, neg, steps=2, cfg=5.0, batch=1, seed=0):
    import nodes

    latent = nodes.EmptyLatentImage().generate(64, 64, batch)[0]
    with torch.inference_mode():
        return nodes.KSampler().sample(model, seed, steps, cfg, "euler", "normal", pos, neg, latent)[0]["samples"]


def patches(model):
    return model.model_options["transformer_options"]["patches_replace"]["attn2"]


def run_of(model):
    return next(iter(patches(model).values())).run


def encode_text(clip, text):
    import nodes

    return nodes.CLIPTextEncode().encode(clip, text)[0]


def spy(model, key):
    """Record (q, k, v, extra_options, out) of the patch registered under ``key``."""
    calls = []
    inner = patches(model)[key]

    class Spy:
        def __getattr__(self, name):
            return getattr(inner, name)

        def __call__(self, q, k, v, extra_options):
            out = inner(q, k, v, extra_options)
            calls.append((q, k, v, dict(extra_options), out))
            return out

    patches(model)[key] = Spy()
    return calls


def test_every_sd15_like_layer_fires(pack, engine, tiny_sd15, tiny_clip, tiny_clip_vision):
    subjects = encode(pack, adapter_for(engine, tiny_sd15), tiny_clip_vision, "dog")
    model, pos, _ = apply(pack, tiny_sd15, tiny_clip, subjects, "a photo of a dog")
    sample(model, pos, encode_text(tiny_clip, ""), steps=2)
    keys = {key for key, _ in engine.hosts.comfy_layers.comfy_unet_layers(tiny_sd15.model.diffusion_model)}
    assert set(run_of(model).fired) == keys
    assert all(count == 2 for count in run_of(model).fired.values())


def test_all_16_sd15_layers_fire(pack, engine, comfy, tiny_clip, tiny_clip_vision):
    model = comfy.sd15_layout_model()
    layers = engine.hosts.comfy_layers.comfy_unet_layers(model.model.diffusion_model)
    assert [k for k, _ in layers] == sorted(layer.comfy for layer in engine.TABLES["sd15"])
    assert {k for k, _ in layers} == {layer.comfy for layer in engine.TABLES["sd15"]}
    subjects = encode(pack, adapter_for(engine, model), tiny_clip_vision, "dog")
    patched, pos, _ = apply(pack, model, tiny_clip, subjects, "a photo of a dog")
    sample(patched, pos, encode_text(tiny_clip, ""), steps=1)
    assert len(run_of(patched).fired) == 16


def test_all_70_sdxl_layers_fire(pack, engine, tiny_sdxl, tiny_sdxl_clip, tiny_clip_vision):
    adapter = adapter_for(engine, tiny_sdxl, token_dim=128)
    layers = engine.hosts.comfy_layers.comfy_unet_layers(tiny_sdxl.model.diffusion_model)
    assert len(layers) == 70
    assert {k for k, _ in layers} == {layer.comfy for layer in engine.TABLES["sdxl"]}
    subjects = encode(pack, adapter, tiny_clip_vision, "person")
    model, pos, _ = apply(pack, tiny_sdxl, tiny_sdxl_clip, subjects, "a person at a desk")
    sample(model, pos, encode_text(tiny_sdxl_clip, "blurry"), steps=1)
    assert len(run_of(model).fired) == 70


def test_exact_formula_on_prompt_rows_only(pack, engine, tiny_sd15, tiny_clip, tiny_clip_vision):
    import comfy.ldm.modules.attention as attention

    subjects = encode(pack, adapter_for(engine, tiny_sd15), tiny_clip_vision, "dog")
    model, pos, _ = apply(pack, tiny_sd15, tiny_clip, subjects, "a (dog:1.2) and another dog")
    key = next(iter(patches(model)))
    calls = spy(model, key)
    sample(model, pos, encode_text(tiny_clip, "ugly"), steps=1, batch=2)
    q, k, v, xo, out = calls[0]
    heads = xo["n_heads"]
    ours = [i for i, c in enumerate(xo["cond_or_uncond"]) if c == 0]
    rows = torch.zeros(q.shape[0], dtype=torch.bool)
    per = q.shape[0] // len(xo["cond_or_uncond"])
    for i in ours:
        rows[i * per : (i + 1) * per] = True
    assert torch.equal(out[~rows], attention.optimized_attention(q[~rows], k[~rows], v[~rows], heads))
    tokens = tiny_clip.tokenize("a (dog:1.2) and another dog")["l"][0]
    dog = [i for i, t in enumerate(tokens) if t[0] == tiny_clip.tokenize("dog")["l"][0][1][0]]
    where = torch.zeros(int(rows.sum()), k.shape[1], dtype=torch.bool)
    where[:, dog] = True
    layer = subjects[0].adapter.layer_index(key + (0,) if len(key) == 2 else key)
    nk, nv = subjects[0].adapter.nested_kv(layer, subjects[0].tokens)
    binding = engine.NestedBinding(nk.double(), nv.double(), where)
    want = engine.nested_attention(
        q[rows].double(), k[rows].double(), v[rows].double(), heads, [binding], method="closed_form"
    )
    assert len(dog) == 2
    torch.testing.assert_close(out[rows].double(), want, atol=1e-4, rtol=1e-4)


def test_every_row_bound_takes_the_cpu_kernel(pack, engine, tiny_sd15, tiny_clip, tiny_clip_vision):
    """The prompt in every batch row (here it is its own negative): ComfyUI's attn2 call runs the C++ kernel."""
    subjects = encode(pack, adapter_for(engine, tiny_sd15), tiny_clip_vision, "dog")
    model, pos, _ = apply(pack, tiny_sd15, tiny_clip, subjects, "a photo of a dog")
    key = next(iter(patches(model)))
    calls = spy(model, key)
    sample(model, pos, pos, steps=1)
    q, k, v, xo, out = calls[0]
    tokens = tiny_clip.tokenize("a photo of a dog")["l"][0]
    dog = [i for i, t in enumerate(tokens) if t[0] == tiny_clip.tokenize("dog")["l"][0][1][0]]
    where = torch.zeros(q.shape[0], k.shape[1], dtype=torch.bool)
    where[:, dog] = True
    layer = subjects[0].adapter.layer_index(key + (0,) if len(key) == 2 else key)
    nk, nv = subjects[0].adapter.nested_kv(layer, subjects[0].tokens)
    kernel = engine.nested_attention(q, k, v, xo["n_heads"], [engine.NestedBinding(nk, nv, where)], method="cpu_kernel")
    statistics = engine.nested_attention(
        q, k, v, xo["n_heads"], [engine.NestedBinding(nk, nv, where)], method="statistics"
    )
    assert q.shape[0] == 2 and torch.equal(out, kernel) and not torch.equal(out, statistics)
    want = engine.nested_attention(
        q.double(),
        k.double(),
        v.double(),
        xo["n_heads"],
        [engine.NestedBinding(nk.double(), nv.double(), where)],
        method="closed_form",
    )
    torch.testing.assert_close(out.double(), want, atol=1e-4, rtol=1e-4)


def test_base_model_and_negative_unchanged(pack, engine, tiny_sd15, tiny_clip, tiny_clip_vision):
    neg = encode_text(tiny_clip, "")
    pos_plain = encode_text(tiny_clip, "a photo of a dog")
    before = sample(tiny_sd15, pos_plain, neg)
    subjects = encode(pack, adapter_for(engine, tiny_sd15), tiny_clip_vision, "dog")
    model, pos, _ = apply(pack, tiny_sd15, tiny_clip, subjects, "a photo of a dog")
    patched = sample(model, pos, neg)
    assert torch.equal(sample(tiny_sd15, pos_plain, neg), before)
    assert not torch.equal(patched, before)
    # the same patched model with a prompt of its own is untouched: its rows are not ours
    assert torch.equal(
        sample(model, encode_text(tiny_clip, "a photo of a cat"), neg),
        sample(tiny_sd15, encode_text(tiny_clip, "a photo of a cat"), neg),
    )
    # strength 0 is the plain model
    zero, pos0, _ = apply(pack, tiny_sd15, tiny_clip, subjects, "a photo of a dog", strength=0.0)
    torch.testing.assert_close(sample(zero, pos0, neg), before)


def test_trigger_weight_input(pack, engine, tiny_sd15, tiny_clip, tiny_clip_vision):
    """The Apply node's trigger_weight reaches every layer: 1.0 is the default, another value changes the image."""
    spec = pack.NODE_CLASS_MAPPINGS["NestedAttentionApply"].INPUT_TYPES()["optional"]["trigger_weight"]
    assert spec[1]["default"] == 1.0 and "trigger word" in spec[1]["tooltip"]
    neg = encode_text(tiny_clip, "")
    subjects = encode(pack, adapter_for(engine, tiny_sd15), tiny_clip_vision, "dog")
    plain, pos, _ = apply(pack, tiny_sd15, tiny_clip, subjects, "a photo of a dog")
    one, pos1, _ = apply(pack, tiny_sd15, tiny_clip, subjects, "a photo of a dog", trigger_weight=1.0)
    heavy, pos3, _ = apply(pack, tiny_sd15, tiny_clip, subjects, "a photo of a dog", trigger_weight=3.0)
    assert run_of(heavy).trigger_weight == 3.0
    assert torch.equal(sample(one, pos1, neg), sample(plain, pos, neg))
    assert not torch.allclose(sample(heavy, pos3, neg), sample(plain, pos, neg))


@pytest.mark.parametrize("cfg", [1.0, 4.0])
def test_cfg_and_batch(pack, engine, tiny_sd15, tiny_clip, tiny_clip_vision, cfg):
    subjects = encode(pack, adapter_for(engine, tiny_sd15), tiny_clip_vision, "dog")
    model, pos, _ = apply(pack, tiny_sd15, tiny_clip, subjects, "a photo of a dog")
    out = sample(model, pos, encode_text(tiny_clip, ""), cfg=cfg, batch=3)
    assert out.shape[0] == 3 and torch.isfinite(out).all()
    assert run_of(model).fired


def test_conditioning_combine_after(pack, engine, tiny_sd15, tiny_clip, tiny_clip_vision):
    import nodes

    subjects = encode(pack, adapter_for(engine, tiny_sd15), tiny_clip_vision, "dog")
    model, pos, _ = apply(pack, tiny_sd15, tiny_clip, subjects, "a photo of a dog")
    key = next(iter(patches(model)))
    calls = spy(model, key)
    other = encode_text(tiny_clip, "a sunny beach with palm trees and a long long pier into the sea")
    combined = nodes.ConditioningCombine().combine(pos, other)[0]
    sample(model, combined, encode_text(tiny_clip, ""), steps=1)
    q, k, v, xo, out = calls[0]
    bound = xo["nested_attention_rows"][run_of(model).uid]
    rows = bound.placements[0].where.any(-1)
    assert 0 < int(rows.sum()) < q.shape[0]  # our chunk only, not the other prompt's
    import comfy.ldm.modules.attention as attention

    assert torch.equal(out[~rows], attention.optimized_attention(q[~rows], k[~rows], v[~rows], xo["n_heads"]))


def test_controlnet_after(pack, engine, comfy, tiny_sd15, tiny_clip, tiny_clip_vision):
    import nodes

    subjects = encode(pack, adapter_for(engine, tiny_sd15), tiny_clip_vision, "dog")
    model, pos, _ = apply(pack, tiny_sd15, tiny_clip, subjects, "a photo of a dog")
    controlled = nodes.ControlNetApply().apply_controlnet(pos, comfy.tiny_controlnet(), torch.rand(1, 64, 64, 3), 0.8)[
        0
    ]
    neg = encode_text(tiny_clip, "")
    out = sample(model, controlled, neg)
    layers = engine.hosts.comfy_layers.comfy_unet_layers(tiny_sd15.model.diffusion_model)
    assert set(run_of(model).fired) == {key for key, _ in layers}
    assert torch.isfinite(out).all() and not torch.equal(out, sample(model, pos, neg))


def test_conditioning_that_changes_the_prompt_warns(pack, engine, tiny_sd15, tiny_clip, tiny_clip_vision, caplog):
    import nodes

    subjects = encode(pack, adapter_for(engine, tiny_sd15), tiny_clip_vision, "dog")
    model, pos, _ = apply(pack, tiny_sd15, tiny_clip, subjects, "a photo of a dog")
    averaged = nodes.ConditioningAverage().addWeighted(pos, encode_text(tiny_clip, "a cat"), 0.5)[0]
    with caplog.at_level(logging.WARNING, logger="nested_attention"):
        sample(model, averaged, encode_text(tiny_clip, ""), steps=1)
    assert "no positive batch row carries the prompt" in caplog.text
    assert not run_of(model).fired


def test_lora_patched_model(pack, engine, tiny_sd15, tiny_clip, tiny_clip_vision):
    lora = tiny_sd15.clone()
    key = next(k for k in lora.model_state_dict() if k.endswith("attn2.to_k.weight"))
    weight = lora.model_state_dict()[key]
    lora.add_patches({key: (torch.randn_like(weight) * 0.1,)}, 1.0)
    subjects = encode(pack, adapter_for(engine, tiny_sd15), tiny_clip_vision, "dog")
    model, pos, _ = apply(pack, lora, tiny_clip, subjects, "a photo of a dog")
    neg = encode_text(tiny_clip, "")
    with_lora = sample(model, pos, neg)
    plain, pos2, _ = apply(pack, tiny_sd15, tiny_clip, subjects, "a photo of a dog")
    assert not torch.equal(with_lora, sample(plain, pos2, neg))
    assert len(run_of(model).fired) == len(engine.hosts.comfy_layers.comfy_unet_layers(tiny_sd15.model.diffusion_model))


class IPAdapterLikeReplace:
    """The Attn2Replace protocol IPAdapter_plus, InstantID and PuLID share: base attention,
    then each callback's term added while sigma is in its range."""

    def __init__(self, callback, **kwargs):
        self.callback, self.kwargs = [callback], [kwargs]

    def add(self, callback, **kwargs):
        self.callback.append(callback)
        self.kwargs.append(kwargs)

    def __call__(self, q, k, v, extra_options):
        import comfy.ldm.modules.attention as attention

        out = attention.optimized_attention(q, k, v, extra_options["n_heads"])
        sigma = float(extra_options["sigmas"][0])
        for cb, kw in zip(self.callback, self.kwargs):
            if kw["sigma_end"] <= sigma <= kw["sigma_start"]:
                out = out + cb(out, q, k, v, extra_options, **kw)
        return out


IP_CALLS = {}  # by tag; ComfyUI deep-copies model options, so a list in kwargs would be copied too


def ip_term(out, q, k, v, extra_options, **kw):
    IP_CALLS[kw["tag"]] = IP_CALLS.get(kw["tag"], 0) + 1
    return 0.05 * q


def test_stacks_with_ipadapter_style_replace_in_both_orders(pack, engine, tiny_sd15, tiny_clip, tiny_clip_vision):
    subjects = encode(pack, adapter_for(engine, tiny_sd15), tiny_clip_vision, "dog")
    neg = encode_text(tiny_clip, "")
    keys = [k for k, _ in engine.hosts.comfy_layers.comfy_unet_layers(tiny_sd15.model.diffusion_model)]

    first = tiny_sd15.clone()
    for block, number, _ in keys:  # registered the way IPAdapter_plus does for SD1.5: 2-tuple keys
        first.set_model_attn2_replace(
            IPAdapterLikeReplace(ip_term, sigma_start=1e9, sigma_end=0.0, tag="before"), block, number
        )
    model_a, pos_a, _ = apply(pack, first, tiny_clip, subjects, "a photo of a dog")
    out_a = sample(model_a, pos_a, neg)

    model_b, pos_b, _ = apply(pack, tiny_sd15, tiny_clip, subjects, "a photo of a dog")
    for replace in list(patches(model_b).values()):  # what IPAdapter_plus does when the key exists
        replace.add(ip_term, sigma_start=1e9, sigma_end=0.0, tag="after")
    out_b = sample(model_b, pos_b, neg)

    assert IP_CALLS["before"] == IP_CALLS["after"] > 0 and len(run_of(model_a).fired) == len(keys) == len(
        run_of(model_b).fired
    )
    torch.testing.assert_close(out_a, out_b, atol=1e-3, rtol=1e-3)  # fused vs closed form, through 2 steps
    nested_only, pos_c, _ = apply(pack, tiny_sd15, tiny_clip, subjects, "a photo of a dog")
    assert not torch.allclose(out_a, sample(nested_only, pos_c, neg))


def test_add_on_a_clone_does_not_leak(pack, engine, tiny_sd15, tiny_clip, tiny_clip_vision):
    subjects = encode(pack, adapter_for(engine, tiny_sd15), tiny_clip_vision, "dog")
    model, _, _ = apply(pack, tiny_sd15, tiny_clip, subjects, "a photo of a dog")
    clone = model.clone()
    for replace in patches(clone).values():
        replace.add(ip_term, sigma_start=1e9, sigma_end=0.0, tag="clone")
    assert all(not r.callback for r in patches(model).values())
    assert all(r.run is run_of(model) for r in patches(clone).values())


def test_capture_and_preview(pack, engine, tiny_sd15, tiny_clip, tiny_clip_vision, tiny_vae):
    import nodes

    subjects = encode(pack, adapter_for(engine, tiny_sd15), tiny_clip_vision, "dog")
    idle, _, no_capture = apply(pack, tiny_sd15, tiny_clip, subjects, "a photo of a dog")
    assert no_capture is None
    model, pos, capture = apply(pack, tiny_sd15, tiny_clip, subjects, "a photo of a dog", capture=True)
    latent = sample(model, pos, encode_text(tiny_clip, ""), batch=2)
    with torch.inference_mode():
        image = nodes.VAEDecode().decode(tiny_vae, {"samples": latent})[0]
    result = node(pack, "NestedAttentionMapPreview").preview(capture, image)
    maps = result["result"][0]
    assert maps.shape == (2, image.shape[1], 3 * image.shape[2], 3)
    assert 0 <= float(maps.min()) and float(maps.max()) <= 1
    assert len(result["ui"]["images"]) == 2
    first = capture.outer[0].clone()
    sample(model, pos, encode_text(tiny_clip, ""), batch=2, seed=1)  # a new run starts afresh
    assert capture.outer[0].shape == first.shape and not torch.equal(capture.outer[0], 2 * first)


def test_multi_subject_from_two_adapters_with_masks(pack, engine, tiny_sd15, tiny_clip, tiny_clip_vision):
    face = encode(pack, adapter_for(engine, tiny_sd15, seed=1), tiny_clip_vision, "man")
    pet = encode(pack, adapter_for(engine, tiny_sd15, queries=6, seed=2), tiny_clip_vision, "dog")
    left, right = torch.zeros(1, 30, 50), torch.zeros(1, 30, 50)
    left[..., :25], right[..., 25:] = 1, 1
    both = node(pack, "NestedMultiSubjectCombine").combine(subjects_1=face, subjects_2=pet, mask_1=left, mask_2=right)[
        0
    ]
    assert [s.trigger for s in both] == ["man", "dog"] and both[1].mask is not None
    model, pos, _ = apply(pack, tiny_sd15, tiny_clip, both, "a man walking his dog")
    out = sample(model, pos, encode_text(tiny_clip, ""))
    assert torch.isfinite(out).all() and run_of(model).fired
    with pytest.raises(engine.NestedAttentionError, match="Two subjects use the trigger word 'dog'"):
        node(pack, "NestedMultiSubjectCombine").combine(subjects_1=pet, subjects_2=pet)


def test_bad_inputs_get_clear_errors(pack, engine, tiny_sd15, tiny_sdxl, tiny_clip, tiny_clip_vision):
    err = engine.NestedAttentionError
    adapter = adapter_for(engine, tiny_sd15)
    subjects = encode(pack, adapter, tiny_clip_vision, "dog")
    with pytest.raises(err, match=r"trigger word 'dog' is not in the prompt.*a photo of a cat"):
        apply(pack, tiny_sd15, tiny_clip, subjects, "a photo of a cat")
    with pytest.raises(
        err, match=r"made for an unknown model with 7 layers .*but this model is an unknown model with 70 layers of wid"
    ):
        apply(pack, tiny_sdxl, tiny_clip, subjects, "a photo of a dog")
    sd15_adapter = engine.random_adapter(engine.ResamplerConfig(num_queries=4, depth=1), engine.TABLES["sd15"])
    with pytest.raises(
        err, match=r"made for SD1.5 \(16 layers, widths 320/640/1280\), but this model is an unknown model with 70"
    ):
        apply(pack, tiny_sdxl, tiny_clip, engine.SubjectSet([subjects[0].with_(adapter=sd15_adapter)]), "a dog")
    vit_h = engine.random_adapter(
        engine.ResamplerConfig(dim=64, depth=1, dim_head=32, heads=2, num_queries=4, embedding_dim=1280, output_dim=64),
        adapter.layers,
    )
    with pytest.raises(err, match=r"CLIP ViT-H/14 features \(width 1280\).*width 64"):
        encode(pack, vit_h, tiny_clip_vision, "dog")
    with pytest.raises(err, match="empty"):
        encode(pack, adapter, tiny_clip_vision, "dog", images=torch.zeros(0, 32, 32, 3))
    # convertible inputs are converted, not refused
    assert encode(pack, adapter, tiny_clip_vision, "dog", images=torch.rand(1, 40, 40, 1))[0].tokens.shape[0] == 4
    assert (
        encode(pack, adapter, tiny_clip_vision, "dog", images=torch.rand(2, 40, 40, 4), combine="average")[
            0
        ].tokens.shape[0]
        == 4
    )
    assert encode(pack, adapter, tiny_clip_vision, "dog", mask=torch.ones(1, 13, 7), crop="pad")[0].tokens.shape[0] == 8
    with pytest.raises(err, match="start_at"):
        apply(pack, tiny_sd15, tiny_clip, subjects, "a dog", start_at=0.8, end_at=0.2)


def test_nan_or_inf_in_an_image_or_mask_is_refused(pack, engine, tiny_sd15, tiny_clip_vision):
    err = engine.NestedAttentionError
    adapter = adapter_for(engine, tiny_sd15)
    bad = torch.rand(1, 32, 32, 3)
    bad[0, 3, 4, 1] = float("nan")
    with pytest.raises(err, match=r"The reference image holds 1 NaN or infinite values"):
        encode(pack, adapter, tiny_clip_vision, "dog", images=bad)
    mask = torch.ones(1, 32, 32)
    mask[0, 0, 0] = float("inf")
    with pytest.raises(err, match=r"The subject mask holds 1 NaN"):
        encode(pack, adapter, tiny_clip_vision, "dog", mask=mask)
    subjects = encode(pack, adapter, tiny_clip_vision, "dog")
    with pytest.raises(err, match=r"mask_2 holds 1 NaN"):
        node(pack, "NestedMultiSubjectCombine").combine(subjects_2=subjects, mask_2=mask)


def test_two_patches_in_series(pack, engine, tiny_sd15, tiny_clip, tiny_clip_vision):
    """Different texts: a clear error at the second Patch naming the first; the same text: both subjects act."""
    adapter = adapter_for(engine, tiny_sd15)
    person = encode(pack, adapter, tiny_clip_vision, "person")
    dog = encode(pack, adapter, tiny_clip_vision, "dog", images=torch.rand(1, 40, 40, 3))
    first, _, _ = apply(pack, tiny_sd15, tiny_clip, person, "a photo of a person")
    with pytest.raises(
        engine.NestedAttentionError,
        match=r"already carries a Nested Attention Patch for the text 'a photo of a person' \(subjects 'person'\)"
        r".*one Multi-Subject Combine and use one Patch",
    ):
        apply(pack, first, tiny_clip, dog, "a person and a dog")
    text = "a person and a dog"
    one, _, _ = apply(pack, tiny_sd15, tiny_clip, person, text)
    both, pos, _ = apply(pack, one, tiny_clip, dog, text)
    neg = encode_text(tiny_clip, "")
    only_second, pos2, _ = apply(pack, tiny_sd15, tiny_clip, dog, text)
    assert not torch.equal(sample(both, pos, neg), sample(only_second, pos2, neg))  # the first subject still acts


def test_mask_batch_error_counts_latent_images(pack, engine, tiny_sd15, tiny_clip, tiny_clip_vision):
    subjects = encode(pack, adapter_for(engine, tiny_sd15), tiny_clip_vision, "dog")
    masked = node(pack, "NestedMultiSubjectCombine").combine(subjects_1=subjects, mask_1=torch.ones(3, 32, 32))[0]
    model, pos, _ = apply(pack, tiny_sd15, tiny_clip, masked, "a photo of a dog")
    with pytest.raises(Exception, match=r"The subject mask holds 3 images, but 2 latent images are being sampled"):
        sample(model, pos, encode_text(tiny_clip, ""), batch=2)


def test_loader_and_subject_files(pack, engine, tiny_sd15, tiny_clip, tiny_clip_vision, model_dirs):
    tmp_path = model_dirs
    adapter = adapter_for(engine, tiny_sd15)
    engine.save_adapter(adapter, str(tmp_path / "nested_attention" / "tiny_adapter.safetensors"))
    (tmp_path / "nested_attention" / "broken.safetensors").write_bytes(b"not a safetensors file")
    names = pack.NODE_CLASS_MAPPINGS["NestedAttentionLoader"].INPUT_TYPES()["required"]["adapter_name"][0]
    assert "tiny_adapter.safetensors" in names
    loaded = node(pack, "NestedAttentionLoader").load("tiny_adapter.safetensors")[0]
    with pytest.raises(engine.NestedAttentionError, match="broken.safetensors"):
        node(pack, "NestedAttentionLoader").load("broken.safetensors")
    subjects = encode(pack, loaded, tiny_clip_vision, "dog")
    node(pack, "NestedSubjectSave").save(subjects, "rex")
    node(pack, "NestedSubjectSave").save(subjects, "rex")  # never overwrites
    with pytest.raises(engine.NestedAttentionError, match=r"a file name may have at most 255\. Give a shorter name"):
        node(pack, "NestedSubjectSave").save(subjects, "r" * 250)
    files = sorted(p.name for p in (tmp_path / "nested_subjects").iterdir())
    assert files == ["rex.safetensors", "rex_1.safetensors"]
    back = node(pack, "NestedSubjectLoad").load("rex.safetensors")[0]
    assert torch.equal(back[0].tokens, subjects[0].tokens) and back[0].trigger == "dog"
    model_a, pos_a, _ = apply(pack, tiny_sd15, tiny_clip, subjects, "a dog")
    model_b, pos_b, _ = apply(pack, tiny_sd15, tiny_clip, back, "a dog")
    neg = encode_text(tiny_clip, "")
    assert torch.equal(sample(model_a, pos_a, neg), sample(model_b, pos_b, neg))
