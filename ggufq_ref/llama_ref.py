"""llama.cpp's own per-tensor type choice through ctypes, as the reference for tests.

Calls ``llama_quant_model_from_metadata`` + ``llama_quant_compute_types`` (the
functions llama.cpp's ``tests/test-quant-type-selection.cpp`` uses) in the
``libllama`` bundled with the installed llama-cpp-python, on mock tensors
(names and shapes only). It runs ``llama_tensor_get_type`` exactly as
llama-quantize does, without a model file.
"""
from __future__ import annotations

import ctypes
from functools import lru_cache
from typing import Optional, Sequence

from gguf import GGMLQuantizationType as T, LlamaFileType

from ggufq import llamalib
from ggufq.plan import ModelInfo, TensorSpec


class _Desc(ctypes.Structure):
    _fields_ = [("architecture", ctypes.c_char_p)] + [
        (f, ctypes.c_uint32) for f in ("n_embd", "n_ff", "n_layer", "n_head", "n_head_kv", "n_expert",
                                       "n_embd_head_k", "n_embd_head_v")]


class _QParams(ctypes.Structure):        # llama_model_quantize_params
    _fields_ = [
        ("nthread", ctypes.c_int32), ("ftype", ctypes.c_int), ("output_tensor_type", ctypes.c_int),
        ("token_embedding_type", ctypes.c_int), ("allow_requantize", ctypes.c_bool),
        ("quantize_output_tensor", ctypes.c_bool), ("only_copy", ctypes.c_bool), ("pure", ctypes.c_bool),
        ("keep_split", ctypes.c_bool), ("dry_run", ctypes.c_bool),
        ("imatrix", ctypes.c_void_p), ("kv_overrides", ctypes.c_void_p), ("tt_overrides", ctypes.c_void_p),
        ("prune_layers", ctypes.c_void_p), ("max_buf_size", ctypes.c_size_t),
        ("_spare", ctypes.c_byte * 64),      # room should the struct have grown
    ]


class _InitParams(ctypes.Structure):     # ggml_init_params
    _fields_ = [("mem_size", ctypes.c_size_t), ("mem_buffer", ctypes.c_void_p), ("no_alloc", ctypes.c_bool)]


# C++ symbols of src/llama-ext.h (not extern "C")
_SYMS = {
    "init": "_Z16llama_quant_initPK11llama_modelPK27llama_model_quantize_params",
    "free": "_Z16llama_quant_freeP19quantize_state_impl",
    "model": "_Z31llama_quant_model_from_metadataPK22llama_quant_model_desc",
    "allows": "_Z38llama_quant_tensor_allows_quantizationPK19quantize_state_implPK11ggml_tensor",
    "compute": "_Z25llama_quant_compute_typesP19quantize_state_impl11llama_ftypePP11ggml_tensorP9ggml_typem",
}


_LOG_CB = ctypes.CFUNCTYPE(None, ctypes.c_int, ctypes.c_char_p, ctypes.c_void_p)
_QUIET = _LOG_CB(lambda level, text, user: None)   # llama-quantize's fallback warnings would flood stderr


@lru_cache(maxsize=1)
def _libs():
    base, llama = llamalib.ggml_base(), llamalib.llama()
    f = {k: getattr(llama, v) for k, v in _SYMS.items()}
    f["init"].restype, f["init"].argtypes = ctypes.c_void_p, [ctypes.c_void_p, ctypes.POINTER(_QParams)]
    f["free"].argtypes = [ctypes.c_void_p]
    f["model"].restype, f["model"].argtypes = ctypes.c_void_p, [ctypes.POINTER(_Desc)]
    f["allows"].restype, f["allows"].argtypes = ctypes.c_bool, [ctypes.c_void_p, ctypes.c_void_p]
    f["compute"].argtypes = [ctypes.c_void_p, ctypes.c_int, ctypes.POINTER(ctypes.c_void_p),
                             ctypes.POINTER(ctypes.c_int), ctypes.c_size_t]
    llama.llama_model_quantize_default_params.restype = _QParams
    llama.llama_model_free.argtypes = [ctypes.c_void_p]
    llama.llama_log_set(_QUIET, None)
    base.ggml_log_set(_QUIET, None)
    llama.llama_backend_init()
    base.ggml_init.restype, base.ggml_init.argtypes = ctypes.c_void_p, [_InitParams]
    base.ggml_free.argtypes = [ctypes.c_void_p]
    base.ggml_tensor_overhead.restype = ctypes.c_size_t
    base.ggml_new_tensor_4d.restype = ctypes.c_void_p
    base.ggml_new_tensor_4d.argtypes = [ctypes.c_void_p, ctypes.c_int] + [ctypes.c_int64] * 4
    base.ggml_set_name.argtypes = [ctypes.c_void_p, ctypes.c_char_p]
    return base, llama, f


def available() -> bool:
    try:
        _libs()
        return True
    except (RuntimeError, OSError, AttributeError, IndexError):
        return False


def compute_types(tensors: Sequence[TensorSpec], info: ModelInfo, ftype: str,
                  n_ff: int = 0) -> dict[str, Optional[T]]:
    """name -> the type llama-quantize picks for ``ftype`` (a --type name such as "Q4_K_M"),
    or None for tensors it does not quantize (it then copies them as they are)."""
    base, llama, f = _libs()
    ft = LlamaFileType[("ALL_" if ftype.upper() == "F32" else "MOSTLY_") + ftype.upper()]
    desc = _Desc(info.arch.encode(), info.n_embd, n_ff, info.n_layer, info.n_head, info.n_head_kv,
                 info.n_expert, info.n_embd // max(1, info.n_head), info.n_embd // max(1, info.n_head))
    model = f["model"](ctypes.byref(desc))
    if not model:
        raise RuntimeError(f"llama.cpp made no mock model for arch {info.arch!r}")
    params = llama.llama_model_quantize_default_params()
    params.ftype = int(ft)
    qs = f["init"](model, ctypes.byref(params))
    ctx = base.ggml_init(_InitParams((len(tensors) + 1) * base.ggml_tensor_overhead(), None, True))
    try:
        made = []
        for s in tensors:
            ne = list(reversed(s.shape)) + [1] * (4 - len(s.shape))
            t = base.ggml_new_tensor_4d(ctx, int(T.F32), *ne)
            base.ggml_set_name(t, s.name.encode())
            made.append((s.name, t))
        out: dict[str, Optional[T]] = {n: None for n, _ in made}
        quant = [(n, t) for n, t in made if f["allows"](qs, t)]

        def visit_key(item):          # llama_model_loader::weight_name_comparer
            name = item[0]
            layer = int(name.split(".")[1]) if name.startswith("blk.") and name.split(".")[1].isdigit() else -1
            return (layer, name.encode())

        quant.sort(key=visit_key)
        arr = (ctypes.c_void_p * len(quant))(*[t for _, t in quant])
        res = (ctypes.c_int * len(quant))()
        f["compute"](qs, int(ft), arr, res, len(quant))
        for (n, _), r in zip(quant, res):
            out[n] = T(r)
        return out
    finally:
        base.ggml_free(ctx)
        f["free"](qs)
        llama.llama_model_free(model)
