"""Mixture-of-experts archs and FP8 sources (ggufq.arch.moe, ggufq.source_fp8) on synthetic
checkpoints made by tools/synthetic_moe.py:

* stacking: a stacked tensor's row reads touch only the experts (and rows) they cover, and give
  the experts' rows in order;
* ``convert --type F32`` -> llama-cpp-python logits vs the NumPy reference forward with routing;
* FP8: the decode tables against torch's float8 types (when torch is installed), row-chunk
  dequantization against a whole-tensor ``codes * repeat(scale)``, logits of an FP8 checkpoint's
  F32 conversion against the BF16 reference forward of the same dequantized weights;
* bad input: a missing expert, unequal expert shapes, an FP8 tensor without its scale, a scale of
  the wrong shape, an unsupported quant_method -> one ``ggufq: error:`` line, exit 1, nothing written.

Byte parity with llama.cpp's converter and plan parity with llama-quantize: tools/moe_parity.py.
"""
from __future__ import annotations

import json

import numpy as np
import pytest

from conftest import run_cli
from test_errors import _fails

from tools.synthetic_moe import make_moe

TOL = 1e-4
SMALL = dict(hidden=64, ff=64, layers=2, heads=4, kv_heads=2, experts=8, active=2, shards=2, seed=11)


class Counting:
    """A SourceTensor stand-in that records which rows were read."""

    def __init__(self, a: np.ndarray, log: list, e: int):
        self.a, self.log, self.e = a, log, e
        self.shape, self.dtype, self.name = a.shape, "F32", f"expert{e}"
        self.n_rows = a.shape[0]

    def rows(self, lo, hi):
        self.log.append((self.e, lo, hi))
        return self.a[lo:hi]


def test_stacked_reads_only_the_experts_a_chunk_covers():
    from ggufq.arch.moe import StackedSource
    rng = np.random.default_rng(0)
    parts = [rng.standard_normal((6, 4)).astype(np.float32) for _ in range(5)]
    log: list = []
    s = StackedSource("x", [Counting(p, log, e) for e, p in enumerate(parts)])
    assert s.shape == (5, 6, 4) and s.n_rows == 30
    full = np.concatenate(parts)
    for lo, hi in ((0, 30), (4, 9), (6, 12), (13, 14), (11, 25)):
        log.clear()
        np.testing.assert_array_equal(s.rows(lo, hi), full[lo:hi])
        want = [(e, max(lo, 6 * e) - 6 * e, min(hi, 6 * e + 6) - 6 * e) for e in range(5)
                if 6 * e < hi and 6 * e + 6 > lo]
        assert log == want


def test_fused_gate_up_halves():
    from ggufq.arch.moe import ExpertHalf
    a = np.arange(3 * 8 * 2, dtype=np.float32).reshape(3, 8, 2)

    class Src:
        name, dtype, shape = "gate_up", "F32", a.shape

        def rows(self, lo, hi):
            return a.reshape(-1, 2)[lo:hi]
    for half in (0, 1):
        h = ExpertHalf(Src(), half)
        want = a[:, half * 4:(half + 1) * 4].reshape(-1, 2)
        np.testing.assert_array_equal(h.rows(0, 12), want)
        np.testing.assert_array_equal(h.rows(3, 9), want[3:9])


@pytest.mark.parametrize("fam", ["mixtral", "qwen2moe", "olmoe"])
def test_f32_logits_match_reference(fam, tmp_path):
    pytest.importorskip("llama_cpp")
    from ggufq_ref.llama_worker import llama_logits
    from ggufq_ref.forward import Reference
    d = make_moe(tmp_path / fam, fam, shared_ff=128, **{**SMALL, "kv_heads": None})   # OLMoE: multi-head
    out = tmp_path / f"{fam}.gguf"
    r = run_cli("convert", d, "-o", out, "--type", "F32", "-q")
    assert r.returncode == 0, r.stderr
    cfg = json.loads((d / "config.json").read_text())
    ids = [cfg["bos_token_id"]] + list(np.random.default_rng(5).integers(3, 8000, 31))
    ref = Reference(d).logits(ids).astype(np.float64)
    got = llama_logits(out, ids).astype(np.float64)
    err = (np.linalg.norm(got - ref, axis=1) / np.linalg.norm(ref, axis=1)).max()
    assert err < TOL, err


