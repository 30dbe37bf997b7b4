"""The generated model files load through ComfyUI's STOCK loader functions (in-process)."""

import os

import pytest
from conftest import require_comfy

torch = pytest.importorskip("torch")


def _models_dir():
    return os.environ.get("NA_MODELS_DIR") or os.path.join(
        os.environ.get("NA_CACHE") or os.path.expanduser("~/.cache/nested-attention"), "models"
    )


def _attn2_keys(diffusion_model):
    """(block, number, index) of every attn2, from module names like input_blocks.1.1.transformer_blocks.0.attn2"""
    keys = set()
    for name, _ in diffusion_model.named_modules():
        if name.endswith(".attn2"):
            p = name.split(".")
            block = {"input_blocks": "input", "middle_block": "middle", "output_blocks": "output"}[p[0]]
            number = 0 if block == "middle" else int(p[1])
            keys.add((block, number, int(p[p.index("transformer_blocks") + 1])))
    return keys


def _load_ckpt(path):
    import comfy.sd
    import folder_paths

    with torch.inference_mode():  # as the server runs nodes; 2024's CLIP init needs grad off
        out = comfy.sd.load_checkpoint_guess_config(
            path, output_vae=True, output_clip=True, embedding_directory=folder_paths.get_folder_paths("embeddings")
        )
    return out[0], out[1], out[2]


@pytest.mark.parametrize("kind", ["sd15", "sdxl"])
def test_checkpoint_file_is_detected(kind):
    require_comfy()
    import comfy.model_base
    import fixtures_models as fm

    path = fm.populate(_models_dir(), (kind,))[kind]
    model, clip, vae = _load_ckpt(path)
    assert model is not None and clip is not None and vae is not None
    if kind == "sd15":
        assert type(model.model) is comfy.model_base.BaseModel
        assert _attn2_keys(model.model.diffusion_model) == set(fm.SD15_FILE_ATTN2_KEYS)
        tokens = clip.tokenize("a photo of a cat")
        assert set(tokens) == {"l"}
    else:
        assert isinstance(model.model, comfy.model_base.SDXL)
        assert type(model.model.model_config).__name__ == "KOALA_700M"
        assert _attn2_keys(model.model.diffusion_model) == set(fm.SDXL_FILE_ATTN2_KEYS)
        assert set(clip.tokenize("a photo of a cat")) == {"g", "l"}


def test_clip_vision_file_loads():
    require_comfy()
    import comfy.clip_vision
    import fixtures_models as fm

    path = fm.populate(_models_dir(), ("vitl",))["vitl"]
    with torch.inference_mode():
        cv = comfy.clip_vision.load(path)
        assert cv is not None
        out = cv.encode_image(torch.rand(1, 224, 224, 3))
    assert out["image_embeds"].shape == (1, 768)
    assert out["penultimate_hidden_states"].shape == (1, 257, 1024)
