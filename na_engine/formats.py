"""Adapter files: our own format, IP-Adapter Plus checkpoints, detection and inspection.

Our format is one .safetensors file:
    resampler.<IP-Adapter image_proj names>     the Perceiver resampler
    layers.<i>.to_k.weight, layers.<i>.to_v.weight   nested projections of layer i, (width_i, D)
and a metadata entry "nested_attention" holding JSON:
    {"format_version": 1, "family": "nested_attention", "base": "sd15" | "sdxl" | "flux" | "custom",
     "encoder": {"name": ..., "width": E, "hidden_state": "penultimate"},
     "resampler": {ResamplerConfig}, "tokens": M, "layers": [[diffusers name, [block, id, index], width], ...]}
A DiT (Flux) adapter has the same keys, one layer per joint attention: the double-stream blocks, then the
single-stream ones, named ["transformer_blocks.<i>.attn", ["double_block", i, 0], H*d] and
["single_transformer_blocks.<i>.attn", ["single_block", i, 0], H*d]; its nested keys are raw, and the
host puts them through the block's text key norm (layers.dit_layers, joint.joint_keys).

Other layouts are read through a KeyMap: ``detect`` says whether a state dict is
its layout, ``convert`` turns it into an adapter.  Supporting a new release (for
example the official NestedAttentionEncoder checkpoint, whose key names we have
not seen) means writing one KeyMap and adding it to KEY_MAPS.
"""

from __future__ import annotations

import json
import os
import re
from collections import OrderedDict
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Tuple

import torch
from torch import Tensor

from .adapter import NestedAdapter, encoder_name, layer_list
from .errors import NestedAttentionError
from .layers import TABLES, Layer, base_for_layer_count, is_joint
from .resampler import ResamplerConfig

FORMAT_VERSION = 1
META_KEY = "nested_attention"
RESAMPLER_KEYS = (
    "latents",
    "proj_in.weight",
    "proj_out.weight",
    "norm_out.weight",
    "layers.0.0.to_q.weight",
    "layers.0.1.1.weight",
)


@dataclass(frozen=True)
class KeyMap:
    name: str
    detect: Callable[[Dict[str, Tensor], dict], bool]
    convert: Callable[[Dict[str, Tensor], dict, str], NestedAdapter]


# -- reading files -----------------------------------------------------------------------


def read_state_dict(path: str) -> Tuple[Dict[str, Tensor], dict]:
    """Flat state dict and our metadata (empty if none).  Only safetensors, or torch.load(weights_only=True).

    The tensors live in memory, never mapped to the file: a file replaced or deleted while a server runs
    must not change (or, through SIGBUS, crash) the adapter already loaded."""
    if not os.path.isfile(path):
        raise NestedAttentionError(f"Adapter file not found: {path}")
    try:
        if path.endswith(".safetensors"):
            from safetensors.torch import load

            with open(path, "rb") as f:
                data = f.read()
            header = json.loads(data[8 : 8 + int.from_bytes(data[:8], "little")])
            meta = header.get("__metadata__") or {}
            return load(data), json.loads(meta[META_KEY]) if META_KEY in meta else {}
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # corrupt or foreign files: say which file and why
        raise NestedAttentionError(
            f"Could not read {os.path.basename(path)} as an adapter: {type(e).__name__}: {e}"
        ) from e
    if not isinstance(obj, dict):
        raise NestedAttentionError(
            f"{os.path.basename(path)} holds a {type(obj).__name__}, not a dictionary of weights."
        )
    return _flatten(obj), {}


def _flatten(obj: dict, prefix: str = "") -> Dict[str, Tensor]:
    flat = {}
    for k, v in obj.items():
        if isinstance(v, dict):
            flat.update(_flatten(v, f"{prefix}{k}."))
        elif torch.is_tensor(v):
            flat[prefix + k] = v
    return flat


# -- our format ----------------------------------------------------------------------------


