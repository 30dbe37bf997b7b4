"""na_engine.layers: the canonical SD1.5/SDXL cross-attention tables, checked against real diffusers UNets."""

import warnings

import pytest
import torch
from torch import nn

from na_engine.errors import NestedAttentionError
from na_engine.hosts.comfy_layers import comfy_unet_layers, match_layers
from na_engine.layers import TABLES, Layer, base_for_layer_count, describe, is_joint

SD15_CONFIG = dict(
    sample_size=64,
    in_channels=4,
    out_channels=4,
    layers_per_block=2,
    block_out_channels=(320, 640, 1280, 1280),
    down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    cross_attention_dim=768,
    attention_head_dim=8,
)

SDXL_CONFIG = dict(
    sample_size=128,
    in_channels=4,
    out_channels=4,
    layers_per_block=2,
    block_out_channels=(320, 640, 1280),
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    transformer_layers_per_block=(1, 2, 10),
    cross_attention_dim=2048,
    attention_head_dim=(5, 10, 20),
    addition_embed_type="text_time",
    addition_time_embed_dim=256,
    projection_class_embeddings_input_dim=2816,
    use_linear_projection=True,
)


@pytest.fixture(scope="module", params=["sd15", "sdxl"])
def diffusers_unet(request):
    diffusers = pytest.importorskip("diffusers")
    config = SD15_CONFIG if request.param == "sd15" else SDXL_CONFIG
    with warnings.catch_warnings(), torch.device("meta"):
        warnings.simplefilter("ignore")
        unet = diffusers.UNet2DConditionModel(**config)
    return request.param, unet


def test_table_sizes():
    assert len(TABLES["sd15"]) == 16
    assert len(TABLES["sdxl"]) == 70
    for table in TABLES.values():
        assert [layer.index for layer in table] == list(range(len(table)))
        assert len({layer.comfy for layer in table}) == len(table)
        assert len({layer.diffusers for layer in table}) == len(table)


def _grouped(table):
    """{(block, id): depth} in table order."""
    out = {}
    for layer in table:
        block, block_id, index = layer.comfy
        out[(block, block_id)] = max(out.get((block, block_id), 0), index + 1)
    return out


def test_sd15_comfy_keys_and_widths():
    table = TABLES["sd15"]
    groups = _grouped(table)
    expected = {("input", i): 1 for i in (1, 2, 4, 5, 7, 8)}
    expected[("middle", 0)] = 1
    expected.update({("output", i): 1 for i in range(3, 12)})
    assert groups == expected
    width = {layer.comfy: layer.width for layer in table}
    assert [width[("input", i, 0)] for i in (1, 2, 4, 5, 7, 8)] == [320, 320, 640, 640, 1280, 1280]
    assert width[("middle", 0, 0)] == 1280
    assert [width[("output", i, 0)] for i in range(3, 12)] == [1280] * 3 + [640] * 3 + [320] * 3
    assert sorted({layer.width for layer in table}) == [320, 640, 1280]


def test_sdxl_comfy_keys_and_widths():
    table = TABLES["sdxl"]
    expected = {("input", 4): 2, ("input", 5): 2, ("input", 7): 10, ("input", 8): 10, ("middle", 0): 10}
    expected.update({("output", i): 10 for i in (0, 1, 2)})
    expected.update({("output", i): 2 for i in (3, 4, 5)})
    assert _grouped(table) == expected
    for layer in table:
        block, block_id, _ = layer.comfy
        small = (block == "input" and block_id in (4, 5)) or (block == "output" and block_id in (3, 4, 5))
        assert layer.width == (640 if small else 1280), layer
    assert sum(layer.width == 640 for layer in table) == 10


def test_ip_adapter_numbering_order():
    """Index order = diffusers attn_processors order: down blocks, up blocks, mid block (the UNet tables; Flux's
    double then single blocks are checked by installing them on a diffusers Flux, tests/training)."""
    for table in (t for t in TABLES.values() if not is_joint(t)):
        kinds = [layer.diffusers.split(".")[0] for layer in table]
        first_up, first_mid = kinds.index("up_blocks"), kinds.index("mid_block")
        assert set(kinds[:first_up]) == {"down_blocks"}
        assert set(kinds[first_up:first_mid]) == {"up_blocks"}
        assert set(kinds[first_mid:]) == {"mid_block"}


