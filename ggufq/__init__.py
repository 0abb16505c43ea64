"""ggufq: Hugging Face safetensors folders -> quantized GGUF in one streaming pass."""

__version__ = "0.1.0"


class GgufqError(Exception):
    """An error the user can act on. The CLI prints its message on one line and exits 1."""
