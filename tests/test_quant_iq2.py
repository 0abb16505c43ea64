"""IQ2_XXS, IQ2_XS, IQ2_S, IQ1_S, IQ1_M encoders against llama.cpp's own ggml_quantize_chunk.

Bytes are compared block by block with ``ggml_ref.quantize`` on real tinyllama
matrices and on corner-case rows, with an importance matrix (random-activation
and row-statistics ones, with dead columns) and, where ggml accepts none
(IQ2_S, IQ1_M), without. Encodings decode with gguf-py's ``dequantize``.
"""
import platform
import subprocess

import numpy as np
import pytest
from gguf import GGML_QUANT_SIZES
from gguf import GGMLQuantizationType as T
from gguf.quants import dequantize

from conftest import HELDOUT, LLAMA_BIN, TINY, run_cli
from ggufq.quant import encode, encoders
from ggufq_ref import ggml_ref
from ggufq.quant.iq_grid import iq_grid
from ggufq_ref.parity import model_matrices, synthetic_imatrix

pytestmark = pytest.mark.skipif(not ggml_ref.available(), reason="llama-cpp-python (ggml reference) not installed")

TYPES = [t for t in (T.IQ2_XXS, T.IQ2_XS, T.IQ2_S, T.IQ1_S, T.IQ1_M) if t in encoders()]
NEEDS_IMATRIX = {T.IQ2_XXS, T.IQ2_XS, T.IQ1_S}          # ggml_quantize_requires_imatrix
# ggml-base on x86-64 is built without FMA contraction, so the float32 steps we mirror
# give the same bytes; elsewhere (e.g. aarch64, fp-contract) rare blocks may differ.
MIN_IDENTICAL = 1.0 if platform.machine() in ("x86_64", "AMD64") else 0.99
ROWS_PER_MATRIX = 12


def identical(qtype, x, imatrix):
    ours = encode(qtype, x, imatrix)
    ref = ggml_ref.quantize(qtype, x, imatrix)
    bs = GGML_QUANT_SIZES[qtype][1]
    same = (ours.reshape(-1, bs) == ref.reshape(-1, bs)).all(axis=1)
    return same.mean(), ours


def imatrices(x):
    """(label, imatrix) variants for matrix x: none where allowed, random activations, row statistics."""
    stats = (x.astype(np.float64) ** 2).mean(axis=0).astype(np.float32)
    stats[3::7] = 0                                          # columns the calibration never reached
    return [("none", None), ("synthetic", synthetic_imatrix(x.shape[1], 0)), ("row-stats", stats)]


@pytest.fixture(scope="module")
def tiny_rows():
    """The first rows of every matrix of the tiny model (all shapes, all kinds of tensor)."""
    if not TINY.is_dir():
        pytest.skip(f"tiny model not at {TINY}")
    return [(name, m[:ROWS_PER_MATRIX]) for name, m in model_matrices(str(TINY))]


@pytest.fixture(scope="module")
def hard_rows():
    rng = np.random.default_rng(0)
    x = (rng.standard_normal((24, 512)) * rng.lognormal(0, 1.5, (24, 1))).astype(np.float32)
    x[0] = 0                                  # all-zero row
    x[1, 256:] = 0                            # all-zero super-block
    x[2, :32] = 0                             # all-zero groups
    x[3] *= 1e-20                             # below the GROUP_MAX_EPS thresholds
    x[4] = 0; x[4, 7] = 5.0                   # one spike
    x[5] = 0.25                               # constant row: every |x| ties
    x[6] = -np.abs(x[6])                      # all negative
    x[7] *= 3e3                               # large values
    x[8] = np.round(x[8] * 2) / 2             # many ties
    x[9, ::16] = 40.0                         # one outlier per group
    x[10] = rng.standard_t(1.5, 512)          # heavy tails
    x[11, :8] = [-1, 1, -1, 1, -1, 1, -1, 2]  # odd count of negatives in a group of 8
    x[12] = -0.0                              # negative zeros
    x[13, ::2] = 0                            # half zeros
    return x


