"""Mixture-of-experts archs and FP8 sources (ggufq.arch.moe, ggufq.source_fp8) on synthetic
checkpoints made by tools/synthetic_moe.py:

* stacking: a stacked tensor's row reads touch only the experts (and rows) they cover, and give
  the experts' rows in order;
* ``convert --type F32`` -> llama-cpp-python logits vs the NumPy reference forward with routing;
* FP8: the decode tables against torch's float8 types (when torch is installed), row-chunk
  dequantization against a whole-tensor ``codes * repeat(scale)``, logits of an FP8 checkpoint's
  F32 conversion against the BF16 reference forward of the same dequantized weights;
* bad input: a missing expert, unequal expert shapes, an FP8 tensor without its scale, a scale of
  the wrong shape, an unsupported quant_method -> one ``ggufq: error:`` line, exit 1, nothing written;
* self-calibration of expert tensors (llama.cpp's MUL_MAT_ID): per-expert token counts and input
  moments against the reference routing; an IQ2_XXS MoE without --imatrix, its saved imatrix;
* gpt-oss: MXFP4 blocks repacked value for value, copied into the F16 / MXFP4_MOE files, requantized
  for a K-quant mixture, generation through llama-cpp-python, bad MXFP4 input.

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


@pytest.mark.parametrize("fam,kw,must", [
    ("qwen3moe", dict(mutate=_drop("model.layers.1.mlp.experts.7.down_proj.weight")),
     "experts.7.down_proj.weight is missing (7 of 8 experts present)"),
    ("mixtral", dict(fp8="e4m3", mutate=_drop("model.layers.0.block_sparse_moe.experts.2.w2.weight")),
     "experts.2.w2.weight is missing (7 of 8 experts present)"),
    ("mixtral", dict(config_extra={"quantization_config": {"quant_method": "awq", "bits": 4}}),
     "quant_method 'awq'"),
    ("mixtral", dict(config_extra={"quantization_config": {"quant_method": "compressed-tensors"}}),
     "quant_method 'compressed-tensors'"),
    ("mixtral", dict(config_extra={"quantization_config": {"quant_method": "bitsandbytes", "load_in_4bit": True}}),
     "quant_method 'bitsandbytes'"),
])
def test_bad_moe_input_other_archs(fam, kw, must, tmp_path):
    """The bad-input list on Qwen's layout (mlp.experts.N.*_proj; one case: its synthetic BPE tokenizer
    takes ~20 s to write here), an FP8 checkpoint missing an expert, and the source quantizations ggufq
    does not read (the line says what it reads)."""
    d = make_moe(tmp_path / "m", fam, **{**SMALL, **({"vocab": 4096} if fam.startswith("qwen") else {}), **kw})
    out = tmp_path / "out"
    out.mkdir()
    line = _fails(["convert", d, "-o", out / "x.gguf"], out, must_contain=must)
    if "quant_method" in must:
        assert "ggufq reads FP8" in line and "MXFP4" in line and "BF16, F16 and F32" in line


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


# ---- self-calibration of expert tensors (MUL_MAT_ID) -------------------------------------------
def _routed_reference(d):
    """The reference forward recording, per (layer, GGUF role, expert), the rows each expert's
    gate/up and down matrices read."""
    from ggufq_ref.forward import Reference

    class Routed(Reference):
        seen: dict = {}

        def _mlp(self, h, gate, up, down):
            if ".experts." in gate:
                _, _, layer, _, _, e, _ = gate.split(".")
                g = self._linear(h, gate)
                x = g / (1 + np.exp(-g)) * self._linear(h, up)
                self.seen.setdefault((int(layer), "ffn_gate_exps", int(e)), []).append(h)
                self.seen.setdefault((int(layer), "ffn_down_exps", int(e)), []).append(x)
            return super()._mlp(h, gate, up, down)
    r = Routed(d)
    r.seen = {}
    return r


def test_expert_moments_per_expert_equal_the_reference_routing(tmp_path):
    """Given tokens decoded by llama.cpp (F16 temporary model): for each stacked expert tensor, the
    tokens routed to each expert and the mean of their squared inputs (llama-imatrix's MUL_MAT_ID
    branch) agree with the NumPy reference forward's routing of the HF weights."""
    pytest.importorskip("llama_cpp")
    from ggufq import calib
    d = make_moe(tmp_path / "m", "mixtral", **SMALL)
    toks = np.random.default_rng(4).integers(3, 8000, (2, 40))
    ref = _routed_reference(d)
    for row in toks:
        ref.logits(row)
    with calib.calibrate_folder(d, tmp_path, tokens=toks, jobs=1, progress=False) as c:
        assert c.covers("blk.0.ffn_gate_exps.weight") and c.key("blk.0.ffn_gate_exps.weight") == \
            c.key("blk.0.ffn_up_exps.weight") != c.key("blk.0.ffn_down_exps.weight")
        diags = c.diagonals()
        for layer in range(2):
            for role in ("ffn_gate_exps", "ffn_down_exps"):
                sums, counts = diags[f"blk.{layer}.{role}.weight"]
                assert sums.shape == (8, 64) and counts.sum() == toks.size * 2
                want_n = np.array([sum(len(x) for x in ref.seen.get((layer, role, e), [])) for e in range(8)])
                assert np.abs(counts - want_n).sum() <= 4, (layer, role, counts, want_n)   # near-ties in F16
                mean = c.moment(f"blk.{layer}.{role}.weight").reshape(8, 64)
                for e in range(8):
                    if want_n[e] >= 8 and counts[e] == want_n[e]:
                        x = np.concatenate(ref.seen[(layer, role, e)]).astype(np.float64)
                        want = (x * x).mean(0)
                        assert np.abs(mean[e] - want).max() / want.max() < 2e-2, (layer, role, e)


