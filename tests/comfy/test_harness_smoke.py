"""In-process smoke tests of the harness: tiny random models through ComfyUI's real nodes."""

import pytest

torch = pytest.importorskip("torch")


def _sample(nodes, model, pos, neg, size=64, steps=2, seed=0, cfg=5.0):
    latent = nodes.EmptyLatentImage().generate(size, size, 1)[0]
    return nodes.KSampler().sample(model, seed, steps, cfg, "euler", "normal", pos, neg, latent, denoise=1.0)[0]


def test_tiny_sd15_pipeline(comfy_nodes, tiny_sd15, tiny_clip, tiny_vae):
    nodes = comfy_nodes
    pos = nodes.CLIPTextEncode().encode(tiny_clip, "a photo of sks dog")[0]
    neg = nodes.CLIPTextEncode().encode(tiny_clip, "")[0]
    assert pos[0][0].shape == (1, 77, 64)
    out = _sample(nodes, tiny_sd15, pos, neg)
    assert out["samples"].shape == (1, 4, 8, 8)
    assert torch.isfinite(out["samples"]).all()
    again = _sample(nodes, tiny_sd15, pos, neg)
    assert torch.equal(out["samples"], again["samples"])  # same seed -> same latent
    img = nodes.VAEDecode().decode(tiny_vae, out)[0]
    assert img.shape == (1, 64, 64, 3)
    assert torch.isfinite(img).all()


def test_tiny_sdxl_attn2_replace_fires_on_all_70_keys(comfy, comfy_nodes, tiny_sdxl, tiny_sdxl_clip):
    from comfy.ldm.modules.attention import optimized_attention

    nodes = comfy_nodes
    fired = {}

    def replace(q, k, v, extra_options):
        key = (extra_options["block"][0], extra_options["block"][1], extra_options["block_index"])
        fired[key] = fired.get(key, 0) + 1
        return optimized_attention(q, k, v, extra_options["n_heads"])

    m = tiny_sdxl.clone()
    for name, number, idx in comfy.SDXL_ATTN2_KEYS:
        m.set_model_attn2_replace(replace, name, number, idx)
    assert len(set(comfy.SDXL_ATTN2_KEYS)) == 70

    pos = nodes.CLIPTextEncode().encode(tiny_sdxl_clip, "a photo of sks dog")[0]
    neg = nodes.CLIPTextEncode().encode(tiny_sdxl_clip, "")[0]
    assert pos[0][0].shape == (1, 77, 128)
    assert pos[0][1]["pooled_output"].shape == (1, 64)
    out = _sample(nodes, m, pos, neg, steps=1)
    assert torch.isfinite(out["samples"]).all()
    assert set(fired) == set(comfy.SDXL_ATTN2_KEYS)
    # the patch lives on the clone only
    assert "attn2" not in tiny_sdxl.model_options["transformer_options"].get("patches_replace", {})


def test_tiny_clip_vision_encode(comfy_nodes, tiny_clip_vision):
    img = torch.rand(1, 64, 80, 3)
    out = tiny_clip_vision.encode_image(img)
    assert out["image_embeds"].shape == (1, 32)
    assert out["penultimate_hidden_states"].shape == (1, 257, 64)
    assert torch.isfinite(out["image_embeds"]).all()
    enc = (
        comfy_nodes.CLIPVisionEncode().encode(tiny_clip_vision, img, "center")[0]
        if "crop" in comfy_nodes.CLIPVisionEncode.INPUT_TYPES()["required"]
        else comfy_nodes.CLIPVisionEncode().encode(tiny_clip_vision, img)[0]
    )
    assert enc["image_embeds"].shape == (1, 32)
