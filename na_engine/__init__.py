"""Nested Attention engine: pure PyTorch, usable and tested without ComfyUI.

    from na_engine import load_adapter, nested_attention, NestedBinding
"""
from .adapter import NestedAdapter, random_adapter
from .attention import NestedBinding, SubjectMaps, nested_attention, nested_correction, sdpa_attention, subject_maps
from .capture import AttentionCapture, token_legend
from .errors import NestedAttentionError
from .formats import inspect, load_adapter, save_adapter
from .layers import TABLES, Layer, comfy_unet_layers, match_layers
from .patch import NestedAttentionPatch, NestedRun, plan_registration
from .resampler import Resampler, ResamplerConfig
from .subjects import Subject, SubjectSet, load_subject, save_subject
from .tokens import find_trigger, word_ids

__all__ = [name for name in dir() if not name.startswith("_")]
