"""IQ3_XXS and IQ3_S encoders against llama.cpp's own ggml_quantize_chunk.

Bytes are compared block by block with ``ggml_ref.quantize`` (the libggml of
llama-cpp-python) on corner cases and on the real tinyllama matrices, without an
imatrix, with one derived from the matrix itself, and with a real llama-imatrix
file when the tool is built; decoded with gguf-py's ``dequantize``.
"""
import platform
import subprocess

import numpy as np
import pytest
from gguf import GGMLQuantizationType as T
from gguf.quants import dequantize

from conftest import HELDOUT, LLAMA_BIN, TINY, run_cli
from quant_helpers import diagonal_feedback, ffn_gate_moments, out_err, tiny_matrices
from ggufq.quant import encode, row_nbytes
from ggufq_ref import ggml_ref
from ggufq.quant.iq3 import grid

pytestmark = pytest.mark.skipif(not ggml_ref.available(), reason="llama-cpp-python (ggml reference) not installed")

TYPES = [T.IQ3_XXS, T.IQ3_S]
# ggml-base on x86-64 is built without FMA contraction, so the float32 steps we mirror give
# the same bytes; elsewhere rare blocks may differ
MIN_IDENTICAL = 1.0 if platform.machine() in ("x86_64", "AMD64") else 0.99


def same_blocks(qtype, x, imatrix):
    ours = encode(qtype, x, imatrix)
    ref = ggml_ref.quantize(qtype, x, imatrix)
    bs = row_nbytes(qtype, 256)
    return (ours.reshape(-1, bs) == ref.reshape(-1, bs)).all(axis=1), ours


def row_stat_imatrix(x):
    """A deterministic importance vector from the matrix itself: mean square of each column."""
    return ((x.astype(np.float64) ** 2).mean(axis=0) + 1e-6).astype(np.float32)


@pytest.mark.parametrize("size,nwant", [(256, 2), (512, 3)])
def test_grid_neighbours_follow_ggml_rules(size, nwant):
    """kmap inverts the grid; every off-grid point lists exactly the grid points at its nwant smallest
    distances, ordered by (distance, index) as qsort with iq3_compare_func leaves them."""
    g = grid(size)
    codes = (g.levels.astype(np.int32) << np.array([0, 3, 6, 9])).sum(axis=1)
    assert len(set(codes)) == size and (g.kmap[codes] == np.arange(size)).all()
    assert (g.kmap >= 0).sum() == size and (g.values == 2 * g.levels + 1).all()
    for u in np.flatnonzero(g.kmap < 0)[::7]:
        pos = 2 * ((u >> np.array([0, 3, 6, 9])) & 7) + 1
        d2 = ((g.values - pos) ** 2).sum(axis=1)
        want = np.flatnonzero(d2 <= np.unique(d2)[nwant - 1])
        want = want[np.lexsort((want, d2[want]))]
        n = g.nb_cnt[u]
        assert list(g.nb_idx[u, :n]) == list(want)
        assert (g.nb_idx[u, n:] == want[0]).all()
        assert (g.nb_vals[:n, u] == g.values[want]).all()
    assert (g.nb_cnt[g.kmap >= 0] == 0).all()


@pytest.fixture(scope="module")
def hard_rows():
    """Rows that walk the corner cases: zeros, tiny and huge values, spikes, ties, sign patterns."""
    rng = np.random.default_rng(0)
    x = (rng.standard_normal((40, 1024)) * rng.lognormal(0, 1.5, (40, 1))).astype(np.float32)
    x[0] = 0                                  # all-zero row: d = 0
    x[1, 256:512] = 0                         # all-zero block
    x[2, :32] = 0                             # all-zero group (IQ3_S writes the next groups a slot early)
    x[2, 512 + 64:512 + 128] = 0              # two zero groups inside a block
    x[3] *= 1e-20                             # below GROUP_MAX_EPS_IQ3_XXS
    x[4] = 0; x[4, 7] = 5.0                   # one spike per row
    x[5] = 0.25                               # constant row: every |x| ties
    x[6] = -np.abs(x[6])                      # all negative: even/odd sign counts per 8
    x[7] *= 3e3                               # large values
    x[8] = np.round(x[8] * 2) / 2             # many ties
    x[9, ::16] = 40.0                         # one outlier per group
    x[10] = rng.standard_t(1.5, 1024)         # heavy tails
    x[11, :32] = -1e-9; x[11, 32:64] = 1e-9   # groups just below the IQ3_XXS threshold
    x[12] = -0.0                              # negative zeros
    x[13, :8] = -1                            # eight negatives in a row
    x[14, 1::2] *= -1e-6                      # alternating tiny negatives
    x[15, :3] = -2                            # an odd number of negatives
    return x