def test_iq2_mixture_of_a_moe_calibrates_its_experts(tmp_path):
    """IQ2_XXS needs an importance matrix for the expert tensors too: without --imatrix ggufq calibrates
    itself through llama.cpp, its expert matmuls included; the saved imatrix has one row and one count
    per expert (llama-imatrix's layout), gives the same file through --imatrix, llama-quantize takes it
    for the expert tensors, and llama-cpp-python loads the result."""
    import gguf
    import subprocess
    from conftest import LLAMA_BIN
    pytest.importorskip("llama_cpp")
    d = make_moe(tmp_path / "m", "mixtral", **{**SMALL, "hidden": 256, "ff": 256, "layers": 1, "experts": 4})
    out, im = tmp_path / "iq2.gguf", tmp_path / "im.gguf"
    r = run_cli("convert", d, "-o", out, "--type", "IQ2_XXS", "--calib-tokens", "512", "--save-imatrix", im)
    assert r.returncode == 0, r.stderr
    assert "experts: per-expert diagonal moments" in r.stderr
    ts = {t.name: t for t in gguf.GGUFReader(im).tensors}
    assert ts["blk.0.ffn_up_exps.weight.in_sum2"].data.shape == (4, 256)
    counts = np.asarray(ts["blk.0.ffn_up_exps.weight.counts"].data).reshape(-1)
    assert counts.shape == (4,) and counts.sum() == 512 * 2
    assert gguf.GGMLQuantizationType(
        next(t for t in gguf.GGUFReader(out).tensors if t.name == "blk.0.ffn_gate_exps.weight").tensor_type
    ) == gguf.GGMLQuantizationType.IQ2_XXS
    again = tmp_path / "again.gguf"
    r = run_cli("convert", d, "-o", again, "--type", "IQ2_XXS", "--imatrix", im, "-q")
    assert r.returncode == 0, r.stderr
    a, b = gguf.GGUFReader(out), gguf.GGUFReader(again)
    for x, y in zip(a.tensors, b.tensors):
        assert x.name == y.name and np.asarray(x.data).tobytes() == np.asarray(y.data).tobytes(), x.name
    from ggufq_ref.llama_worker import llama_logits
    assert np.isfinite(llama_logits(out, list(range(10, 30)))).all()
    tool = LLAMA_BIN / "llama-quantize"
    if tool.exists():
        f16 = tmp_path / "f16.gguf"
        assert run_cli("convert", d, "-o", f16, "--type", "F16", "-q").returncode == 0
        q = subprocess.run([str(tool), "--imatrix", str(im), str(f16), str(tmp_path / "lq.gguf"), "IQ2_XXS", "2"],
                           capture_output=True, text=True)
        assert q.returncode == 0, q.stderr[-1500:]
        assert "did not find weights for blk.0.ffn_gate_exps" not in q.stdout + q.stderr