@pytest.mark.parametrize("qtype", TYPES)
@pytest.mark.parametrize("variant", ["none", "synthetic", "row-stats"])
def test_bytes_match_ggml_on_tinyllama(qtype, variant, tiny_rows):
    if variant == "none" and qtype in NEEDS_IMATRIX:
        pytest.skip("ggml requires an imatrix for this type")
    n_same = n_all = 0
    for name, x in tiny_rows:
        im = dict(imatrices(x))[variant]
        share, ours = identical(qtype, x, im)
        n_same += share * (ours.size // GGML_QUANT_SIZES[qtype][1])
        n_all += ours.size // GGML_QUANT_SIZES[qtype][1]
        assert share >= MIN_IDENTICAL, f"{qtype.name} {variant} {name}: {share:.4f} of blocks identical"
        # round trip: gguf-py decodes our bytes to values close to the input
        d = dequantize(ours, qtype).reshape(x.shape)
        assert np.isfinite(d).all()
        assert np.linalg.norm(d - x) < 0.9 * np.linalg.norm(x), name
    assert n_all > 100


@pytest.mark.parametrize("qtype", TYPES)
@pytest.mark.parametrize("with_imatrix", [False, True])
def test_bytes_match_ggml_on_corner_cases(qtype, with_imatrix, hard_rows):
    if not with_imatrix and qtype in NEEDS_IMATRIX:
        pytest.skip("ggml requires an imatrix for this type")
    im = None
    if with_imatrix:
        im = synthetic_imatrix(hard_rows.shape[1], 1)
        im[::5] = 0
    share, ours = identical(qtype, hard_rows, im)
    assert share >= MIN_IDENTICAL, f"{qtype.name}: {share:.4f} of blocks identical"
    d = dequantize(ours, qtype).reshape(hard_rows.shape)
    assert np.isfinite(d).all()
    assert not d[0].any() and not d[1, 256:].any()


@pytest.mark.parametrize("qtype", sorted(NEEDS_IMATRIX & set(TYPES)))
def test_types_that_need_an_imatrix_refuse_to_run_without(qtype):
    with pytest.raises(ValueError, match="importance matrix"):
        encode(qtype, np.ones((1, 256), np.float32))


@pytest.mark.parametrize("qtype", TYPES)
def test_rows_must_be_whole_super_blocks(qtype):
    with pytest.raises(ValueError, match="multiple of 256"):
        encode(qtype, np.ones((2, 576), np.float32), np.ones(576, np.float32))


def test_grid_tables_follow_ggml():
    """kmap inverts the grid; every off-grid code has a neighbour list sorted by distance, then index."""
    for qtype, nwant in ((T.IQ2_XXS, 2), (T.IQ2_XS, 2), (T.IQ2_S, 1), (T.IQ1_S, 3)):
        g = iq_grid(qtype)
        n = len(g.levels)
        assert n == {T.IQ2_XXS: 256, T.IQ2_XS: 512, T.IQ2_S: 1024, T.IQ1_S: 2048}[qtype]
        assert (g.kmap[g.codes(g.levels)] == np.arange(n)).all()
        assert (g.kmap >= 0).sum() == n
        pos = 2 * g.levels.astype(np.int64) + 1
        for u in np.flatnonzero(g.kmap < 0)[::997]:
            r = g.nbr_row[u]
            lst = g.nbr_flat[g.nbr_start[r]:g.nbr_start[r] + g.nbr_count[r]]
            upos = 2 * ((u >> (2 * np.arange(8))) & 3) + 1
            d2 = ((pos - upos) ** 2).sum(axis=1)
            keys = sorted(zip(d2.tolist(), range(n)))
            want = sorted(set(d2.tolist()))[:nwant]
            assert lst.tolist() == [j for d, j in keys if d <= want[-1]]


@pytest.mark.slow
def test_bytes_match_ggml_with_a_real_llama_imatrix(tmp_path):
    """An imatrix from llama.cpp's own llama-imatrix over the tiny model, applied to the matrices of that GGUF."""
    import gguf

    from ggufq.imatrix import load
    tool = LLAMA_BIN / "llama-imatrix"
    if not tool.exists():
        pytest.skip(f"llama-imatrix not built in {LLAMA_BIN} (tools/build_llama_tools.sh)")
    if not TINY.is_dir():
        pytest.skip(f"tiny model not at {TINY}")
    f16 = tmp_path / "f16.gguf"
    assert run_cli("convert", TINY, "-o", f16, "--type", "F16", "-q").returncode == 0
    calib = tmp_path / "calib.txt"
    calib.write_text(HELDOUT.read_text()[:30000] if HELDOUT.exists() else "the quick brown fox " * 3000)
    r = subprocess.run([str(tool), "-m", str(f16), "-f", str(calib), "-o", str(tmp_path / "im.gguf"),
                        "--output-format", "gguf", "-c", "128", "--chunks", "4", "-t", "2"],
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    im = load(tmp_path / "im.gguf")
    checked = 0
    for t in gguf.GGUFReader(f16).tensors:
        if len(t.shape) != 2 or t.name not in im.entries or t.shape[0] % 256:
            continue
        x = np.asarray(t.data, dtype=np.float32).reshape(-1, int(t.shape[0]))[:4]
        v = im.for_tensor(t.name, x.shape[1])
        for qtype in TYPES:
            share, _ = identical(qtype, x, v)
            assert share >= MIN_IDENTICAL, f"{qtype.name} {t.name}: {share:.4f} of blocks identical"
        checked += 1
    assert checked >= 8