@pytest.mark.parametrize("qtype", TYPES)
@pytest.mark.parametrize("with_imatrix", [False, True])
def test_bytes_match_ggml_on_corner_cases(qtype, with_imatrix, hard_rows):
    im = None
    if with_imatrix:
        rng = np.random.default_rng(1)
        im = (rng.standard_normal((64, hard_rows.shape[1])) ** 2).mean(axis=0).astype(np.float32)
        im[::5] = 0                           # columns the imatrix never saw
        im[32:64] = 0                         # a whole group without importance: no scale is ever better
        im[300:556] = 0                       # a whole block
    same, ours = same_blocks(qtype, hard_rows, im)
    assert same.mean() >= MIN_IDENTICAL, f"{qtype.name}: {same.mean():.4f} of blocks identical"
    d = dequantize(ours, qtype)
    assert d.shape == hard_rows.shape and np.isfinite(d).all()
    assert not d[0].any() and not d[12].any()


@pytest.fixture(scope="module")
def tiny_rows():
    # 256 rows of each matrix keep the run short; every row length of the model is there
    return {n: m[:256] for n, m in tiny_matrices().items()}


@pytest.mark.parametrize("qtype", TYPES)
@pytest.mark.parametrize("imatrix", ["none", "row-stats"])
def test_bytes_match_ggml_on_tinyllama(qtype, imatrix, tiny_rows):
    for name, x in tiny_rows.items():
        im = row_stat_imatrix(x) if imatrix == "row-stats" else None
        same, ours = same_blocks(qtype, x, im)
        assert same.mean() >= MIN_IDENTICAL, f"{qtype.name} {name}: {same.mean():.4f} of blocks identical"