def test_expert_data_free_importance_is_the_dense_formula_per_expert(tmp_path):
    """ggufq.importance for stacked experts: gate/up get the FFN norm's gamma^2 for every expert; expert
    e's ffn_down_exps vector is the dense ffn_down proxy of expert e's own HF w1 / w3."""
    from ggufq.convert import prepare
    from ggufq.importance import importance_for, silu_sq_mean
    from ggufq_ref.forward import load_folder, to_float
    d = make_moe(tmp_path / "m", "mixtral", **SMALL)
    p = prepare(d)
    with p.model:
        free = importance_for(p)
    _, t = load_folder(d)
    for layer in range(2):
        pre = f"model.layers.{layer}."
        gamma = to_float(t[pre + "post_attention_layernorm.weight"]).astype(np.float64)
        for role in ("gate", "up"):
            np.testing.assert_allclose(free[f"blk.{layer}.ffn_{role}_exps.weight"], np.tile(gamma ** 2, 8), rtol=1e-6)
        down = free[f"blk.{layer}.ffn_down_exps.weight"].reshape(8, 64)
        for e in range(8):
            g = to_float(t[pre + f"block_sparse_moe.experts.{e}.w1.weight"]).astype(np.float64) * gamma
            u = to_float(t[pre + f"block_sparse_moe.experts.{e}.w3.weight"]).astype(np.float64) * gamma
            want = (u * u).sum(1) * silu_sq_mean(np.sqrt((g * g).sum(1)))
            np.testing.assert_allclose(down[e], want, rtol=1e-5)


def test_experts_with_few_tokens_fall_back_to_data_free_importance(tmp_path):
    """--method calibrated on a MoE: an expert the sample routed fewer than FEW_EXPERT_TOKENS tokens to is
    weighted by its data-free importance (scaled to the well-sampled experts' level), the others by
    their measured E[x^2]; the saved imatrix keeps the raw sums and counts; the summary counts them."""
    pytest.importorskip("llama_cpp")
    from ggufq import calib
    from ggufq.convert import prepare
    from ggufq.importance import importance_for
    d = make_moe(tmp_path / "m", "mixtral", **SMALL)
    p = prepare(d)
    with p.model:
        free = importance_for(p)
    toks = np.random.default_rng(4).integers(3, 8000, (1, 48))     # 96 routings over 8 experts
    with calib.calibrate_folder(d, tmp_path, tokens=toks, jobs=1, progress=False) as c:
        names = [f"blk.{i}.ffn_{r}_exps.weight" for i in range(2) for r in ("gate", "up", "down")]
        measured = {n: c.moment(n).reshape(8, 64) for n in names}
        diags = c.diagonals()
        assert "got no token: weighted uniformly" in c.summary()
        c.use_data_free(free)
        n_few = 0
        for n in names:
            sums, counts = diags[n]
            few = counts < calib.FEW_EXPERT_TOKENS
            assert few.any() and (~few).any(), (n, counts)
            got = c.moment(n).reshape(8, 64)
            np.testing.assert_array_equal(got[~few], measured[n][~few])
            fb = free[n].reshape(8, 64)[few]
            np.testing.assert_allclose(got[few], fb * (measured[n][~few].mean() / fb.mean(axis=1, keepdims=True)),
                                       rtol=1e-5)
            np.testing.assert_array_equal(c.diagonals()[n][1], counts)      # the imatrix keeps the counts
            n_few += int(few.sum()) if not n.endswith("up_exps.weight") else 0   # gate and up: one input
        assert f"over 32 expert slots, {n_few} got fewer than {calib.FEW_EXPERT_TOKENS} tokens" in c.summary()
        assert "data-free importance for those" in c.summary()


def test_calibrated_method_encodes_few_token_experts_with_data_free_importance(tmp_path):
    """End to end through convert (--method calibrated, a given calibration sample): each expert's rows of
    a stacked tensor are the calibrated encoder's bytes under that expert's vector -- the data-free one
    for experts with few tokens, which gives other bytes than their sparse moments would."""
    pytest.importorskip("llama_cpp")
    import gguf
    from ggufq import calib
    from ggufq.convert import convert
    from ggufq.quant import hqq
    from ggufq.source import open_model
    d = make_moe(tmp_path / "m", "mixtral", **{**SMALL, "hidden": 256, "ff": 256, "layers": 1})
    toks = np.random.default_rng(4).integers(3, 8000, (1, 48))
    with calib.calibrate_folder(d, tmp_path, tokens=toks, jobs=1, progress=False) as c:
        sparse = c.moment("blk.0.ffn_up_exps.weight").reshape(8, 256)
        out = tmp_path / "q.gguf"
        notes = convert(d, out, "Q4_K_M", method="calibrated", calibration=c, progress=False).notes
        counts = c.diagonals()["blk.0.ffn_up_exps.weight"][1]
        vec = c.moment("blk.0.ffn_up_exps.weight").reshape(8, 256)
    assert any("data-free importance for those" in line for line in notes), notes
    t = _tensor(out, "blk.0.ffn_up_exps.weight")
    qtype = gguf.GGMLQuantizationType(t.tensor_type)
    got = np.asarray(t.data).reshape(8, 256, -1)
    few = counts < calib.FEW_EXPERT_TOKENS
    assert few.any() and (~few).any(), counts
    m = open_model(d)
    with m:
        for e in range(8):
            rows = m.tensors[f"model.layers.0.block_sparse_moe.experts.{e}.w3.weight"].read_all()
            assert got[e].tobytes() == hqq.encode_hqq(qtype, rows, vec[e]).tobytes(), e
            if few[e]:
                assert got[e].tobytes() != hqq.encode_hqq(qtype, rows, sparse[e]).tobytes(), e