def test_fp8_tables_match_torch():
    torch = pytest.importorskip("torch")
    from ggufq.source_fp8 import TABLES, fp8_encode
    x = (np.random.default_rng(1).standard_normal(20000) * 30).astype(np.float32)
    for name, dt in (("F8_E4M3", torch.float8_e4m3fn), ("F8_E5M2", torch.float8_e5m2)):
        t = torch.arange(256, dtype=torch.uint8).view(dt).float().numpy()
        np.testing.assert_array_equal(t, TABLES[name])
        np.testing.assert_array_equal(fp8_encode(x, name), torch.from_numpy(x).to(dt).view(torch.uint8).numpy())


@pytest.mark.parametrize("fp8,block", [("e4m3", (128, 128)), ("e4m3", (32, 48)), ("e5m2", None)])
def test_fp8_row_chunks_equal_whole_tensor_dequant(fp8, block, tmp_path):
    from ggufq.source import open_model
    from ggufq.source_fp8 import TABLES, Fp8Tensor
    d = make_moe(tmp_path / "m", "mixtral", fp8=fp8, block=block, **{**SMALL, "hidden": 200, "ff": 96})
    m = open_model(d)
    assert not any(n.endswith("_scale_inv") for n in m.tensors)
    name = "model.layers.1.block_sparse_moe.experts.3.w2.weight"     # [200, 96]: partial blocks
    t = m[name]
    assert isinstance(t, Fp8Tensor)
    raw = t.path.read_bytes()      # the codes straight from the file, not through the reader under test
    codes = np.frombuffer(raw[t.offset:t.offset + t.nbytes], np.uint8).reshape(t.shape)
    s = t.scale.read_all()
    if block is None:
        full = TABLES[t.dtype][codes] * s.reshape(())
    else:
        rep = np.repeat(np.repeat(s, block[0], 0), block[1], 1)[:t.shape[0], :t.shape[1]]
        full = TABLES[t.dtype][codes] * rep
    with m:
        for lo, hi in ((0, 200), (0, 1), (31, 97), (127, 129), (150, 200)):
            np.testing.assert_array_equal(t.rows(lo, hi), full[lo:hi])


def test_fp8_logits_match_reference_of_dequantized_weights(tmp_path):
    """The FP8 checkpoint's F32 GGUF in llama.cpp vs the reference forward on a BF16-free F32 copy
    of the same dequantized weights (written by the test from whole-tensor numpy products)."""
    pytest.importorskip("llama_cpp")
    from ggufq_ref.llama_worker import llama_logits
    from ggufq_ref.forward import Reference
    from ggufq.source import open_model
    from ggufq_ref.st_writer import write_safetensors
    d = make_moe(tmp_path / "fp8", "mixtral", fp8="e4m3", block=(32, 32), **SMALL)
    m = open_model(d)
    ref_dir = tmp_path / "f32"
    ref_dir.mkdir()
    with m:
        write_safetensors(ref_dir / "model.safetensors", {n: (t.read_all(), "F32") for n, t in m.tensors.items()})
    cfg = json.loads((d / "config.json").read_text())
    cfg.pop("quantization_config")
    (ref_dir / "config.json").write_text(json.dumps(cfg))
    out = tmp_path / "fp8.gguf"
    r = run_cli("convert", d, "-o", out, "--type", "F32", "-q")
    assert r.returncode == 0, r.stderr
    ids = [cfg["bos_token_id"]] + list(np.random.default_rng(5).integers(3, 8000, 31))
    ref = Reference(ref_dir).logits(ids).astype(np.float64)
    got = llama_logits(out, ids).astype(np.float64)
    err = (np.linalg.norm(got - ref, axis=1) / np.linalg.norm(ref, axis=1)).max()
    assert err < TOL, err