def _write(tensors: Dict[str, Tensor], path: str, metadata: Optional[dict]) -> None:
    """Atomically: a killed run leaves the old file or none, never half of one."""
    from safetensors.torch import save_file

    partial = path + ".partial"
    save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, partial, metadata=metadata)
    os.replace(partial, path)


def save_adapter(adapter: NestedAdapter, path: str) -> None:
    sd = {f"resampler.{k}": v for k, v in adapter.resampler.state_dict().items()}
    for i in range(len(adapter.layers)):
        sd[f"layers.{i}.to_k.weight"] = adapter.to_k[i].weight
        sd[f"layers.{i}.to_v.weight"] = adapter.to_v[i].weight
    c = adapter.config
    meta = {
        "format_version": FORMAT_VERSION,
        "family": "nested_attention",
        "base": adapter.base,
        "encoder": {"name": encoder_name(c.embedding_dim), "width": c.embedding_dim, "hidden_state": "penultimate"},
        "resampler": c.to_json(),
        "tokens": c.num_queries,
        "layers": layer_list(adapter.layers),
    }
    _write(sd, path, {META_KEY: json.dumps(meta)})


def save_ip_adapter(adapter: NestedAdapter, path: str) -> None:
    """IP-Adapter Plus layout: image_proj.<resampler>, ip_adapter.<2i+1>.to_k_ip/to_v_ip.weight for layer i.

    SD1.5 and SDXL files are exactly the released layout; any other base has no public layer table,
    so its table travels in the metadata (family ip_adapter_plus), where the loader finds it."""
    sd = {f"image_proj.{k}": v for k, v in adapter.resampler.state_dict().items()}
    for i in range(len(adapter.layers)):
        sd[f"ip_adapter.{2 * i + 1}.to_k_ip.weight"] = adapter.to_k[i].weight
        sd[f"ip_adapter.{2 * i + 1}.to_v_ip.weight"] = adapter.to_v[i].weight
    known = adapter.base in TABLES and list(adapter.layers) == TABLES[adapter.base]
    meta = {"family": "ip_adapter_plus", "base": adapter.base, "layers": layer_list(adapter.layers)}
    _write(sd, path, None if known else {META_KEY: json.dumps(meta)})


def _is_ours(sd: Dict[str, Tensor], meta: dict) -> bool:
    return meta.get("family") == "nested_attention"


def _convert_ours(sd: Dict[str, Tensor], meta: dict, name: str) -> NestedAdapter:
    version = meta.get("format_version")
    if version != FORMAT_VERSION:
        raise NestedAttentionError(
            f"{name} is Nested Attention format version {version}; this version of the extension reads version "
            f"{FORMAT_VERSION}. Update the extension."
        )
    try:
        layers = [Layer.from_json(i, item) for i, item in enumerate(meta["layers"])]
        config = ResamplerConfig(**meta["resampler"])
    except (KeyError, TypeError, ValueError) as e:
        raise NestedAttentionError(
            f"{name}: its Nested Attention metadata is incomplete or damaged ({type(e).__name__}: {e})."
        ) from e
    adapter = _empty_adapter(config, layers, "nested_attention", meta.get("base", "custom"))
    _load_into(
        adapter,
        _strip(sd, "resampler."),
        [_pair(sd, f"layers.{i}.to_k.weight", f"layers.{i}.to_v.weight", name) for i in range(len(layers))],
        name,
    )
    return adapter


# -- IP-Adapter Plus -------------------------------------------------------------------------

_IP_KEY = re.compile(r"^ip_adapter\.(\d+)\.to_([kv])_ip\.weight$")


def _is_ip_adapter(sd: Dict[str, Tensor], meta: dict) -> bool:
    return any(_IP_KEY.match(k) for k in sd)


