"""`ggufq convert --type IQ4_XS / IQ4_NL` against llama.cpp's own pipeline, end to end.

llama.cpp: ``convert_hf_to_gguf.py --outtype f16`` then ``llama-quantize [--imatrix FILE] F16 TYPE``;
ggufq: one ``ggufq convert --type TYPE [--imatrix FILE]``. Every tensor has the same type and the
same bytes, and llama-cpp-python loads our file and gives the logits of llama.cpp's file.
"""
from __future__ import annotations


import numpy as np
import pytest

from conftest import LLAMA_BIN, TINY, run_cli


def _tool():
    from tools import plan_parity
    return plan_parity


TOOL = _tool()


@pytest.fixture(scope="module")
def llama_f16(request):
    """tinyllama as convert_hf_to_gguf.py writes it (F16), and a synthetic GGUF imatrix for it."""
    if not (LLAMA_BIN / "llama-quantize").exists():
        pytest.skip(f"llama-quantize not built in {LLAMA_BIN}")
    if not TOOL.LLAMA_CPP.joinpath("convert_hf_to_gguf.py").exists():
        pytest.skip(f"llama.cpp's convert_hf_to_gguf.py not at {TOOL.LLAMA_CPP}")
    pytest.importorskip("torch")
    cache = request.config.cache.mkdir("ggufq-iq-convert")
    f16 = TOOL.make_f16(TINY, cache / "tinyllama.llama.cpp.f16.gguf", "llama.cpp")
    im = cache / "tinyllama.imatrix.gguf"
    if not im.exists():
        from ggufq.plan import specs_from_gguf
        TOOL.write_imatrix(im, specs_from_gguf(f16)[0])
    return f16, im


def _tensors(path):
    from gguf import GGUFReader

    r = GGUFReader(path)
    return {t.name: (t.tensor_type, bytes(np.asarray(t.data).view(np.uint8).reshape(-1))) for t in r.tensors}


def _logits(path):
    import llama_cpp

    llm = llama_cpp.Llama(str(path), n_ctx=64, n_threads=2, logits_all=True, verbose=False)
    toks = llm.tokenize(b"The word apple means a round fruit")
    llm.eval(toks)
    out = np.array(llm.scores[: len(toks)], dtype=np.float32)
    del llm
    return out


@pytest.mark.slow
@pytest.mark.parametrize("ftype", ["IQ4_XS", "IQ4_NL"])
def test_convert_equals_convert_hf_plus_llama_quantize(tmp_path, llama_f16, ftype):
    f16, im = llama_f16
    for imatrix in (None, im):
        tag = ".im" if imatrix else ""
        ref = TOOL.quantize(LLAMA_BIN, f16, f16.with_name(f"tinyllama.{ftype}{tag}.gguf"), ftype, imatrix=imatrix)
        ours = tmp_path / f"ours.{ftype}{tag}.gguf"
        r = run_cli("convert", TINY, "-o", ours, "--type", ftype, "-q", "-j", "2",
                    *(["--imatrix", imatrix] if imatrix else []))
        assert r.returncode == 0, r.stderr
        a, b = _tensors(ours), _tensors(ref)
        assert set(a) == set(b)
        types = {n: t.name for n, (t, _) in a.items()}
        assert types == {n: t.name for n, (t, _) in b.items()}
        differ = [n for n in a if a[n][1] != b[n][1]]
        assert differ == [], f"{ftype} imatrix={imatrix is not None}: {len(differ)} tensors differ, e.g. {differ[:3]}"
        # the mixture really is IQ4: most matrices in ftype, ffn_down of layer 0 in Q5_K without an imatrix
        assert sum(t == ftype for t in types.values()) >= 40
        assert types["blk.0.ffn_down.weight"] == (ftype if imatrix else "Q5_K")
        if imatrix is None:
            lg = _logits(ours)
            assert np.isfinite(lg).all() and np.array_equal(lg, _logits(ref))