# ---- gpt-oss: MXFP4 experts ------------------------------------------------------------------
from tools.synthetic_gptoss import make_gpt_oss  # noqa: E402

GPT_OSS_SMALL = dict(hidden=64, ff=64, layers=2, heads=4, kv_heads=2, experts=4, active=2, shards=2, seed=3,
                     tokenizer="spm")
FP4 = np.array([0, .5, 1, 1.5, 2, 3, 4, 6, -0., -.5, -1, -1.5, -2, -3, -4, -6], np.float32)   # HF's FP4_VALUES


def _hf_mxfp4_values(blocks: np.ndarray, scales: np.ndarray) -> np.ndarray:
    """transformers' convert_moe_packed_tensors: code 2j low nibble, 2j+1 high, times 2^(scale - 127)."""
    codes = np.stack([blocks & 15, blocks >> 4], axis=-1).reshape(*blocks.shape[:-1], 32)
    v = FP4[codes] * np.ldexp(np.float32(1), scales.astype(np.int32) - 127)[..., None]
    return v.reshape(*blocks.shape[:-2], -1)


def test_mxfp4_repack_keeps_every_value():
    """HF's nibble order -> ggml's block_mxfp4: gguf-py decodes the repacked bytes to exactly the values
    transformers decodes from the checkpoint's blocks and scales; and the repack inverts."""
    import gguf
    from ggufq.source_mxfp4 import dequantize, ggml_to_hf_blocks, hf_to_ggml_blocks
    rng = np.random.default_rng(0)
    blocks = rng.integers(0, 256, (6, 3, 16), dtype=np.uint8)
    scales = rng.integers(110, 135, (6, 3), dtype=np.uint8)
    raw = hf_to_ggml_blocks(blocks, scales)
    want = _hf_mxfp4_values(blocks, scales)
    np.testing.assert_array_equal(gguf.quants.dequantize(raw, gguf.GGMLQuantizationType.MXFP4), want)
    np.testing.assert_array_equal(dequantize(raw), want)
    b2, s2 = ggml_to_hf_blocks(raw, 3)
    assert np.array_equal(b2, blocks) and np.array_equal(s2, scales)


def _tensor(path, name):
    import gguf
    return next(t for t in gguf.GGUFReader(path).tensors if t.name == name)


