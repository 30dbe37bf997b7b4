"""SDXL training: a tiny SDXL-layout pipeline (two text encoders, pooled text and time ids) trains a few steps
with the project's trainer; the exported adapter loads in the ComfyUI loader node and, on every layer,
reproduces what the diffusers processor computes with the same adapter on the same inputs."""

import importlib

import torch
from tiny_diffusers import make_base_xl, make_clip_vision, make_photos


def test_sdxl_adapter_trains_and_the_comfy_loader_reproduces_the_processor(pack, model_dirs):
    from na_engine.binding import ModelCall, Placement
    from na_engine.families.unet import load_base
    from na_engine.formats import load_adapter
    from na_engine.hosts.diffusers_processor import NestedAttnProcessor, NestedProcessors
    from na_engine.standalone.prepare import prepare
    from na_engine.standalone.train import TrainConfig, train
    from na_engine.subjects import Subject

    root = model_dirs
    base, vision = make_base_xl(str(root / "xl")), make_clip_vision(str(root / "vision"))
    prepare(make_photos(str(root / "photos"), count=4), str(root / "data"), "dog", resolution=32)
    out = root / "nested_attention" / "tiny_xl.safetensors"
    cfg = TrainConfig(
        base, vision, str(root / "data"), str(out), steps=3, batch_size=2, lr=1e-3, tokens=4, resampler_depth=1
    )
    train(cfg)
    losses = [float(line.split(",")[1]) for line in open(cfg.run_dir + "/loss.csv").read().splitlines()[1:]]
    assert len(losses) == 3 and all(0 < v < 10 for v in losses)

    comfy_patch = importlib.import_module(pack.__name__ + ".na_engine.hosts.comfy_patch")
    comfy_binding = importlib.import_module(pack.__name__ + ".na_engine.binding")
    comfy_subjects = importlib.import_module(pack.__name__ + ".na_engine.subjects")
    in_comfy = pack.NODE_CLASS_MAPPINGS["NestedAttentionLoader"]().load("tiny_xl.safetensors")[0]
    in_diffusers = load_adapter(str(out))
    assert [(x.comfy, x.width) for x in in_comfy.layers] == [(x.comfy, x.width) for x in in_diffusers.layers]
    assert len(in_diffusers.layers) == 8  # the second level's 2 transformer layers down, 2 x 2 up, 2 in the middle

    features = torch.randn(2, 17, 32)  # (n, P, E): two photos' CLIP features
    torch.testing.assert_close(in_comfy.resampler(features), in_diffusers.resampler(features), rtol=0, atol=0)

    unet = load_base(base).unet
    modules = dict(unet.named_modules())
    g = torch.Generator().manual_seed(0)
    tokens = torch.randn(4, 32, generator=g)
    context = torch.randn(1, 12, 32, generator=g).repeat(2, 1, 1)  # (B, T, 32): [negative, positive] rows alike
    where = torch.zeros(2, 12, dtype=torch.bool)
    where[1, 3] = True  # the trigger, in the positive row only
    for layer, comfy_layer in zip(in_diffusers.layers, in_comfy.layers):
        attn = modules[layer.diffusers]
        hidden = torch.randn(2, 16, layer.width, generator=g)  # a 4x4 latent's queries
        processors = NestedProcessors()
        attn.set_processor(NestedAttnProcessor(processors, layer))
        subject = Subject(tokens, in_diffusers, "dog")
        with torch.no_grad(), processors.bound(ModelCall([Placement(subject, where)], (4, 4))):
            ours = attn(hidden, encoder_hidden_states=context)

        run = comfy_patch.NestedRun([comfy_subjects.Subject(tokens, in_comfy, "dog")], [[3]], context[:1])
        patch = comfy_patch.NestedAttentionPatch(run, comfy_layer.comfy)
        call = comfy_binding.ModelCall([comfy_binding.Placement(run.subjects[0], where)], (4, 4))
        options = {"n_heads": attn.heads, "block": comfy_layer.comfy[:2], "block_index": comfy_layer.comfy[2]}
        with torch.no_grad():
            q, k, v = attn.to_q(hidden), attn.to_k(context), attn.to_v(context)
            theirs = attn.to_out[0](patch(q, k, v, {**options, comfy_patch.ROWS_KEY: {run.uid: call}}))
            plain = attn.to_out[0](patch(q, k, v, options))  # no subject bound: ComfyUI's own attention
        torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-6, msg=str(layer.comfy))
        assert not torch.allclose(ours[1], plain[1])  # the subject changed the positive row
        torch.testing.assert_close(ours[0], plain[0], rtol=1e-5, atol=1e-6)  # and only it
