#!/usr/bin/env python3
"""Writes the example graphs in example_workflows/ (ComfyUI's UI format, version 0.4) from the compact
descriptions below, so node ids, link ids, slots and the layout always agree.

    python scripts/build_workflows.py            # rewrite example_workflows/*.json
    python scripts/build_workflows.py --check    # exit 1 if a committed file differs
    python scripts/draw_pictures.py              # then: the thumbnails (<name>.jpg) the template browser shows

Sockets and widgets per node type are listed in SPECS (INPUT_TYPES order: required, then
optional; sockets are link inputs, widgets are the values in widgets_values). KSampler's seed is
followed by the frontend's "control_after_generate" value. tests/server/test_workflows_server.py checks
every node against a live server's /object_info and runs every file.
Test-sized settings (small images, 3 steps); each Note says what to use for real.
"""

import json
import os
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
OUT = os.path.join(REPO, "example_workflows")

# type -> (socket inputs [(name, type)], outputs [(name, type)])
SPECS = {
    "Note": ([], []),
    "CheckpointLoaderSimple": ([], [("MODEL", "MODEL"), ("CLIP", "CLIP"), ("VAE", "VAE")]),
    "CLIPVisionLoader": ([], [("CLIP_VISION", "CLIP_VISION")]),
    "LoadImage": ([], [("IMAGE", "IMAGE"), ("MASK", "MASK")]),
    "CLIPTextEncode": ([("clip", "CLIP")], [("CONDITIONING", "CONDITIONING")]),
    "EmptyLatentImage": ([], [("LATENT", "LATENT")]),
    "KSampler": (
        [("model", "MODEL"), ("positive", "CONDITIONING"), ("negative", "CONDITIONING"), ("latent_image", "LATENT")],
        [("LATENT", "LATENT")],
    ),
    "VAEDecode": ([("samples", "LATENT"), ("vae", "VAE")], [("IMAGE", "IMAGE")]),
    "VAEEncode": ([("pixels", "IMAGE"), ("vae", "VAE")], [("LATENT", "LATENT")]),
    "SaveImage": ([("images", "IMAGE")], []),
    "SolidMask": ([], [("MASK", "MASK")]),
    "MaskComposite": ([("destination", "MASK"), ("source", "MASK")], [("MASK", "MASK")]),
    "ImageScaleBy": ([("image", "IMAGE")], [("IMAGE", "IMAGE")]),
    "SetLatentNoiseMask": ([("samples", "LATENT"), ("mask", "MASK")], [("LATENT", "LATENT")]),
    "NestedAttentionLoader": ([], [("adapter", "NESTED_ADAPTER")]),
    "NestedSubjectEncoder": (
        [("adapter", "NESTED_ADAPTER"), ("clip_vision", "CLIP_VISION"), ("image", "IMAGE"), ("mask", "MASK")],
        [("subjects", "NESTED_SUBJECTS")],
    ),
    "NestedMultiSubjectCombine": (
        [
            ("subjects_1", "NESTED_SUBJECTS"),
            ("subjects_2", "NESTED_SUBJECTS"),
            ("subjects_3", "NESTED_SUBJECTS"),
            ("subjects_4", "NESTED_SUBJECTS"),
            ("mask_1", "MASK"),
            ("mask_2", "MASK"),
            ("mask_3", "MASK"),
            ("mask_4", "MASK"),
        ],
        [("subjects", "NESTED_SUBJECTS")],
    ),
    "NestedAttentionApply": (
        [("model", "MODEL"), ("clip", "CLIP"), ("subjects", "NESTED_SUBJECTS")],
        [("model", "MODEL"), ("positive", "CONDITIONING"), ("capture", "NESTED_CAPTURE")],
    ),
    "NestedAttentionMapPreview": ([("capture", "NESTED_CAPTURE"), ("image", "IMAGE")], [("maps", "IMAGE")]),
    "UNETLoader": ([], [("MODEL", "MODEL")]),
    "DualCLIPLoader": ([], [("CLIP", "CLIP")]),
    "VAELoader": ([], [("VAE", "VAE")]),
    "FluxGuidance": ([("conditioning", "CONDITIONING")], [("CONDITIONING", "CONDITIONING")]),
    "EmptySD3LatentImage": ([], [("LATENT", "LATENT")]),
}
TALL = {"LoadImage": 330, "Note": 340, "NestedAttentionMapPreview": 300, "SaveImage": 290}
MULTILINE = {"CLIPTextEncode", "NestedAttentionApply"}