def test_tables_match_real_diffusers_unet(diffusers_unet):
    base, unet = diffusers_unet
    names = [name[: -len(".processor")] for name in unet.attn_processors if name.endswith("attn2.processor")]
    table = TABLES[base]
    assert names == [layer.diffusers for layer in table]
    modules = dict(unet.named_modules())
    for layer in table:
        attn2 = modules[layer.diffusers]
        assert attn2.to_q.out_features == layer.width, layer
        assert attn2.to_k.in_features == (768 if base == "sd15" else 2048)


def test_layer_json_round_trip():
    for layer in TABLES["sdxl"][:5] + TABLES["sd15"][-2:]:
        again = Layer.from_json(layer.index, layer.to_json())
        assert again == layer
    assert Layer.from_json(3, ["x.attn2", ["input", "1", "0"], "64"]) == Layer(3, "x.attn2", ("input", 1, 0), 64)


def test_base_for_layer_count_and_describe():
    assert base_for_layer_count(16) == "sd15"
    assert base_for_layer_count(70) == "sdxl"
    with pytest.raises(NestedAttentionError, match="SD1.5: 16.*SDXL: 70"):
        base_for_layer_count(12)
    assert describe(TABLES["sd15"]) == "SD1.5 (16 layers, widths 320/640/1280)"
    assert describe(TABLES["sdxl"]) == "SDXL (70 layers, widths 640/1280)"
    assert describe(TABLES["sd15"][:3]) == "an unknown model with 3 layers of widths 320/640"
    # ComfyUI lists a model's layers in its own order (input, middle, output); the family is still named
    comfy_order = sorted(TABLES["sdxl"], key=lambda layer: ("input", "middle", "output").index(layer.comfy[0]))
    assert comfy_order != TABLES["sdxl"] and describe(comfy_order) == "SDXL (70 layers, widths 640/1280)"


def _model_layers(base):
    return [(layer.comfy, layer.width) for layer in TABLES[base]]


def test_match_layers():
    match_layers(TABLES["sd15"], _model_layers("sd15"))
    match_layers(TABLES["sdxl"], list(reversed(_model_layers("sdxl"))))  # order does not matter
    with pytest.raises(NestedAttentionError) as err:
        match_layers(TABLES["sd15"], _model_layers("sdxl"), adapter_name="ip-adapter-plus_sd15.safetensors")
    msg = str(err.value)
    assert "ip-adapter-plus_sd15.safetensors" in msg
    assert "SD1.5 (16 layers" in msg and "SDXL (70 layers" in msg
    with pytest.raises(NestedAttentionError, match="SDXL.*SD1.5"):
        match_layers(TABLES["sdxl"], _model_layers("sd15"))


def test_match_layers_width_mismatch():
    """Same keys, one width off (e.g. a custom UNet): still refused, and never 'size mismatch'."""
    model = _model_layers("sd15")
    model[0] = (model[0][0], 999)
    with pytest.raises(NestedAttentionError) as err:
        match_layers(TABLES["sd15"], model)
    assert "999" in str(err.value) and "size mismatch" not in str(err.value)


# -- comfy_unet_layers on a module tree shaped like ComfyUI's openaimodel.UNetModel --------------


class _Attn(nn.Module):
    def __init__(self, width, ctx):
        super().__init__()
        self.to_q = nn.Linear(width, width, bias=False, device="meta")
        self.to_k = nn.Linear(ctx, width, bias=False, device="meta")


class _Block(nn.Module):
    def __init__(self, width, ctx):
        super().__init__()
        self.attn1 = _Attn(width, width)
        self.attn2 = _Attn(width, ctx)


class _SpatialTransformer(nn.Module):
    def __init__(self, width, depth, ctx):
        super().__init__()
        self.transformer_blocks = nn.ModuleList(_Block(width, ctx) for _ in range(depth))


def _seq(width=None, depth=0, ctx=768):
    mods = [nn.Identity()]  # the ResBlock / conv
    if depth:
        mods.append(_SpatialTransformer(width, depth, ctx))
    return nn.Sequential(*mods)


