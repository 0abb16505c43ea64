"""ggufq.llamalib finds llama.cpp's shared libraries where llama-cpp-python does, including its
``LLAMA_CPP_LIB_PATH`` override (a CUDA build of llama.cpp used under the Python bindings): the
calibration worker must read tensors through the same libggml that llama.cpp computes with."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys

import pytest

llama_cpp = pytest.importorskip("llama_cpp")

SCRIPT = """
import llama_cpp
llama_cpp.llama_backend_init()
from ggufq import llamalib
llamalib.llama()
llamalib.ggml_base()
print("\\n".join(sorted({l.split()[-1] for l in open("/proc/self/maps") if "libllama" in l or "libggml" in l})))
"""


def _mapped(env) -> list[str]:
    p = subprocess.run([sys.executable, "-c", SCRIPT], env=env, capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr
    return p.stdout.split()


def test_the_override_directory_is_the_only_copy_loaded(tmp_path):
    from ggufq import llamalib
    src = llamalib.lib_dir()
    libs = tmp_path / "libs"
    shutil.copytree(src, libs, symlinks=True)
    env = dict(os.environ, LLAMA_CPP_LIB_PATH=str(libs))
    mapped = _mapped(env)
    assert mapped and all(m.startswith(str(libs)) for m in mapped), mapped
    env.pop("LLAMA_CPP_LIB_PATH")
    default = _mapped(env)
    assert default and all(m.startswith(os.path.realpath(src)) or m.startswith(src) for m in default), default