def _convert_ip_adapter(sd: Dict[str, Tensor], meta: dict, name: str) -> NestedAdapter:
    proj = _strip(sd, "image_proj.")
    if "latents" not in proj:
        kind = "FaceID" if any("lora" in k for k in sd) else "plain (non-Plus)"
        raise NestedAttentionError(
            f"{name} is a {kind} IP-Adapter: its image projection is not a Resampler, so it has no subject tokens "
            "to nest. Use an IP-Adapter Plus or Plus-Face checkpoint (e.g. ip-adapter-plus_sd15, "
            "ip-adapter-plus-face_sd15, ip-adapter-plus_sdxl_vit-h), or a Nested Attention adapter."
        )
    _check_resampler_keys(proj, name)
    numbers = sorted({int(_IP_KEY.match(k).group(1)) for k in sd if _IP_KEY.match(k)})
    if "layers" in meta:  # a base without a public table (save_ip_adapter wrote it)
        base, table = meta.get("base", "custom"), [Layer.from_json(i, item) for i, item in enumerate(meta["layers"])]
    else:
        base = base_for_layer_count(len(numbers))
        table = TABLES[base]
    weights = [_pair(sd, f"ip_adapter.{n}.to_k_ip.weight", f"ip_adapter.{n}.to_v_ip.weight", name) for n in numbers]
    adapter = _empty_adapter(ResamplerConfig.from_state_dict(proj), table, "ip_adapter_plus", base)
    _load_into(adapter, proj, weights, name)
    return adapter


KEY_MAPS: List[KeyMap] = [
    KeyMap("nested_attention", _is_ours, _convert_ours),
    KeyMap("ip_adapter_plus", _is_ip_adapter, _convert_ip_adapter),
]


# -- loading ---------------------------------------------------------------------------------


def load_adapter(path: str) -> NestedAdapter:
    sd, meta = read_state_dict(path)
    name = os.path.basename(path)
    key_map = detect(sd, meta)
    if key_map is None:
        raise NestedAttentionError(
            f"{name} is neither a Nested Attention adapter nor an IP-Adapter Plus checkpoint "
            f"(first keys: {', '.join(list(sd)[:5]) or 'none'}). Run `python -m na_engine inspect {name}` for a "
            "summary."
        )
    return key_map.convert(sd, meta, name).eval()


def detect(sd: Dict[str, Tensor], meta: dict) -> Optional[KeyMap]:
    return next((m for m in KEY_MAPS if m.detect(sd, meta)), None)


def _pair(sd: Dict[str, Tensor], k_key: str, v_key: str, name: str) -> Tuple[Tensor, Tensor]:
    missing = [k for k in (k_key, v_key) if k not in sd]
    if missing:
        raise NestedAttentionError(f"{name} lacks {' and '.join(missing)}; the file is incomplete.")
    return sd[k_key], sd[v_key]


def _strip(sd: Dict[str, Tensor], prefix: str) -> Dict[str, Tensor]:
    return {k[len(prefix) :]: v for k, v in sd.items() if k.startswith(prefix)}


def _empty_adapter(config: ResamplerConfig, layers: List[Layer], family: str, base: str) -> NestedAdapter:
    """An adapter without storage (meta device): its weights come from the file, so no random init."""
    with torch.device("meta"):
        return NestedAdapter(config, layers, family, base)


def _load_into(
    adapter: NestedAdapter, resampler_sd: Dict[str, Tensor], kv: List[Tuple[Tensor, Tensor]], name: str
) -> None:
    """Give the adapter the file's weights (as fp32), turning any shape disagreement into a
    sentence that names both sides."""
    _check_resampler_keys(resampler_sd, name)
    weights = {}
    for key, value in adapter.resampler.state_dict().items():
        if key not in resampler_sd:
            raise NestedAttentionError(f"{name}: the resampler lacks {key}; the file is incomplete.")
        _check(name, f"resampler {key}", resampler_sd[key].shape, value.shape)
        weights[f"resampler.{key}"] = resampler_sd[key]
    if len(kv) != len(adapter.layers):
        raise NestedAttentionError(
            f"{name} has nested projections for {len(kv)} layers but its table lists {len(adapter.layers)}."
        )
    for i, ((wk, wv), layer) in enumerate(zip(kv, adapter.layers)):
        for weight, target, what in ((wk, adapter.to_k[i], "to_k"), (wv, adapter.to_v[i], "to_v")):
            _check(name, f"layer {i} ({layer.diffusers}) {what}", weight.shape, target.weight.shape)
            weights[f"{what}.{i}.weight"] = weight
    adapter.load_state_dict({k: v.float() for k, v in weights.items()}, strict=True, assign=True)