SDXL = "sd_xl_base_1.0.safetensors"
SD15 = "v1-5-pruned-emaonly.safetensors"
VIT_H = "CLIP-ViT-H-14-laion2B-s32B-b79K.safetensors"
NA_PERSON = "nested_attention_sdxl_person.safetensors"
NA_PET = "nested_attention_sdxl_pet.safetensors"
IP_PLUS = "ip-adapter-plus_sd15.safetensors"
FLUX = "flux1-dev.safetensors"
CLIP_L = "clip_l.safetensors"
T5XXL = "t5xxl_fp16.safetensors"
FLUX_VAE = "ae.safetensors"
NA_FLUX = "nested_attention_flux_product.safetensors"
NEGATIVE = "blurry, low quality, deformed, watermark, text"

KNOBS = (
    "Knobs: trigger_word = an ordinary word of the prompt that stands for the subject (it must "
    "appear in the Patch's text); strength = 1.0 is the paper's formula (lower keeps more of the "
    "plain word, above 1 exaggerates the subject); start_at / end_at = the fraction of sampling "
    "during which the subject is applied."
)


class Graph:
    def __init__(self):
        self.nodes, self.links = [], []

    def node(self, type_, widgets=(), inputs=None, title=None):
        n = {
            "id": len(self.nodes) + 1,
            "type": type_,
            "widgets": list(widgets),
            "inputs": dict(inputs or {}),
            "title": title,
        }
        self.nodes.append(n)
        return n

    def build(self):
        # depth = longest path from a source; order = topological
        depth = {}

        def d(n):
            if n["id"] not in depth:
                depth[n["id"]] = 1 + max((d(src) for src, _ in n["inputs"].values()), default=-1)
            return depth[n["id"]]

        for n in self.nodes:
            d(n)
        # layout column: sources sit just left of their first consumer, the Note in the shortest column
        col_of = dict(depth)
        for n in self.nodes:
            consumers = [depth[m["id"]] for m in self.nodes for src, _ in m["inputs"].values() if src is n]
            if not n["inputs"] and consumers:
                col_of[n["id"]] = min(consumers) - 1
        order = sorted(self.nodes, key=lambda n: (depth[n["id"]], n["id"]))
        out_links = {n["id"]: {} for n in self.nodes}
        links = []
        for n in order:
            names = [name for name, _ in SPECS[n["type"]][0]]
            for name, (src, slot) in sorted(n["inputs"].items(), key=lambda kv: names.index(kv[0])):
                link_id = len(links) + 1
                typ = SPECS[src["type"]][1][slot][1]
                want = dict(SPECS[n["type"]][0])[name]
                assert typ == want, (n["type"], name, typ, want)
                links.append([link_id, src["id"], slot, n["id"], names.index(name), typ])
                out_links[src["id"]].setdefault(slot, []).append(link_id)
        # layout: one column per depth, stacked
        col_y, nodes = {}, []
        notes = [n for n in order if n["type"] == "Note"]
        for rank, n in sorted(enumerate(order), key=lambda rn: rn[1]["type"] == "Note"):
            ins, outs = SPECS[n["type"]]
            n_widgets = len(n["widgets"])
            h = TALL.get(n["type"]) or (
                30 + 22 * max(len(ins), len(outs), 1) + 26 * n_widgets + (90 if n["type"] in MULTILINE else 0)
            )
            w = 330 if n["type"] == "Note" else 320
            col = col_of[n["id"]]
            if n in notes:
                col = min(range(max(col_y) + 1), key=lambda c: (col_y.get(c, 0), -c))
            y = col_y.get(col, 0)
            col_y[col] = y + h + 40
            node = {
                "id": n["id"],
                "type": n["type"],
                "pos": [40 + col * 370, 40 + y],
                "size": [w, h],
                "flags": {},
                "order": rank,
                "mode": 0,
                "inputs": [],
                "outputs": [],
                "properties": {"Node name for S&R": n["type"]},
                "widgets_values": n["widgets"],
            }
            if n["title"]:
                node["title"] = n["title"]
            link_of = {links[i][4]: links[i][0] for i in range(len(links)) if links[i][3] == n["id"]}
            node["inputs"] = [{"name": name, "type": typ, "link": link_of.get(i)} for i, (name, typ) in enumerate(ins)]
            node["outputs"] = [
                {"name": name, "type": typ, "links": out_links[n["id"]].get(i, []), "slot_index": i}
                for i, (name, typ) in enumerate(outs)
            ]
            if n["type"] == "Note":
                del node["properties"]["Node name for S&R"]
                node["color"], node["bgcolor"] = "#432", "#653"
            nodes.append(node)
        nodes.sort(key=lambda x: x["id"])
        width = max(x["pos"][0] + x["size"][0] for x in nodes) + 40
        height = max(x["pos"][1] + x["size"][1] for x in nodes) + 40
        scale = round(min(1.0, 1460 / width, 800 / height), 2)
        return {
            "last_node_id": len(nodes),
            "last_link_id": len(links),
            "nodes": nodes,
            "links": links,
            "groups": [],
            "config": {},
            "extra": {"ds": {"scale": scale, "offset": [10, 10]}},
            "version": 0.4,
        }