# ---- bad input ----------------------------------------------------------------------------------
def _drop(name):
    return lambda ts: [t for t in ts if t[0] != name]


def _reshape(name, shape):
    return lambda ts: [(n, shape if n == name else s, i, f) for n, s, i, f in ts]


@pytest.mark.parametrize("case,kw,must", [
    ("missing expert", dict(mutate=_drop("model.layers.1.block_sparse_moe.experts.5.w3.weight")),
     "experts.5.w3.weight is missing (7 of 8 experts present)"),
    ("unequal experts", dict(mutate=_reshape("model.layers.0.block_sparse_moe.experts.2.w1.weight", (32, 64))),
     "experts of unequal shapes"),
    ("expert past count", dict(config_extra={"num_local_experts": 6}), "config.json has 6 experts"),
    ("top-k past count", dict(config_extra={"num_experts_per_tok": 9}), "num_experts_per_tok = 9 for 8 experts"),
    ("unknown quant", dict(config_extra={"quantization_config": {"quant_method": "gptq", "bits": 4}}),
     "quantized with quant_method 'gptq'"),
    ("fp8 without config", dict(fp8="e4m3", config_extra={"quantization_config": None}),
     "is F8_E4M3 but config.json has no quantization_config"),
])
def test_bad_moe_input(case, kw, must, tmp_path):
    d = make_moe(tmp_path / "m", "mixtral", **{**SMALL, **kw})
    out = tmp_path / "out"
    out.mkdir()
    _fails(["convert", d, "-o", out / "x.gguf"], out, must_contain=must)


def _edit_header(d, fn):
    """Rewrite the safetensors headers of a folder through fn(header); the data of the tensors left
    is repacked back to back (a dropped tensor leaves no hole, which ggufq refuses as malformed)."""
    import struct
    for p in sorted(d.glob("*.safetensors")):
        raw = p.read_bytes()
        (n,) = struct.unpack("<Q", raw[:8])
        h = json.loads(raw[8:8 + n])
        fn(h)
        data, pos = [], 0
        for name, t in sorted(((k, v) for k, v in h.items() if k != "__metadata__"),
                              key=lambda kv: kv[1]["data_offsets"][0]):
            a, b = t["data_offsets"]
            data.append(raw[8 + n + a:8 + n + b])
            t["data_offsets"] = [pos, pos + b - a]
            pos += b - a
        head = json.dumps(h, separators=(",", ":")).encode()
        head += b" " * (-len(head) % 8)
        p.write_bytes(struct.pack("<Q", len(head)) + head + b"".join(data))


def test_fp8_without_scale(tmp_path):
    d = make_moe(tmp_path / "m", "mixtral", fp8="e4m3", **SMALL)
    name = "model.layers.0.self_attn.q_proj.weight_scale_inv"
    _edit_header(d, lambda h: h.pop(name, None))
    idx = json.loads((d / "model.safetensors.index.json").read_text())
    idx["weight_map"].pop(name)
    (d / "model.safetensors.index.json").write_text(json.dumps(idx))
    out = tmp_path / "out"
    out.mkdir()
    _fails(["convert", d, "-o", out / "x.gguf"], out,
           must_contain="q_proj.weight is F8_E4M3 without its scale")


def test_fp8_scale_of_wrong_shape(tmp_path):
    d = make_moe(tmp_path / "m", "mixtral", fp8="e4m3", block=(32, 32), **SMALL)
    name = "model.layers.0.self_attn.q_proj.weight_scale_inv"   # [64, 64] in 32x32 blocks: [2, 2]

    def fn(h):
        if name in h:
            h[name]["shape"] = [4, 1]
    _edit_header(d, fn)
    out = tmp_path / "out"
    out.mkdir()
    _fails(["convert", d, "-o", out / "x.gguf"], out, must_contain="has shape [4, 1]; weight [64, 64] in blocks")


