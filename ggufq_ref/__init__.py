"""References for tests and tools: never imported by the ``ggufq`` package (a test checks it).

- :mod:`ggufq_ref.ggml_ref` -- ggml's own quantizers (``ggml_quantize_chunk``) through ctypes.
- :mod:`ggufq_ref.llama_ref` -- llama.cpp's own per-tensor type choice (``llama_quant_compute_types``).
- :mod:`ggufq_ref.parity` -- our encoders against ggml's: relative RMSE and byte-identical blocks.
- :mod:`ggufq_ref.forward` -- a NumPy forward pass of a Hugging Face folder, independent of the converter.
- :mod:`ggufq_ref.llama_worker` -- llama-cpp-python in a fresh process (logits, tokenization).
- :mod:`ggufq_ref.st_writer` -- writing safetensors files (BF16/F16/F32) for synthetic model folders.

The shared libraries are opened by :mod:`ggufq.llamalib`, the one loader. This package lives in the
repository only (the wheel ships ``ggufq`` alone); tests and ``python -m tools.X`` find it from the
repository root.
"""
