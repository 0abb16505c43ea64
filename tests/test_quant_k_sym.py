"""Q3_K and Q6_K encoders against llama.cpp's own ggml_quantize_chunk.

Bytes are compared block by block with ``ggml_ref.quantize`` and decoded with
gguf-py's ``dequantize``; accuracy is checked on the real tinyllama weights,
with and without an importance matrix.
"""
import glob
import os
import platform
from pathlib import Path

import numpy as np
import pytest
from gguf import GGMLQuantizationType as T
from gguf.quants import dequantize

from ggufq.quant import encode, row_nbytes
from ggufq_ref import ggml_ref

pytestmark = pytest.mark.skipif(not ggml_ref.available(), reason="llama-cpp-python (ggml reference) not installed")

TYPES = [T.Q3_K, T.Q6_K]
MODEL = str(Path(__file__).resolve().parent.parent / "fixtures" / "tinyllama-spm-10m")
# ggml-base on x86-64 is built without FMA contraction, so the float32 steps we mirror
# give the same bytes; elsewhere (e.g. aarch64, fp-contract) rare blocks may differ.
MIN_IDENTICAL = 1.0 if platform.machine() in ("x86_64", "AMD64") else 0.99


def blocks(qtype, a):
    return a.reshape(-1, row_nbytes(qtype, 256))


def identical_share(qtype, x, imatrix):
    ours = encode(qtype, x, imatrix)
    ref = ggml_ref.quantize(qtype, x, imatrix)
    return (blocks(qtype, ours) == blocks(qtype, ref)).all(axis=1).mean(), ours, ref


def synthetic_imatrix(k, seed):
    rng = np.random.default_rng(seed)
    act = rng.standard_normal((64, k)) * rng.lognormal(0, 1, k)
    return (act ** 2).mean(axis=0).astype(np.float32)


def rel_rmse(x, enc, qtype):
    d = dequantize(enc, qtype).reshape(x.shape)
    return float(np.linalg.norm(x - d) / np.linalg.norm(x))


@pytest.fixture(scope="module")
def hard_rows():
    """Rows that walk the corner cases: zeros, tiny and huge values, spikes, ties, constant rows."""
    rng = np.random.default_rng(0)
    x = (rng.standard_normal((64, 1024)) * rng.lognormal(0, 1.5, (64, 1))).astype(np.float32)
    x[0] = 0                                  # all-zero row
    x[1, 256:512] = 0                         # all-zero block
    x[2, :16] = 0                             # all-zero group
    x[3] *= 1e-20                             # below GROUP_MAX_EPS scale
    x[4] = 0; x[4, 7] = 5.0                   # one spike per row
    x[5] = 0.25                               # constant row: every |x| ties
    x[6] = -np.abs(x[6])                      # all negative
    x[7] *= 3e3                               # large values
    x[8] = np.round(x[8] * 2) / 2             # many ties
    x[9, ::16] = 40.0                         # one outlier per group
    x[10] = rng.standard_t(1.5, 1024)         # heavy tails
    return x


@pytest.mark.parametrize("qtype", TYPES)
@pytest.mark.parametrize("with_imatrix", [False, True])
def test_bytes_match_ggml_on_corner_cases(qtype, with_imatrix, hard_rows):
    im = None
    if with_imatrix:
        im = synthetic_imatrix(hard_rows.shape[1], 1)
        im[::5] = 0                           # columns the imatrix never saw
    share, ours, ref = identical_share(qtype, hard_rows, im)
    assert share >= MIN_IDENTICAL, f"{qtype.name}: {share:.4f} of blocks identical"
    d = dequantize(ours, qtype)
    assert d.shape == hard_rows.shape and np.isfinite(d).all()
    assert not d[0].any() and not d[1, 256:512].any()


@pytest.mark.parametrize("qtype", TYPES)
def test_imatrix_follows_columns_across_chunks(qtype):
    """768-wide rows (3 blocks) over 700 rows: internal chunks start mid-row; the imatrix must stay aligned."""
    rng = np.random.default_rng(5)
    x = rng.standard_normal((700, 768)).astype(np.float32)
    im = synthetic_imatrix(768, 6)
    share, ours, ref = identical_share(qtype, x, im)
    assert share >= MIN_IDENTICAL
    # and the imatrix does matter: without it the encoding is different
    assert not np.array_equal(encode(qtype, x), ours)


@pytest.mark.parametrize("qtype,bound", [(T.Q3_K, 0.2), (T.Q6_K, 0.025)])
def test_decodes_close_to_input(qtype, bound):
    rng = np.random.default_rng(2)
    x = rng.standard_normal((32, 2048)).astype(np.float32)
    enc = encode(qtype, x)
    assert enc.shape == (32, row_nbytes(qtype, 2048))
    assert rel_rmse(x, enc, qtype) < bound


def _load_bf16_tensors(model_dir):
    """2-D weights of the model, as float32, through ggufq.source."""
    from ggufq_ref.parity import model_matrices
    return dict(model_matrices(model_dir, min_cols=0))


@pytest.fixture(scope="module")
def model_weights():
    if not glob.glob(os.path.join(MODEL, "*.safetensors")):
        pytest.skip(f"{MODEL} not present")
    return _load_bf16_tensors(MODEL)


@pytest.mark.slow
@pytest.mark.parametrize("qtype", TYPES)
@pytest.mark.parametrize("with_imatrix", [False, True])
def test_accuracy_parity_on_tinyllama(qtype, with_imatrix, model_weights):
    ratios, same, total = [], 0, 0
    for i, (name, w) in enumerate(sorted(model_weights.items())):
        im = synthetic_imatrix(w.shape[1], 100 + i) if with_imatrix else None
        ours = encode(qtype, w, im)
        ref = ggml_ref.quantize(qtype, w, im)
        ratios.append(rel_rmse(w, ours, qtype) / rel_rmse(w, ref, qtype))
        b1, b2 = blocks(qtype, ours), blocks(qtype, ref)
        same += int((b1 == b2).all(axis=1).sum())
        total += len(b1)
    ratios = np.array(ratios)
    print(f"\n{qtype.name} imatrix={with_imatrix}: {len(ratios)} tensors, RMSE ratio ours/ggml "
          f"mean {ratios.mean():.6f} max {ratios.max():.6f}, identical blocks {same}/{total} = {same / total:.6f}")
    assert len(ratios) == 58
    assert ratios.max() <= 1.01
    assert ratios.mean() <= 1.00
    assert same / total >= MIN_IDENTICAL


@pytest.mark.parametrize("qtype", TYPES)
def test_empty_chunk(qtype):
    for im in (None, np.ones(512, dtype=np.float32)):
        assert encode(qtype, np.zeros((0, 512), dtype=np.float32), im).shape == (0, row_nbytes(qtype, 512))