@pytest.mark.parametrize("qtype", TYPES)
def test_round_trip_through_gguf_dequantize(qtype, tiny_rows):
    """Decoded weights are close to the input, and an imatrix lowers the error where it points."""
    for name, x in tiny_rows.items():
        d = dequantize(encode(qtype, x), qtype).reshape(x.shape)
        rel = np.linalg.norm(d - x) / np.linalg.norm(x)
        assert rel < 0.3, (name, rel)
        im = np.ones(x.shape[1], dtype=np.float32)
        im[: x.shape[1] // 2] = 100.0             # the first half of the columns matters most
        dw = dequantize(encode(qtype, x, im), qtype).reshape(x.shape)
        h = slice(0, x.shape[1] // 2)
        assert np.linalg.norm((dw - x)[:, h]) < np.linalg.norm((d - x)[:, h]), name


@pytest.fixture(scope="module")
def llama_files(tmp_path_factory):
    """An F32 GGUF of the tiny model (ggufq) and an imatrix for it from llama.cpp's own llama-imatrix."""
    tool = LLAMA_BIN / "llama-imatrix"
    if not tool.exists():
        pytest.skip(f"llama-imatrix not built in {LLAMA_BIN} (tools/build_llama_tools.sh)")
    d = tmp_path_factory.mktemp("iq3-llama")
    f32 = d / "f32.gguf"
    assert run_cli("convert", TINY, "-o", f32, "--type", "F32", "-q").returncode == 0
    calib = d / "calib.txt"
    calib.write_text(HELDOUT.read_text()[:30000] if HELDOUT.exists() else "hello world " * 3000)
    r = subprocess.run([str(tool), "-m", str(f32), "-f", str(calib), "-o", str(d / "im.gguf"),
                        "-c", "128", "--chunks", "4", "-t", "2"], capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    return f32, d / "im.gguf"


@pytest.fixture(scope="module")
def real_imatrix(llama_files):
    from ggufq.imatrix import load
    return load(llama_files[1])


@pytest.mark.parametrize("qtype", TYPES)
def test_bytes_match_ggml_with_a_real_imatrix(qtype, tiny_rows, real_imatrix):
    # the columns of these matrices are not permuted by the conversion, so the GGUF entries apply as is
    pairs = {"model.layers.1.mlp.down_proj.weight": "blk.1.ffn_down.weight",
             "model.layers.5.mlp.gate_proj.weight": "blk.5.ffn_gate.weight",
             "model.layers.1.self_attn.q_proj.weight": "blk.1.attn_q.weight"}
    for hf, name in pairs.items():
        x = tiny_rows[hf]
        im = real_imatrix.for_tensor(name, x.shape[1])
        assert im is not None, name
        same, _ = same_blocks(qtype, x, im)
        assert same.mean() >= MIN_IDENTICAL, f"{qtype.name} {name}: {same.mean():.4f} of blocks identical"


# ---------------------------------------------------------------- error feedback into the codebooks

@pytest.fixture(scope="module")
def gate_moments(tmp_path_factory):
    return ffn_gate_moments(tmp_path_factory, 256)


@pytest.mark.parametrize("qtype", TYPES)
def test_error_feedback_lowers_the_output_error(qtype, gate_moments):
    """Quad-wise GPTQ under the ggml encoder's own scales: the product error drops well below the
    plain encoding weighted by diag(H), on the text the moments came from and on another text."""
    from ggufq.quant import gptq, iq3_gptq
    rows, m, m_other = gate_moments
    h = gptq.Hessian.from_moment(m)
    base = encode(qtype, rows, h.diag)
    got = iq3_gptq.encode(qtype, rows, h, start=encode)
    assert got.shape == base.shape and got.dtype == np.uint8
    # the super-block scales are the start encoder's (first block: no error has reached it yet)
    assert (got[:, :2] == base[:, :2]).all()
    assert out_err(qtype, rows, got, m) / out_err(qtype, rows, base, m) < 0.8
    assert out_err(qtype, rows, got, m_other) / out_err(qtype, rows, base, m_other) < 0.95


@pytest.mark.parametrize("qtype", TYPES)
def test_error_feedback_without_correlations_is_the_exact_grid_search(qtype, gate_moments):
    """With a diagonal H there is nothing to feed forward: every quad must be the grid point (under
    the decoded group scale and the stored signs) with the least h-weighted squared error."""
    from ggufq.quant import iq3_gptq
    rows, m, _ = gate_moments
    rows = rows[:32]
    got, deq, hd, grid4 = diagonal_feedback(iq3_gptq, qtype, rows, m)
    db = iq3_gptq._group_scales(qtype, got.reshape(-1, row_nbytes(qtype, 256))).reshape(len(rows), -1)
    for r in range(len(rows)):
        for quad in range(0, rows.shape[1] // 4, 5):
            c = slice(4 * quad, 4 * quad + 4)
            s = np.where(deq[r, c] < 0, -1.0, 1.0)
            cand = db[r, quad // 8] * s * grid4                      # every grid point, same signs
            e_all = ((rows[r, c] - cand) ** 2 * hd[c]).sum(axis=1)
            e_got = ((rows[r, c] - deq[r, c]) ** 2 * hd[c]).sum()
            assert e_got <= e_all.min() * (1 + 1e-5) + 1e-12, (r, quad)


@pytest.mark.parametrize("qtype", TYPES)
def test_bytes_match_llama_quantize(qtype, llama_files, tmp_path):
    """llama-quantize --pure (which insists on an imatrix for IQ3_XXS, not for IQ3_S) on the F32 GGUF:
    its tensors and ours from the same rows and imatrix are the same bytes."""
    import os

    import gguf
    from ggufq.imatrix import load
    f32, im_path = llama_files
    exe = LLAMA_BIN / "llama-quantize"
    if not exe.exists():
        pytest.skip(f"llama-quantize not built in {LLAMA_BIN}")
    use_im = qtype == T.IQ3_XXS
    out = tmp_path / "ref.gguf"
    env = {**os.environ, "LD_LIBRARY_PATH": f"{LLAMA_BIN}:{os.environ.get('LD_LIBRARY_PATH', '')}"}
    r = subprocess.run([str(exe), "--pure", *(["--imatrix", str(im_path)] if use_im else []),
                        str(f32), str(out), qtype.name, "2"], capture_output=True, text=True, env=env, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    im = load(im_path) if use_im else None
    src = {t.name: t for t in gguf.GGUFReader(f32).tensors}
    checked = 0
    for t in gguf.GGUFReader(out).tensors:
        if t.tensor_type != qtype or not (t.name.startswith("blk.2.") or t.name == "output.weight"):
            continue
        k = int(t.shape[0])
        x = np.asarray(src[t.name].data, dtype=np.float32).reshape(-1, k)[:512]
        ref = np.asarray(t.data).view(np.uint8).reshape(-1, row_nbytes(qtype, k))[: len(x)]
        ours = encode(qtype, x, im.for_tensor(t.name, k) if im else None)
        assert np.array_equal(ours, ref), t.name
        checked += 1
    assert checked == 8                           # blk.2's seven matrices and output