STEPS = 30  # real-image settings; tests.comfy_server.test_sized shrinks copies for CPU runs


def note(g, text):
    return g.node("Note", [text])


def single_subject(
    g,
    prompt,
    trigger="person",
    adapter=NA_PERSON,
    image="subject_person.png",
    seed=42,
    width=1024,
    height=1024,
    ckpt=SDXL,
    trigger_weight=1.0,
):
    """checkpoint + CLIP vision + photo + adapter + encoder + patch + negative + sampler + decode."""
    ck = g.node("CheckpointLoaderSimple", [ckpt])
    cv = g.node("CLIPVisionLoader", [VIT_H])
    img = g.node("LoadImage", [image, "image"])
    ad = g.node("NestedAttentionLoader", [adapter])
    enc = g.node(
        "NestedSubjectEncoder",
        [trigger, "center", "concat"],
        {"adapter": (ad, 0), "clip_vision": (cv, 0), "image": (img, 0)},
    )
    patch = g.node(
        "NestedAttentionApply",
        [prompt, 1.0, 0.0, 1.0, trigger_weight],
        {"model": (ck, 0), "clip": (ck, 1), "subjects": (enc, 0)},
    )
    neg = g.node("CLIPTextEncode", [NEGATIVE], {"clip": (ck, 1)})
    lat = g.node("EmptyLatentImage", [width, height, 1])
    ks = g.node(
        "KSampler",
        [seed, "fixed", STEPS, 6.0, "dpmpp_2m", "karras", 1.0],
        {"model": (patch, 0), "positive": (patch, 1), "negative": (neg, 0), "latent_image": (lat, 0)},
    )
    dec = g.node("VAEDecode", [], {"samples": (ks, 0), "vae": (ck, 2)})
    return {"ckpt": ck, "clip_vision": cv, "patch": patch, "neg": neg, "decode": dec}


SDXL_FILES = (
    "Models (random-weight placeholders are generated by tests / scripts/demo.sh):\n"
    "- models/checkpoints/%s (any SDXL checkpoint; rename the widget)\n"
    "- models/clip_vision/%s (CLIP ViT-H/14 image encoder)\n" % (SDXL, VIT_H)
)
REAL = (
    "Settings are for real images (1024x1024, %d steps). The test suite and the placeholder demo run a "
    "copy shrunk to 128x128 and 3 steps." % STEPS
)