def test_gpt_oss_mxfp4_experts_copied_and_generate(tmp_path):
    """F16 of an MXFP4 checkpoint: expert tensors are MXFP4 holding the checkpoint's blocks (gate and up
    de-interleaved), general.file_type MOSTLY_MXFP4_MOE, llama.cpp's gpt-oss keys; llama-cpp-python
    loads it and generates. --type MXFP4_MOE copies the same bytes."""
    import gguf
    from ggufq.source import open_model
    from ggufq.source_mxfp4 import hf_to_ggml_blocks
    d = make_gpt_oss(tmp_path / "g", **GPT_OSS_SMALL)
    out = tmp_path / "f16.gguf"
    r = run_cli("convert", d, "-o", out, "--type", "F16", "-q")
    assert r.returncode == 0, r.stderr
    rd = gguf.GGUFReader(out)
    kv = {f.name: f.contents() for f in rd.fields.values() if not f.name.startswith("tokenizer.ggml.")}
    assert kv["general.file_type"] == int(gguf.LlamaFileType.MOSTLY_MXFP4_MOE)
    assert kv["gpt-oss.attention.sliding_window"] == 128 and kv["gpt-oss.expert_feed_forward_length"] == 64
    assert kv["gpt-oss.rope.scaling.type"] == "yarn" and kv["gpt-oss.expert_used_count"] == 2
    src = open_model(d).tensors["model.layers.1.mlp.experts.gate_up_proj"]      # [4, 128, 64] as blocks

    def stored(t):
        return np.frombuffer(t.path.read_bytes()[t.offset:t.offset + t.nbytes], np.uint8)
    raw = hf_to_ggml_blocks(stored(src).reshape(4 * 128, 2, 16), stored(src.scales).reshape(4 * 128, 2))
    raw = raw.reshape(4, 128, 34)
    for name, half in (("blk.1.ffn_gate_exps.weight", 0), ("blk.1.ffn_up_exps.weight", 1)):
        t = _tensor(out, name)
        assert gguf.GGMLQuantizationType(t.tensor_type) == gguf.GGMLQuantizationType.MXFP4
        assert np.asarray(t.data).tobytes() == raw[:, half::2].tobytes(), name
    for name in ("blk.0.attn_sinks.weight", "blk.0.ffn_gate_exps.bias", "blk.0.ffn_gate_inp.weight"):
        assert gguf.GGMLQuantizationType(_tensor(out, name).tensor_type) == gguf.GGMLQuantizationType.F32
    mx = tmp_path / "mx.gguf"
    r = run_cli("convert", d, "-o", mx, "--type", "MXFP4_MOE", "-q")
    assert r.returncode == 0, r.stderr
    for name in ("blk.0.ffn_down_exps.weight", "blk.1.ffn_up_exps.weight"):
        assert np.asarray(_tensor(mx, name).data).tobytes() == np.asarray(_tensor(out, name).data).tobytes()
    assert gguf.GGMLQuantizationType(_tensor(mx, "blk.0.attn_q.weight").tensor_type) == gguf.GGMLQuantizationType.Q8_0
    pytest.importorskip("llama_cpp")
    from ggufq_ref.llama_worker import llama_generate, llama_logits
    ids = llama_generate(out, [1, 2, 3, 4], 8)
    assert len(ids) == 8
    logits = llama_logits(mx, list(range(10, 40)))
    assert np.isfinite(logits).all() and logits.std() > 0


def test_gpt_oss_requantized_experts(tmp_path):
    """--type Q4_K_M: the MXFP4 experts are dequantized and quantized again as the mixture chooses
    (what llama-quantize --allow-requantize does; the plan says so); the file loads in llama.cpp."""
    import gguf
    from ggufq.source import open_model
    from ggufq.quant import encode
    d = make_gpt_oss(tmp_path / "g", **{**GPT_OSS_SMALL, "hidden": 256, "ff": 256})
    r = run_cli("plan", d, "--type", "Q4_K_M")
    assert r.returncode == 0, r.stderr
    assert "dequantized from MXFP4" in r.stdout + r.stderr
    out = tmp_path / "q.gguf"
    r = run_cli("convert", d, "-o", out, "--type", "Q4_K_M", "-q")
    assert r.returncode == 0, r.stderr
    t = _tensor(out, "blk.0.ffn_down_exps.weight")
    qtype = gguf.GGMLQuantizationType(t.tensor_type)
    assert qtype not in (gguf.GGMLQuantizationType.MXFP4, gguf.GGMLQuantizationType.F16)
    m = open_model(d)
    with m:
        rows = m.tensors["model.layers.0.mlp.experts.down_proj"].rows(0, 4 * 256)
    assert np.asarray(t.data).tobytes() == encode(qtype, rows).tobytes()
    pytest.importorskip("llama_cpp")
    from ggufq_ref.llama_worker import llama_logits
    assert np.isfinite(llama_logits(out, list(range(10, 30)))).all()


def _edit_gpt_oss(stored, fn):
    return [s for s in (fn(*s) for s in stored) if s is not None]


