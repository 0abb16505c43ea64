"""Mistral -> GGUF arch ``llama``.

llama.cpp converts ``MistralForCausalLM`` exactly as Llama (same tensors, same
Q/K permutation, same keys); sliding-window attention is not written, as
llama.cpp's converter doesn't either (Mistral v0.2+ disable it).
"""
from __future__ import annotations

from . import register
from .llama import Llama


@register("MistralForCausalLM")
class Mistral(Llama):
    pass