def wf01():
    g = Graph()
    note(
        g,
        "01 Single subject (SDXL)\n\n"
        + SDXL_FILES
        + "- models/nested_attention/%s (a Nested Attention adapter for your SDXL checkpoint)\n"
        "Input image: input/subject_person.png (a photo of the person).\n\n" % NA_PERSON + KNOBS + "\n\n" + REAL,
    )
    b = single_subject(g, "a photo of a person as an astronaut on the moon, detailed, cinematic light")
    g.node("SaveImage", ["na_01_single"], {"images": (b["decode"], 0)})
    return g


def wf02():
    g = Graph()
    note(
        g,
        "02 Two subjects: a man and his dog (SDXL)\n\n"
        + SDXL_FILES
        + "- models/nested_attention/%s (a face/person adapter)\n"
        "- models/nested_attention/%s (a pet adapter)\n"
        "Input images: input/subject_person.png and input/subject_dog.png.\n\n"
        "Each subject gets its own trigger word (man, dog) and a region mask (left / right half, "
        "made with SolidMask + MaskComposite; masks of any size are resized to the image). Multi-Subject "
        "Combine puts both into one set; the prompt must name both trigger words.\n\n"
        % (NA_PERSON, NA_PET)
        + KNOBS
        + "\n\n"
        + REAL,
    )
    ck = g.node("CheckpointLoaderSimple", [SDXL])
    cv = g.node("CLIPVisionLoader", [VIT_H])
    man_img = g.node("LoadImage", ["subject_person.png", "image"])
    dog_img = g.node("LoadImage", ["subject_dog.png", "image"])
    man_ad = g.node("NestedAttentionLoader", [NA_PERSON])
    dog_ad = g.node("NestedAttentionLoader", [NA_PET])
    empty = g.node("SolidMask", [0.0, 1024, 1024])
    half = g.node("SolidMask", [1.0, 512, 1024])
    left = g.node("MaskComposite", [0, 0, "add"], {"destination": (empty, 0), "source": (half, 0)}, title="Left half")
    right = g.node(
        "MaskComposite", [512, 0, "add"], {"destination": (empty, 0), "source": (half, 0)}, title="Right half"
    )
    man = g.node(
        "NestedSubjectEncoder",
        ["man", "center", "concat"],
        {"adapter": (man_ad, 0), "clip_vision": (cv, 0), "image": (man_img, 0)},
    )
    dog = g.node(
        "NestedSubjectEncoder",
        ["dog", "center", "concat"],
        {"adapter": (dog_ad, 0), "clip_vision": (cv, 0), "image": (dog_img, 0)},
    )
    both = g.node(
        "NestedMultiSubjectCombine",
        [],
        {"subjects_1": (man, 0), "subjects_2": (dog, 0), "mask_1": (left, 0), "mask_2": (right, 0)},
    )
    patch = g.node(
        "NestedAttentionApply",
        ["a photo of a man and his dog sitting on a park bench, sunny day", 1.0, 0.0, 1.0, 1.0],
        {"model": (ck, 0), "clip": (ck, 1), "subjects": (both, 0)},
    )
    neg = g.node("CLIPTextEncode", [NEGATIVE], {"clip": (ck, 1)})
    lat = g.node("EmptyLatentImage", [1024, 1024, 1])
    ks = g.node(
        "KSampler",
        [7, "fixed", STEPS, 6.0, "dpmpp_2m", "karras", 1.0],
        {"model": (patch, 0), "positive": (patch, 1), "negative": (neg, 0), "latent_image": (lat, 0)},
    )
    dec = g.node("VAEDecode", [], {"samples": (ks, 0), "vae": (ck, 2)})
    g.node("SaveImage", ["na_02_two_subjects"], {"images": (dec, 0)})
    return g


