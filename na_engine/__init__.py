"""Nested Attention engine: pure PyTorch, usable and tested without ComfyUI.

from na_engine import load_adapter, nested_attention, NestedBinding
"""

from .adapter import NestedAdapter, random_adapter
from .attention import NestedBinding, SubjectMaps, nested_attention, nested_correction, sdpa_attention, subject_maps
from .binding import Binder, ModelCall, Placement
from .capture import AttentionCapture, token_legend
from .errors import NestedAttentionError
from .formats import inspect, load_adapter, save_adapter
from .layers import TABLES, Layer
from .resampler import Resampler, ResamplerConfig
from .subjects import Subject, SubjectSet, load_subject, save_subject
from .tokens import find_trigger, word_ids

__all__ = [
    "AttentionCapture",
    "Binder",
    "Layer",
    "ModelCall",
    "NestedAdapter",
    "NestedAttentionError",
    "NestedBinding",
    "Placement",
    "Resampler",
    "ResamplerConfig",
    "Subject",
    "SubjectMaps",
    "SubjectSet",
    "TABLES",
    "find_trigger",
    "inspect",
    "load_adapter",
    "load_subject",
    "nested_attention",
    "nested_correction",
    "random_adapter",
    "save_adapter",
    "save_subject",
    "sdpa_attention",
    "subject_maps",
    "token_legend",
    "word_ids",
]