@pytest.mark.parametrize("case,fn,must", [
    ("scales missing", lambda n, dt, sh, b: None if n == "model.layers.0.mlp.experts.down_proj_scales" else (n, dt, sh, b),
     "down_proj_blocks has no scales model.layers.0.mlp.experts.down_proj_scales"),
    ("scales misshapen", lambda n, dt, sh, b: (n, dt, (sh[0], sh[1] * 2, 1), b) if n.endswith("0.mlp.experts.down_proj_scales")
     else (n, dt, sh, b), "have shape [4, 128, 1]; blocks [4, 64, 2, 16] need [4, 64, 2]"),
    ("blocks not U8", lambda n, dt, sh, b: (n, "I8", sh, b) if n.endswith("0.mlp.experts.down_proj_blocks")
     else (n, dt, sh, b), "has dtype I8; blocks and scales are U8"),
    ("bias missing", lambda n, dt, sh, b: None if n == "model.layers.1.mlp.experts.down_proj_bias" else (n, dt, sh, b),
     "down_proj.bias is missing (GGUF blk.1.ffn_down_exps.bias)"),
])
def test_bad_gpt_oss_input(case, fn, must, tmp_path):
    d = make_gpt_oss(tmp_path / "g", **{**GPT_OSS_SMALL, "shards": 1}, mutate=lambda st: _edit_gpt_oss(st, fn))
    out = tmp_path / "out"
    out.mkdir()
    _fails(["convert", d, "-o", out / "x.gguf"], out, must_contain=must)


# ---- gpt-oss: logits against the NumPy reference forward -----------------------------------------
def _max_rel(got, ref):
    ref = ref.astype(np.float64)
    return (np.linalg.norm(got - ref, axis=1) / np.linalg.norm(ref, axis=1)).max()


def test_gpt_oss_f32_logits_match_reference(tmp_path):
    """F32 GGUFs of a gpt-oss checkpoint (sliding window 8 over 32 tokens: both attention kinds act)
    through llama-cpp-python vs ggufq_ref's gpt-oss forward (sinks, clamped SwiGLU, yarn, biases,
    softmax after top-k). Max rel. error <= 1e-4 against the reference with llama.cpp's two deviations
    from transformers (ggufq_ref.forward.LlamaCppDeviations); without them, measured here so that a
    change in llama.cpp shows: yarn correction dims rounded (2e-3), Q8_0 activations into MXFP4 expert
    matmuls (1e-2, 0.2 at the worst position). BF16 experts become F32 tensors (no activation
    rounding); MXFP4 experts stay MXFP4 in the F32 file."""
    pytest.importorskip("llama_cpp")
    from ggufq_ref.forward import LlamaCppDeviations, Reference
    from ggufq_ref.llama_worker import llama_logits
    kw = {**GPT_OSS_SMALL, "window": 8}
    ids = [1] + list(np.random.default_rng(5).integers(3, 8000, 31))
    got, d = {}, {}
    for layout in ("bf16", "mxfp4"):
        d[layout] = make_gpt_oss(tmp_path / layout, bf16=layout == "bf16", **kw)
        out = tmp_path / f"{layout}.gguf"
        r = run_cli("convert", d[layout], "-o", out, "--type", "F32", "-q")
        assert r.returncode == 0, r.stderr
        got[layout] = llama_logits(out, ids).astype(np.float64)
    as_hf = Reference(d["bf16"]).logits(ids)
    # the MXFP4 checkpoint's decoded experts are the BF16 one's values
    np.testing.assert_allclose(Reference(d["mxfp4"]).logits(ids), as_hf, atol=1e-4 * np.abs(as_hf).max())
    assert _max_rel(got["bf16"], as_hf) > 1e-3
    assert _max_rel(got["bf16"], LlamaCppDeviations(d["bf16"]).logits(ids)) <= TOL
    assert _max_rel(got["mxfp4"], Reference(d["mxfp4"]).logits(ids)) > 1e-3
    assert _max_rel(got["mxfp4"], LlamaCppDeviations(d["mxfp4"]).logits(ids)) <= TOL


def test_gpt_oss_token_embd_weights_read_its_mlp_norm(tmp_path):
    """token_embd's data-free column weights (importance.residual_readers) sum every norm that reads the
    residual stream; gpt-oss names its MLP's norm post_attention_norm, and that one counts too."""
    from ggufq.convert import prepare
    from ggufq.importance import importance_for
    p = prepare(make_gpt_oss(tmp_path / "g", **GPT_OSS_SMALL))
    ts = {t.name: t for t in p.tensors}
    with p.model:
        free = importance_for(p)
        norms = [ts[n].read(0, 1).reshape(-1).astype(np.float64) ** 2 for n in ts
                 if n.endswith(("attn_norm.weight", "post_attention_norm.weight")) or n == "output_norm.weight"]
    assert len(norms) == 2 * p.info.n_layer + 1
    np.testing.assert_allclose(free["token_embd.weight"], sum(g2 / g2.mean() for g2 in norms), rtol=1e-5)