def wf03():
    g = Graph()
    note(
        g,
        "03 IP-Adapter Plus bridge (SD1.5) - EXPERIMENTAL, training-free\n\n"
        "No Nested Attention training needed: the IP-Adapter Plus Resampler gives the subject tokens and each "
        "layer's to_k_ip / to_v_ip become the nested keys / values. Identity is weaker than with a trained "
        "adapter.\n\ntrigger_weight = 8 makes the bridge's faint subject louder; it also pulls the picture toward "
        "the reference photo (its pose and details too). Lower it toward 1 if the prompt loses ground. What has been "
        "measured, and how: the help page of the Nested Attention Patch."
        "\n\nModels:\n"
        "- models/checkpoints/%s (any SD1.5 checkpoint)\n"
        "- models/ipadapter/%s (IP-Adapter Plus or Plus-Face for SD1.5)\n"
        "- models/clip_vision/%s (CLIP ViT-H/14, the encoder IP-Adapter Plus SD1.5 uses)\n"
        "Input image: input/subject_person.png.\n\n"
        % (SD15, IP_PLUS, VIT_H)
        + KNOBS
        + "\n\nSettings are for real images (512x512, %d steps); the tests run a copy shrunk to 64x64, 3 steps."
        % STEPS,
    )
    b = single_subject(
        g,
        "a portrait photo of a person in a garden, soft light",
        adapter=IP_PLUS,
        ckpt=SD15,
        width=512,
        height=512,
        seed=3,
        trigger_weight=8.0,
    )
    g.node("SaveImage", ["na_03_ipadapter_bridge"], {"images": (b["decode"], 0)})
    return g


def wf04():
    g = Graph()
    note(
        g,
        "04 Chain: generate, upscale, inpaint with the subject (SDXL)\n\n"
        + SDXL_FILES
        + "- models/nested_attention/%s\nInput image: input/subject_person.png.\n\n"
        "Pass 1 generates the subject; ImageScaleBy upscales 2x (core, no upscale model); pass 2 re-samples "
        "only the masked face region (SetLatentNoiseMask, denoise 0.6) with the same patched model and "
        "prompt, so the subject is refined there. Both images are saved.\n\n"
        % NA_PERSON
        + KNOBS
        + "\n\n"
        + REAL
        + " The inpaint mask is in 1024x1024 units and is resized to the image.",
    )
    b = single_subject(g, "a photo of a person reading a book in a cafe", seed=11)
    g.node("SaveImage", ["na_04_chain_base"], {"images": (b["decode"], 0)})
    up = g.node("ImageScaleBy", ["bilinear", 2.0], {"image": (b["decode"], 0)})
    enc = g.node("VAEEncode", [], {"pixels": (up, 0), "vae": (b["ckpt"], 2)})
    empty = g.node("SolidMask", [0.0, 1024, 1024])
    square = g.node("SolidMask", [1.0, 512, 512])
    region = g.node(
        "MaskComposite", [256, 128, "add"], {"destination": (empty, 0), "source": (square, 0)}, title="Inpaint region"
    )
    masked = g.node("SetLatentNoiseMask", [], {"samples": (enc, 0), "mask": (region, 0)})
    ks = g.node(
        "KSampler",
        [12, "fixed", STEPS, 6.0, "dpmpp_2m", "karras", 0.6],
        {"model": (b["patch"], 0), "positive": (b["patch"], 1), "negative": (b["neg"], 0), "latent_image": (masked, 0)},
        title="KSampler (inpaint)",
    )
    dec = g.node("VAEDecode", [], {"samples": (ks, 0), "vae": (b["ckpt"], 2)})
    g.node("SaveImage", ["na_04_chain_inpaint"], {"images": (dec, 0)})
    return g


def wf05():
    g = Graph()
    note(
        g,
        "05 Attention map preview (SDXL)\n\n"
        + SDXL_FILES
        + "- models/nested_attention/%s\nInput image: input/subject_person.png.\n\n"
        "Attention Map Preview takes the Patch's capture output and the decoded image. Per subject it shows "
        "where the trigger word attends | which subject token each pixel draws from | the reference photo "
        "coloured by token. Maps are recorded only while a preview is connected.\n\n"
        % NA_PERSON
        + KNOBS
        + "\n\n"
        + REAL,
    )
    b = single_subject(g, "a photo of a person wearing a red scarf in the snow", seed=5)
    g.node("SaveImage", ["na_05_attention"], {"images": (b["decode"], 0)})
    g.node("NestedAttentionMapPreview", [], {"capture": (b["patch"], 2), "image": (b["decode"], 0)})
    return g