def _write_imatrix(path, entries: dict):
    """A GGUF imatrix as llama-imatrix writes it: per tensor ``in_sum2`` [n_expert, row_len] and
    ``counts`` [n_expert, 1] (3-D tensors get one row per expert)."""
    import gguf
    w = gguf.GGUFWriter(path, "imatrix")
    w.add_type("imatrix")
    w.add_array("imatrix.datasets", ["synthetic"])
    w.add_uint32("imatrix.chunk_count", 4)
    w.add_uint32("imatrix.chunk_size", 512)
    for name, (sums, counts) in entries.items():
        w.add_tensor(name + ".in_sum2", sums.astype(np.float32))
        w.add_tensor(name + ".counts", counts.astype(np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def test_per_expert_imatrix_applied_per_expert(tmp_path):
    """An imatrix with one vector per expert (llama-imatrix's layout for 3-D tensors): each expert's
    rows are encoded with its own vector, byte for byte as libggml's ggml_quantize_chunk does them."""
    from ggufq_ref import ggml_ref
    if not ggml_ref.available():
        pytest.skip("libggml (llama-cpp-python) not found")
    import gguf
    from ggufq_ref.forward import load_folder, to_float
    d = make_moe(tmp_path / "m", "mixtral", **{**SMALL, "hidden": 256, "ff": 256, "experts": 4})
    name, hf = "blk.1.ffn_down_exps.weight", "model.layers.1.block_sparse_moe.experts.{}.w2.weight"
    rng = np.random.default_rng(3)
    sums = rng.uniform(0.1, 50.0, (4, 256)).astype(np.float32)
    counts = np.array([[10], [3], [7], [0]], np.float32)     # expert 3 saw no tokens: ones, as loaded
    im = tmp_path / "imatrix.gguf"
    _write_imatrix(im, {name: (sums, counts)})
    out = tmp_path / "q.gguf"
    r = run_cli("convert", d, "-o", out, "--type", "Q4_K_M", "--imatrix", im, "-q")
    assert r.returncode == 0, r.stderr
    t = next(t for t in gguf.GGUFReader(out).tensors if t.name == name)
    qtype = gguf.GGMLQuantizationType(t.tensor_type)
    got = np.asarray(t.data).reshape(4, 256, -1)
    _, tensors = load_folder(d)
    for e in range(4):
        rows = to_float(tensors[hf.format(e)])
        imp = sums[e] / counts[e] if counts[e, 0] > 0 else np.ones(256, np.float32)
        np.testing.assert_array_equal(got[e], ggml_ref.quantize(qtype, rows, imp), err_msg=f"expert {e}")
    # the vector of another expert gives other bytes (the test can fail)
    assert not np.array_equal(got[0], ggml_ref.quantize(qtype, to_float(tensors[hf.format(0)]), sums[1] / 10))


def test_workers_reading_stacked_experts_give_the_same_bytes(tmp_path):
    """-j 2: forked workers read their own rows of the stacked expert tensors."""
    d = make_moe(tmp_path / "m", "mixtral", **{**SMALL, "hidden": 256, "ff": 256, "experts": 4})
    outs = []
    for j in ("1", "2"):
        out = tmp_path / f"j{j}.gguf"
        r = run_cli("convert", d, "-o", out, "--type", "Q4_K_M", "-j", j, "-q")
        assert r.returncode == 0, r.stderr
        outs.append(out.read_bytes())
    assert outs[0] == outs[1]


@pytest.mark.parametrize("method", ["kquant", "calibrated"])
def test_iq2_mixture_needs_a_real_imatrix_for_experts(tmp_path, method):
    """IQ2_XXS's expert tensors need an importance matrix, and self-calibration does not collect the
    inputs of llama.cpp's expert matmuls yet: one line naming --imatrix FILE, before any calibration."""
    d = make_moe(tmp_path / "m", "qwen3moe", **{**SMALL, "hidden": 256, "ff": 256})
    out = tmp_path / "out"
    out.mkdir()
    _fails(["convert", d, "-o", out / "x.gguf", "--type", "IQ2_XXS", "--method", method, "--calib-tokens", "512"],
           out, must_contain="ffn_gate_exps.weight")
