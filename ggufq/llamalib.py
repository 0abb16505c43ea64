"""The shared libraries of the installed llama-cpp-python, loaded once for the whole process.

The one loader of ``libggml-base`` / ``libllama``: the calibration worker (``calib_worker``) reads
activations through it, and the test references in ``ggufq_ref`` call ggml's and llama.cpp's own
functions through it. :func:`load` finds the library next to ``llama_cpp/__init__.py`` (``lib/``), or in
``$LLAMA_CPP_LIB_PATH`` as llama-cpp-python does,
opens it ``RTLD_GLOBAL`` (libllama resolves ggml's symbols through it) and caches the handle, so
argtypes set by one caller are seen by all; callers set only the signatures they use.
"""
from __future__ import annotations

import ctypes
import glob
import importlib.util
import os
from functools import lru_cache


def lib_dir() -> str:
    """``.../site-packages/llama_cpp/lib``, or ``$LLAMA_CPP_LIB_PATH`` when set (llama-cpp-python's own
    override: its bindings then load libllama from there, e.g. a CUDA build of llama.cpp, and so must
    we); RuntimeError when llama-cpp-python is not installed."""
    override = os.environ.get("LLAMA_CPP_LIB_PATH")
    if override:
        return override
    spec = importlib.util.find_spec("llama_cpp")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError("llama-cpp-python is not installed; its shared libraries are needed here")
    return os.path.join(list(spec.submodule_search_locations)[0], "lib")


@lru_cache(maxsize=None)
def load(*stems: str) -> ctypes.CDLL:
    """The first of ``lib<stem>.*`` that exists (e.g. ``load("ggml-base", "ggml")``), opened once."""
    d = lib_dir()
    for stem in stems:
        cands = sorted(glob.glob(os.path.join(d, f"lib{stem}.*")))
        if cands:
            return ctypes.CDLL(cands[0], mode=ctypes.RTLD_GLOBAL)
    raise RuntimeError(f"no {' or '.join('lib' + s for s in stems)} in {d}")


def ggml_base() -> ctypes.CDLL:
    """libggml-base (older builds: libggml)."""
    return load("ggml-base", "ggml")


def llama() -> ctypes.CDLL:
    """libllama (loads libggml-base first, whose symbols it needs)."""
    ggml_base()
    return load("llama")