class _ComfyUNet(nn.Module):
    def __init__(self, inputs, middle, outputs, ctx):
        super().__init__()
        self.input_blocks = nn.ModuleList(_seq(w, dep, ctx) for w, dep in inputs)
        self.middle_block = nn.Sequential(nn.Identity(), _SpatialTransformer(middle[0], middle[1], ctx), nn.Identity())
        self.output_blocks = nn.ModuleList(_seq(w, dep, ctx) for w, dep in outputs)


def comfy_like_sd15():
    inputs = [
        (None, 0),
        (320, 1),
        (320, 1),
        (None, 0),
        (640, 1),
        (640, 1),
        (None, 0),
        (1280, 1),
        (1280, 1),
        (None, 0),
        (None, 0),
        (None, 0),
    ]
    outputs = [(None, 0)] * 3 + [(1280, 1)] * 3 + [(640, 1)] * 3 + [(320, 1)] * 3
    return _ComfyUNet(inputs, (1280, 1), outputs, 768)


def comfy_like_sdxl():
    inputs = [(None, 0), (None, 0), (None, 0), (None, 0), (640, 2), (640, 2), (None, 0), (1280, 10), (1280, 10)]
    outputs = [(1280, 10)] * 3 + [(640, 2)] * 3 + [(None, 0)] * 3
    return _ComfyUNet(inputs, (1280, 10), outputs, 2048)


@pytest.mark.parametrize("base,build", [("sd15", comfy_like_sd15), ("sdxl", comfy_like_sdxl)])
def test_comfy_unet_layers_walks_like_comfy(base, build):
    found = comfy_unet_layers(build())
    assert len(found) == len(TABLES[base])
    assert dict(found) == {layer.comfy: layer.width for layer in TABLES[base]}
    match_layers(TABLES[base], found)
    other = "sdxl" if base == "sd15" else "sd15"
    with pytest.raises(NestedAttentionError):
        match_layers(TABLES[other], found)


# -- diffusers_layers: a table from any UNet2DConditionModel config ---------------------------------


def test_diffusers_layers_reproduce_tables(diffusers_unet):
    from na_engine.layers import base_name, diffusers_layers

    base, unet = diffusers_unet
    config = SD15_CONFIG if base == "sd15" else SDXL_CONFIG
    assert diffusers_layers(config) == TABLES[base]
    assert diffusers_layers(dict(unet.config)) == TABLES[base]
    assert base_name(diffusers_layers(config)) == base


CUSTOM_CONFIG = dict(
    sample_size=16,
    in_channels=4,
    out_channels=4,
    layers_per_block=1,
    block_out_channels=(32, 64, 64),
    down_block_types=("CrossAttnDownBlock2D", "DownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "UpBlock2D", "CrossAttnUpBlock2D"),
    transformer_layers_per_block=(2, 1, 3),
    cross_attention_dim=48,
    attention_head_dim=8,
    norm_num_groups=8,
)


def test_diffusers_layers_custom_config():
    from na_engine.layers import base_name, diffusers_layers

    diffusers = pytest.importorskip("diffusers")
    with warnings.catch_warnings(), torch.device("meta"):
        warnings.simplefilter("ignore")
        unet = diffusers.UNet2DConditionModel(**CUSTOM_CONFIG)
    table = diffusers_layers(CUSTOM_CONFIG)
    names = [name[: -len(".processor")] for name in unet.attn_processors if name.endswith("attn2.processor")]
    assert [layer.diffusers for layer in table] == names
    modules = dict(unet.named_modules())
    assert [layer.width for layer in table] == [modules[n].to_q.out_features for n in names]
    assert base_name(table) == "custom"
    # ComfyUI numbering: input 0 = conv_in, one id per res block and per downsampler; output ids per level
    keys = [layer.comfy for layer in table]
    assert keys[:2] == [("input", 1, 0), ("input", 1, 1)]
    assert ("input", 5, 2) in keys and ("middle", 0, 2) in keys
    assert [k for k in keys if k[0] == "output"][:3] == [("output", 0, 0), ("output", 0, 1), ("output", 0, 2)]
