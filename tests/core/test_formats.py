"""na_engine.formats: our adapter format, IP-Adapter Plus checkpoints at real shapes, errors, inspect CLI."""

import argparse
import json
import os
import shutil
import subprocess
import sys

import pytest
import torch
from engine_builders import SD15_PLUS, SDXL_PLUS_VITH, TINY_RESAMPLER, flatten_parts, ip_adapter_plus_parts, tiny_layers
from safetensors import safe_open
from safetensors.torch import save_file

from na_engine import __main__ as cli
from na_engine.adapter import random_adapter
from na_engine.errors import NestedAttentionError
from na_engine.formats import FORMAT_VERSION, META_KEY, inspect, load_adapter, save_adapter
from na_engine.hosts.comfy_layers import match_layers
from na_engine.layers import TABLES

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def load(path):
    """load_adapter without nn.Linear's kaiming init of weights that are overwritten right after
    (seconds for the 420M-parameter SDXL projections on 2 cores); every weight is compared below."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(torch.nn.Linear, "reset_parameters", lambda self: None)
        return load_adapter(path)


def fast_tmp(tmp_path):
    """/dev/shm when there is one: the SDXL file is 850 MB."""
    if os.path.isdir("/dev/shm") and os.access("/dev/shm", os.W_OK):
        import tempfile

        return tempfile.mkdtemp(dir="/dev/shm", prefix="na-test-")
    return str(tmp_path)


def assert_loaded_from(adapter, parts, base):
    """Every weight of the adapter equals the file's; nested_kv is tokens @ W^T of the file's weights."""
    proj, ip = parts["image_proj"], parts["ip_adapter"]
    own = adapter.resampler.state_dict()
    assert set(own) == set(proj)
    for key, value in proj.items():
        assert torch.equal(own[key], value.to(own[key].dtype)), key
    table = TABLES[base]
    assert adapter.layers == table and adapter.base == base and adapter.family == "ip_adapter_plus"
    tokens = torch.randn(adapter.config.num_queries, adapter.config.output_dim)
    for layer in (table[0], table[len(table) // 2], table[-1]):
        n = 2 * layer.index + 1
        wk, wv = ip[f"{n}.to_k_ip.weight"].float(), ip[f"{n}.to_v_ip.weight"].float()
        assert wk.shape == (layer.width, adapter.config.output_dim)
        k, v = adapter.nested_kv(layer.index, tokens)
        assert k.shape == v.shape == (adapter.config.num_queries, layer.width)
        assert torch.allclose(k, tokens @ wk.t(), atol=1e-5, rtol=1e-5)
        assert torch.allclose(v, tokens @ wv.t(), atol=1e-5, rtol=1e-5)
    # every layer in its place: all of it for SD1.5, every 16th row for SDXL's 420M parameters
    step = 1 if len(table) < 20 else 16
    for i, layer in enumerate(table):
        n = 2 * layer.index + 1
        assert torch.equal(adapter.to_k[i].weight[::step], ip[f"{n}.to_k_ip.weight"][::step].float()), layer
        assert torch.equal(adapter.to_v[i].weight[::step], ip[f"{n}.to_v_ip.weight"][::step].float()), layer


# -- our format -------------------------------------------------------------------------------


@pytest.mark.parametrize("base", ["custom", "sd15"])
def test_our_format_round_trip(tmp_path, base):
    layers = tiny_layers() if base == "custom" else TABLES["sd15"]
    adapter = random_adapter(TINY_RESAMPLER, layers, seed=3, base=base)
    path = str(tmp_path / "adapter.safetensors")
    save_adapter(adapter, path)
    loaded = load_adapter(path)
    assert loaded.config == adapter.config
    assert loaded.layers == adapter.layers
    assert loaded.base == base and loaded.family == "nested_attention"
    a, b = adapter.state_dict(), loaded.state_dict()
    assert set(a) == set(b)
    for key in a:
        assert torch.equal(a[key], b[key]), key
    assert loaded.fingerprint() == adapter.fingerprint()
    assert not loaded.training
    with safe_open(path, framework="pt") as f:
        meta = json.loads(f.metadata()[META_KEY])
        keys = set(f.keys())
    assert meta["format_version"] == FORMAT_VERSION
    assert meta["family"] == "nested_attention" and meta["base"] == base
    assert meta["encoder"]["width"] == TINY_RESAMPLER.embedding_dim and meta["encoder"]["hidden_state"] == "penultimate"
    assert meta["tokens"] == TINY_RESAMPLER.num_queries
    assert meta["resampler"] == TINY_RESAMPLER.to_json()
    assert meta["layers"] == [layer.to_json() for layer in layers]
    assert {f"layers.{i}.to_k.weight" for i in range(len(layers))} <= keys
    assert "resampler.latents" in keys


def saved_then_edited(tmp_path, edit):
    """Save a tiny adapter in our format, then rewrite the file after ``edit(tensors, meta)``
    changes its tensors and metadata JSON in place."""
    path = str(tmp_path / "a.safetensors")
    save_adapter(random_adapter(TINY_RESAMPLER, tiny_layers()), path)
    with safe_open(path, framework="pt") as f:
        meta = json.loads(f.metadata()[META_KEY])
        sd = {k: f.get_tensor(k) for k in f.keys()}
    edit(sd, meta)
    save_file(sd, path, metadata={META_KEY: json.dumps(meta)})
    return path


def test_our_format_version_mismatch(tmp_path):
    path = saved_then_edited(tmp_path, lambda sd, meta: meta.update(format_version=99))
    with pytest.raises(NestedAttentionError, match="version 99"):
        load_adapter(path)


def test_our_format_missing_layer_is_clear_error(tmp_path):
    """A truncated file (one nested projection missing) must give our error, not a KeyError."""
    path = saved_then_edited(tmp_path, lambda sd, meta: sd.pop("layers.2.to_v.weight"))
    with pytest.raises(NestedAttentionError, match="layers.2.to_v.weight|layer 2"):
        load_adapter(path)


def test_our_format_wrong_width_names_layer(tmp_path):
    path = saved_then_edited(
        tmp_path, lambda sd, meta: sd.update({"layers.1.to_k.weight": torch.zeros(48, TINY_RESAMPLER.output_dim)})
    )
    with pytest.raises(NestedAttentionError) as err:
        load_adapter(path)
    assert "layer 1" in str(err.value) and "custom.1.attn2" in str(err.value)
    assert "size mismatch" not in str(err.value)


# -- IP-Adapter Plus at real shapes ------------------------------------------------------------


@pytest.fixture(scope="module")
def sd15_parts():
    return ip_adapter_plus_parts("sd15", SD15_PLUS)


@pytest.fixture(scope="module")
def sd15_file(tmp_path_factory, sd15_parts):
    path = str(tmp_path_factory.mktemp("ip") / "ip-adapter-plus_sd15.safetensors")
    save_file(flatten_parts(sd15_parts), path)
    return path


@pytest.fixture(scope="module")
def sd15_adapter(sd15_file):
    return load(sd15_file)


def test_sd15_plus_key_layout(sd15_parts):
    ip = sd15_parts["ip_adapter"]
    assert sorted({int(k.split(".")[0]) for k in ip}) == list(range(1, 32, 2))
    assert ip["1.to_k_ip.weight"].shape == (320, 768)
    assert ip["31.to_v_ip.weight"].shape == (1280, 768)  # the mid block, last in diffusers order


def test_sd15_plus_safetensors(sd15_adapter, sd15_parts):
    adapter = sd15_adapter
    assert adapter.config == SD15_PLUS
    assert_loaded_from(adapter, sd15_parts, "sd15")
    assert "SD1.5 (16 layers" in adapter.describe() and "CLIP ViT-H/14" in adapter.describe()
    features = torch.randn(2, 257, 1280)
    tokens, weights = adapter.encode(features)
    assert tokens.shape == (32, 768) and weights.shape == (32, 257)
    # attention over the image features only (the latents take the rest of each softmax)
    assert (weights >= 0).all() and (weights.sum(-1) <= 1 + 1e-5).all() and (weights.sum(-1) > 0.5).all()
    avg, avg_w = adapter.encode(features, combine="average")
    assert avg.shape == (16, 768) and avg_w.shape == (16, 257)
    assert torch.allclose(avg, tokens.view(2, 16, 768).mean(0), atol=1e-5)
    with pytest.raises(NestedAttentionError, match="combine"):
        adapter.encode(features, combine="max")


def test_sd15_plus_nested_bin(tmp_path, sd15_parts):
    path = str(tmp_path / "ip-adapter-plus_sd15.bin")
    torch.save(sd15_parts, path)
    adapter = load(path)
    assert adapter.config == SD15_PLUS
    assert_loaded_from(adapter, sd15_parts, "sd15")


class _FromFile:
    """The file's tensors under a prefix, read one at a time (keeps the SDXL test's memory down)."""

    def __init__(self, handle, prefix):
        self.handle, self.prefix = handle, prefix

    def __getitem__(self, key):
        return self.handle.get_tensor(self.prefix + key)


def test_sdxl_plus_vit_h(tmp_path):
    parts = ip_adapter_plus_parts("sdxl", SDXL_PLUS_VITH)
    assert sorted({int(k.split(".")[0]) for k in parts["ip_adapter"]}) == list(range(1, 140, 2))
    folder = fast_tmp(tmp_path)
    path = os.path.join(folder, "ip-adapter-plus_sdxl_vit-h.safetensors")
    try:
        save_file(flatten_parts(parts), path)
        del parts["ip_adapter"]  # 850 MB: compared against the file itself below
        adapter = load(path)
        assert adapter.config == SDXL_PLUS_VITH
        with safe_open(path, framework="pt") as f:
            assert_loaded_from(adapter, {**parts, "ip_adapter": _FromFile(f, "ip_adapter.")}, "sdxl")
    finally:
        if folder != str(tmp_path):
            shutil.rmtree(folder, ignore_errors=True)
    assert "SDXL (70 layers" in adapter.describe()
    # SD1.5 <-> SDXL: the layer tables refuse each other, naming both
    with pytest.raises(NestedAttentionError) as err:
        match_layers(
            adapter.layers,
            [(layer.comfy, layer.width) for layer in TABLES["sd15"]],
            "ip-adapter-plus_sdxl_vit-h.safetensors",
        )
    assert "SDXL (70 layers" in str(err.value) and "SD1.5 (16 layers" in str(err.value)


def test_sd15_adapter_against_sdxl_model(sd15_file, sd15_adapter):
    adapter = sd15_adapter
    with pytest.raises(NestedAttentionError) as err:
        match_layers(
            adapter.layers, [(layer.comfy, layer.width) for layer in TABLES["sdxl"]], os.path.basename(sd15_file)
        )
    msg = str(err.value)
    assert "ip-adapter-plus_sd15.safetensors" in msg and "SD1.5" in msg and "SDXL" in msg


def test_vit_l_features_into_vit_h_resampler(sd15_adapter):
    adapter = sd15_adapter
    vit_l = torch.randn(1, 257, 1024)
    for call in (lambda: adapter.check_features(vit_l), lambda: adapter.encode(vit_l)):
        with pytest.raises(NestedAttentionError) as err:
            call()
        msg = str(err.value)
        assert "ViT-H/14" in msg and "ViT-L/14" in msg and "1024" in msg and "1280" in msg
    with pytest.raises(NestedAttentionError, match="no hidden states|width"):
        adapter.check_features(torch.randn(1280))
    adapter.check_features(torch.randn(1, 257, 1280))


# -- files that are not (usable) adapters -----------------------------------------------------


def _small_plus(base="sd15"):
    """An IP-Adapter Plus state dict with the real layer count/widths but a tiny resampler."""
    cfg = TINY_RESAMPLER.__class__(
        dim=64, depth=1, dim_head=64, heads=1, num_queries=4, embedding_dim=1280, output_dim=32
    )
    return flatten_parts(ip_adapter_plus_parts(base, cfg, dtype=torch.float32))


def test_small_plus_loads(tmp_path):
    path = str(tmp_path / "small.safetensors")
    save_file(_small_plus(), path)
    adapter = load_adapter(path)
    assert adapter.base == "sd15" and adapter.config.heads == 1 and adapter.config.num_queries == 4


def test_plain_ip_adapter_is_refused(tmp_path):
    sd = {k: v for k, v in _small_plus().items() if k.startswith("ip_adapter.")}
    sd.update(
        {
            "image_proj.proj.weight": torch.zeros(4 * 32, 1024),
            "image_proj.proj.bias": torch.zeros(128),
            "image_proj.norm.weight": torch.ones(32),
            "image_proj.norm.bias": torch.zeros(32),
        }
    )
    path = str(tmp_path / "ip-adapter_sd15.safetensors")
    save_file(sd, path)
    with pytest.raises(NestedAttentionError) as err:
        load_adapter(path)
    assert (
        "plain (non-Plus)" in str(err.value)
        and "ip-adapter_sd15.safetensors" in str(err.value)
        and "Plus" in str(err.value)
    )
    assert "could not be loaded" in inspect(path)


def test_faceid_is_refused(tmp_path):
    sd = {k: v for k, v in _small_plus().items() if k.startswith("ip_adapter.")}
    sd.update({"image_proj.proj.0.weight": torch.zeros(8, 4), "ip_adapter.1.to_q_lora.down.weight": torch.zeros(2, 2)})
    path = str(tmp_path / "faceid.bin")
    torch.save(sd, path)
    with pytest.raises(NestedAttentionError, match="FaceID"):
        load_adapter(path)


def test_unknown_layout(tmp_path):
    path = str(tmp_path / "lora.safetensors")
    save_file({"lora_unet_down.alpha": torch.ones(1), "lora_unet_down.weight": torch.zeros(4, 4)}, path)
    with pytest.raises(NestedAttentionError) as err:
        load_adapter(path)
    msg = str(err.value)
    assert "lora.safetensors" in msg and "lora_unet_down.alpha" in msg and "inspect" in msg


@pytest.mark.parametrize("suffix", [".safetensors", ".bin", ".pt"])
def test_corrupt_file(tmp_path, suffix):
    path = str(tmp_path / f"broken{suffix}")
    with open(path, "wb") as f:
        f.write(os.urandom(64) + b"not a checkpoint")
    with pytest.raises(NestedAttentionError, match=f"broken{suffix}"):
        load_adapter(path)
    with pytest.raises(NestedAttentionError):
        inspect(path)


def test_truncated_safetensors(tmp_path, sd15_file):
    path = str(tmp_path / "cut.safetensors")
    with open(sd15_file, "rb") as src, open(path, "wb") as dst:
        dst.write(src.read(4096))
    with pytest.raises(NestedAttentionError, match="cut.safetensors"):
        load_adapter(path)


def test_pickle_with_code_is_refused(tmp_path):
    """weights_only: a pickle that would run code is refused with our error."""
    path = str(tmp_path / "evil.bin")
    torch.save(
        {"image_proj": {"latents": torch.zeros(1)}, "hook": argparse.Namespace(x=1)}, path
    )  # a non-allowlisted global
    with pytest.raises(NestedAttentionError, match="evil.bin"):
        load_adapter(path)


def test_non_dict_bin(tmp_path):
    path = str(tmp_path / "tensor.bin")
    torch.save(torch.zeros(3), path)
    with pytest.raises(NestedAttentionError, match="Tensor, not a dictionary"):
        load_adapter(path)


def test_missing_file():
    with pytest.raises(NestedAttentionError, match="not found"):
        load_adapter("/nonexistent/adapter.safetensors")


def test_wrong_width_layer_names_the_layer(tmp_path):
    sd = _small_plus()
    sd["ip_adapter.5.to_k_ip.weight"] = torch.zeros(320, 32)  # layer 2 is a 640-wide layer
    path = str(tmp_path / "bad.safetensors")
    save_file(sd, path)
    with pytest.raises(NestedAttentionError) as err:
        load_adapter(path)
    msg = str(err.value)
    assert (
        "layer 2" in msg
        and "down_blocks.1.attentions.0" in msg
        and "to_k" in msg
        and "(320, 32)" in msg
        and "(640, 32)" in msg
    )
    assert "size mismatch" not in msg
    assert "layer 2" in inspect(path)


def test_missing_to_v_is_clear_error(tmp_path):
    sd = _small_plus()
    del sd["ip_adapter.5.to_v_ip.weight"]
    path = str(tmp_path / "half.safetensors")
    save_file(sd, path)
    with pytest.raises(NestedAttentionError, match="ip_adapter.5.to_v_ip|layer 2"):
        load_adapter(path)


def test_wrong_layer_count(tmp_path):
    sd = {k: v for k, v in _small_plus().items() if not k.startswith("ip_adapter.31.")}
    path = str(tmp_path / "fifteen.safetensors")
    save_file(sd, path)
    with pytest.raises(NestedAttentionError, match="15 cross-attention layers"):
        load_adapter(path)


def test_resampler_shape_inconsistent(tmp_path):
    sd = _small_plus()
    sd["image_proj.proj_out.weight"] = torch.zeros(48, 64)  # output width 48 but projections read 32
    path = str(tmp_path / "inconsistent.safetensors")
    save_file(sd, path)
    with pytest.raises(NestedAttentionError) as err:
        load_adapter(path)
    assert "size mismatch" not in str(err.value) and "inconsistent.safetensors" in str(err.value)


@pytest.mark.parametrize(
    "key", ["norm_out.weight", "proj_in.weight", "layers.0.0.to_q.weight", "layers.0.1.1.weight", "proj_out.weight"]
)
def test_resampler_missing_key(tmp_path, key):
    sd = _small_plus()
    del sd["image_proj." + key]
    path = str(tmp_path / "noproj.safetensors")
    save_file(sd, path)
    with pytest.raises(NestedAttentionError, match=key.replace(".", r"\.")):
        load_adapter(path)


# -- inspect ------------------------------------------------------------------------------------


def test_inspect_ip_adapter(sd15_file):
    text = inspect(sd15_file)
    assert "family: ip_adapter_plus" in text
    assert "base: sd15" in text
    assert "cross-attention layers: 16" in text
    assert "tokens per image: 16 of width 768" in text
    assert "CLIP ViT-H/14" in text
    assert "ip_adapter.*.to_k_ip.weight" in text and "(320, 768) (640, 768) (1280, 768)" in text
    assert "image_proj.latents (1, 16, 768)" in text


def test_inspect_unknown_lists_keys(tmp_path, capsys):
    path = str(tmp_path / "mystery.safetensors")
    save_file(
        {"encoder.blocks.0.w": torch.zeros(2, 3), "encoder.blocks.1.w": torch.zeros(2, 3), "head.bias": torch.zeros(5)},
        path,
    )
    assert cli.main(["inspect", path]) == 0
    out = capsys.readouterr().out
    assert "family: unknown" in out
    assert "encoder.blocks.*.w (2, 3)" in out and "head.bias (5,)" in out


def test_cli_missing_file_in_process(capsys):
    assert cli.main(["inspect", "/nonexistent/x.safetensors"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error:") and "not found" in err


def test_cli_subprocess(tmp_path):
    """`python -m na_engine inspect FILE` on our file, an unknown file and a missing one.

    One interpreter runs the three through runpy (what -m does), since each start imports torch."""
    adapter = random_adapter(TINY_RESAMPLER, tiny_layers())
    mine = str(tmp_path / "mine.safetensors")
    save_adapter(adapter, mine)
    mystery = str(tmp_path / "mystery.safetensors")
    save_file({"encoder.blocks.0.w": torch.zeros(2, 3), "encoder.blocks.1.w": torch.zeros(2, 3)}, mystery)
    missing = str(tmp_path / "missing.safetensors")
    script = (
        "import runpy, sys\n"
        "for path in sys.argv[1:]:\n"
        "    sys.argv = ['na_engine', 'inspect', path]\n"
        "    print('=== ' + path, flush=True)\n"
        "    try:\n"
        "        runpy.run_module('na_engine', run_name='__main__', alter_sys=True)\n"
        "    except SystemExit as e:\n"
        "        print('exit', e.code, flush=True)\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", script, mine, mystery, missing], cwd=REPO, capture_output=True, text=True, timeout=120
    )
    sections = dict(part.split("\n", 1) for part in result.stdout.split("=== ")[1:])
    ours, unknown, gone = sections[mine], sections[mystery], sections[missing]
    assert "family: nested_attention" in ours and "base: custom" in ours and "cross-attention layers: 4" in ours
    assert (
        "tokens per image: 4 of width 16" in ours
        and "layers.*.to_k.weight" in ours
        and "resampler.latents (1, 4, 32)" in ours
    )
    assert "exit 0" in ours
    assert "family: unknown" in unknown and "encoder.blocks.*.w (2, 3)" in unknown and "exit 0" in unknown
    assert "exit 2" in gone
    assert "error:" in result.stderr and "missing.safetensors" in result.stderr and "not found" in result.stderr
    assert "Traceback" not in result.stderr


@pytest.mark.parametrize("damage", ["no_layers", "bad_resampler", "bad_layer_item", "bad_json"])
def test_our_format_damaged_metadata(tmp_path, damage):
    adapter = random_adapter(TINY_RESAMPLER, tiny_layers())
    path = str(tmp_path / "a.safetensors")
    save_adapter(adapter, path)
    with safe_open(path, framework="pt") as f:
        meta = json.loads(f.metadata()[META_KEY])
        sd = {k: f.get_tensor(k) for k in f.keys()}
    if damage == "no_layers":
        del meta["layers"]
    elif damage == "bad_resampler":
        meta["resampler"]["colour"] = 3
    elif damage == "bad_layer_item":
        meta["layers"][0] = ["x.attn2", ["input", 1]]
    text = json.dumps(meta) if damage != "bad_json" else json.dumps(meta)[:-5]
    save_file(sd, path, metadata={META_KEY: text})
    with pytest.raises(NestedAttentionError, match="a.safetensors"):
        load_adapter(path)


REPLACED_FILE = """
import shutil, sys, torch
from na_engine.adapter import random_adapter
from na_engine.formats import load_adapter, save_adapter
from na_engine.layers import TABLES
from na_engine.resampler import ResamplerConfig
big, small = sys.argv[1], sys.argv[2]
cfg = ResamplerConfig(dim=32, depth=1, dim_head=8, heads=4, num_queries=4, embedding_dim=24, output_dim=16, ff_mult=2)
save_adapter(random_adapter(cfg, TABLES["sd15"], seed=1), big)
save_adapter(random_adapter(cfg, TABLES["sd15"][:1], seed=2), small)
loaded = load_adapter(big)
before = [w.clone() for w in loaded.to_v.parameters()]
shutil.copyfile(small, big)  # a re-download or re-export over the file, in place, smaller
after = list(loaded.to_v.parameters())
print(all(torch.equal(a, b) for a, b in zip(before, after)))
"""


def test_adapter_survives_its_file_being_replaced(tmp_path):
    """Nothing of a loaded adapter stays mapped to its file: overwriting the file in place (smaller) used to end
    the process with SIGBUS at the next use."""
    run = subprocess.run(
        [sys.executable, "-c", REPLACED_FILE, str(tmp_path / "a.safetensors"), str(tmp_path / "b.safetensors")],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))),
    )
    assert run.returncode == 0, f"exit {run.returncode}: {run.stderr[-1500:]}"
    assert run.stdout.strip() == "True"