def wf06():
    g = Graph()
    note(
        g,
        "06 Single subject (Flux; ComfyUI from September 2025 or later)\n\n"
        "Models:\n"
        "- models/diffusion_models/%s (Flux.1 dev; schnell works too, with 4 steps)\n"
        "- models/text_encoders/%s and %s (Flux's two text encoders)\n"
        "- models/vae/%s (Flux's VAE)\n"
        "- models/clip_vision/%s (the image encoder the adapter was made with)\n"
        "- models/nested_attention/%s (a Nested Attention adapter for Flux: none is published yet, and "
        "python -m na_engine train --base <a FluxPipeline folder> trains one; see the README's Flux section)\n"
        "Input image: input/subject_product.png (a photo of the product).\n\n"
        "Flux takes cfg 1.0 and its guidance from FluxGuidance; the trigger is found in Flux's T5 tokens, so a "
        "word of several T5 pieces works. " % (FLUX, CLIP_L, T5XXL, FLUX_VAE, VIT_H, NA_FLUX) + KNOBS + "\n\n"
        "Settings are for real images (1024x1024, 20 steps). The test suite checks this graph against a current "
        "server's node schemas; it does not run it (Flux's T5-XXL is built at full size whatever the file holds).",
    )
    unet = g.node("UNETLoader", [FLUX, "default"])
    clip = g.node("DualCLIPLoader", [CLIP_L, T5XXL, "flux", "default"])
    vae = g.node("VAELoader", [FLUX_VAE])
    cv = g.node("CLIPVisionLoader", [VIT_H])
    img = g.node("LoadImage", ["subject_product.png", "image"])
    ad = g.node("NestedAttentionLoader", [NA_FLUX])
    enc = g.node(
        "NestedSubjectEncoder",
        ["bottle", "center", "concat"],
        {"adapter": (ad, 0), "clip_vision": (cv, 0), "image": (img, 0)},
    )
    patch = g.node(
        "NestedAttentionApply",
        ["a product photo of a bottle on a marble counter, morning light", 1.0, 0.0, 1.0, 1.0],
        {"model": (unet, 0), "clip": (clip, 0), "subjects": (enc, 0)},
    )
    guided = g.node("FluxGuidance", [3.5], {"conditioning": (patch, 1)})
    neg = g.node("CLIPTextEncode", [""], {"clip": (clip, 0)})
    lat = g.node("EmptySD3LatentImage", [1024, 1024, 1])
    ks = g.node(
        "KSampler",
        [7, "fixed", 20, 1.0, "euler", "simple", 1.0],
        {"model": (patch, 0), "positive": (guided, 0), "negative": (neg, 0), "latent_image": (lat, 0)},
    )
    dec = g.node("VAEDecode", [], {"samples": (ks, 0), "vae": (vae, 0)})
    g.node("SaveImage", ["na_06_flux"], {"images": (dec, 0)})
    return g


WORKFLOWS = {
    "01_single_subject_sdxl.json": wf01,
    "02_two_subjects_person_and_dog.json": wf02,
    "03_ip_adapter_plus_bridge_sd15.json": wf03,
    "04_chain_upscale_inpaint.json": wf04,
    "05_attention_map_preview.json": wf05,
    "06_flux_single_subject.json": wf06,
}


def main(argv):
    check = "--check" in argv
    os.makedirs(OUT, exist_ok=True)
    bad = []
    for name, make in WORKFLOWS.items():
        text = json.dumps(make().build(), indent=2) + "\n"
        path = os.path.join(OUT, name)
        if check:
            if not os.path.exists(path) or open(path).read() != text:
                bad.append(name)
        else:
            with open(path, "w") as f:
                f.write(text)
            print(path)
    if bad:
        print("out of date (run scripts/build_workflows.py): " + ", ".join(bad))
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