def _check_resampler_keys(resampler_sd: Dict[str, Tensor], name: str) -> None:
    missing = [k for k in RESAMPLER_KEYS if k not in resampler_sd]
    if missing:
        raise NestedAttentionError(
            f"{name}: the resampler lacks {', '.join(missing)}; the file is incomplete or not an adapter."
        )


def _check(name: str, what: str, got, want) -> None:
    if tuple(got) != tuple(want):
        raise NestedAttentionError(
            f"{name}: {what} has shape {tuple(got)}, expected {tuple(want)}. The file does not match its own "
            "description."
        )


# -- inspection --------------------------------------------------------------------------------


def inspect(path: str) -> str:
    """A human-readable summary; for unknown layouts it names the keys it could not place."""
    sd, meta = read_state_dict(path)
    name = os.path.basename(path)
    lines = [f"file: {name}", f"tensors: {len(sd)}, parameters: {sum(v.numel() for v in sd.values()):,}"]
    key_map = detect(sd, meta)
    if key_map is None:
        lines.append("family: unknown (neither a Nested Attention adapter nor an IP-Adapter Plus checkpoint)")
        lines.append("keys that could not be placed:")
        lines += [f"  {k} {shape}" for k, shape in _groups(sd).items()]
        return "\n".join(lines)
    try:
        adapter = key_map.convert(sd, meta, name)
    except NestedAttentionError as e:
        lines += [f"family: {key_map.name} (could not be loaded)", f"problem: {e}"]
        return "\n".join(lines)
    c = adapter.config
    lines += [
        f"family: {key_map.name}{' (experimental, training-free)' if key_map.name == 'ip_adapter_plus' else ''}",
        f"base: {adapter.base}",
        _layer_line(adapter.layers),
        f"tokens per image: {c.num_queries} of width {c.output_dim}",
        f"encoder: {encoder_name(c.embedding_dim)} (hidden width {c.embedding_dim}, penultimate layer)",
        f"resampler: dim {c.dim}, depth {c.depth}, heads {c.heads}x{c.dim_head}, ff x{c.ff_mult}",
        "keys:",
    ]
    lines += [f"  {k} {shape}" for k, shape in _groups(sd).items()]
    return "\n".join(lines)


def _layer_line(layers: List[Layer]) -> str:
    if not is_joint(layers):
        return f"cross-attention layers: {len(layers)}"
    double = sum(layer.comfy[0] == "double_block" for layer in layers)
    widths = "/".join(str(w) for w in sorted({layer.width for layer in layers}))
    return (
        f"joint-attention layers (DiT): {len(layers)}, {double} double-stream and {len(layers) - double} "
        f"single-stream blocks, width {widths}"
    )


def _groups(sd: Dict[str, Tensor]) -> "OrderedDict[str, str]":
    """Collapse numbered keys (layers.12.to_k.weight -> layers.*.to_k.weight) with their shapes."""
    groups: "OrderedDict[str, set]" = OrderedDict()
    for k, v in sd.items():
        groups.setdefault(re.sub(r"\.\d+\.", ".*.", k), set()).add(tuple(v.shape))
    return OrderedDict((k, " ".join(str(s) for s in sorted(shapes))) for k, shapes in groups.items())
