"""calib: self-calibration through llama.cpp (llama-cpp-python worker, cb_eval moments), the
self-generated sample, --save-imatrix, and the failure paths."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from ggufq import GgufqError, calib, vocab as vocabs
from ggufq.convert import prepare
from ggufq_ref.forward import Reference

pytest.importorskip("llama_cpp")


def _rel(a, b):
    return np.abs(a - b).max() / np.abs(b).max()


@pytest.fixture(scope="module")
def tiny_p(tiny):
    return prepare(tiny)


def _cal(tiny, where, n=2048, **kw):
    kw.setdefault("jobs", 1)
    kw.setdefault("progress", False)
    return calib.calibrate_folder(tiny, where, n, seq_len=kw.pop("seq_len", 128), **kw)


@pytest.fixture(scope="module")
def sample(tiny, tmp_path_factory):
    """8 x 128 tokens tinyllama wrote itself through llama.cpp, with their moments."""
    c = _cal(tiny, tmp_path_factory.mktemp("cal"), 1024, seed=7)
    yield c
    c.close()


def test_sample_is_seeded_and_reproducible(tiny, sample, tmp_path):
    assert sample.tokens.shape == (8, 128) and (sample.tokens[:, 0] == 1).all()
    assert len({tuple(r) for r in sample.tokens}) == 8          # temperature 1: the sequences differ
    with _cal(tiny, tmp_path, 1024, seed=7) as again, _cal(tiny, tmp_path, 1024, seed=8) as other:
        assert np.array_equal(again.tokens, sample.tokens)
        assert not np.array_equal(other.tokens[:, 1:4], sample.tokens[:, 1:4])
        for name in ("blk.0.attn_q.weight", "blk.3.ffn_down.weight", "output.weight"):
            assert np.array_equal(again.moment(name), sample.moment(name)), name
    assert not list(tmp_path.iterdir())              # close() removed the scratch folders


def test_rounds_of_sequences_give_the_same_sample(tiny, sample, tmp_path):
    """A KV budget for 3 sequences: 8 sequences in 3 rounds; each sequence has its own random
    stream, so the sample does not depend on how many are decoded together."""
    per_seq = 8 * 128 * 2 * 2 * 2 * 64                # layers * n_tok * (K, V) * f16 * kv heads * head dim
    with _cal(tiny, tmp_path, 1024, seed=7, kv_bytes=3 * per_seq) as c:
        assert c.stats["n_par"] == 3
        same = (c.tokens == sample.tokens).mean()
        assert same > 0.95, same                      # batch shape may move a logit by an ulp
        assert c.count == sample.count == 8 * 128


def test_self_generated_text_reads_like_the_training_text(tiny, sample):
    """tinyllama was trained on dictionary entries: its own samples have the entry markup."""
    import sentencepiece as spm
    sp = spm.SentencePieceProcessor(model_file=str(tiny / "tokenizer.model"))
    text = " ".join(sp.decode([int(t) for t in r[1:]]) for r in sample.tokens)
    assert "Webster" in text or "\\" in text, text[:300]


def test_moments_of_shared_inputs_are_shared(sample):
    """q/k/v read one graph tensor (attn_norm-i), gate/up another: one moment each; ffn_down
    has its diagonal only; the token embedding is a lookup and has none."""
    assert sample.key("blk.0.attn_q.weight") == sample.key("blk.0.attn_k.weight") == sample.key("blk.0.attn_v.weight")
    assert sample.key("blk.0.ffn_gate.weight") == sample.key("blk.0.ffn_up.weight")
    assert sample.key("blk.0.attn_q.weight") != sample.key("blk.1.attn_q.weight")
    assert sample.moment("blk.2.ffn_down.weight").ndim == 1
    assert sample.moment("blk.2.attn_output.weight").ndim == 2
    assert not sample.covers("token_embd.weight")
    n_full = len({k for k, (_, _, kind) in sample.index["keys"].items() if kind == "full"})
    assert n_full == 8 * 3 + 1                         # attn in, attn out, ffn in per layer + output


def test_buffered_inputs_sum_to_their_moment(tmp_path):
    """Full-moment inputs are copied into buffers kept from flush to flush (grown when a decode's
    rows do not fit): the sums equal X^T X of every row, however the rows arrive and are flushed."""
    from ggufq.calib_worker import Collector
    col = Collector({}, str(tmp_path / "scratch.f64"), 1 << 20)
    keys = (b"attn_norm-0", b"ffn_norm-0")
    for k in keys:
        col.kind[k], col.width[k] = "full", 8
    rng = np.random.default_rng(0)
    xs = [rng.standard_normal((r, 8)).astype(np.float32) for r in (3, 5, 1, 7, 4, 6)]
    for i, x in enumerate(xs):
        for k in keys:
            col._buffer(k, x[:, ::-1] if k == keys[1] else x)     # a strided view is copied as well
        if i == 0:
            col.reserve_rows = 6                                  # known after the first decode
        if col.buffered_tokens() >= 6:
            col.flush()
    col.flush(final=True)
    x = np.concatenate(xs).astype(np.float64)
    np.testing.assert_allclose(col.acc[keys[0]], x.T @ x, rtol=1e-5)
    np.testing.assert_allclose(col.acc[keys[1]], x[:, ::-1].T @ x[:, ::-1], rtol=1e-5)
    assert col.count == 26 and not col.bufs


class _Collect(Reference):
    """The reference forward, recording every linear layer's inputs (HF -> GGUF names)."""
    HF2G = {"self_attn.q_proj": "attn_q", "self_attn.o_proj": "attn_output",
            "mlp.gate_proj": "ffn_gate", "mlp.down_proj": "ffn_down"}

    def __init__(self, d):
        super().__init__(d)
        self.seen: dict[str, list] = {}
        self._final = False

    def w(self, name):
        self._final = name == "model.norm.weight"
        return super().w(name)

    def _rms(self, x, weight):
        y = super()._rms(x, weight)
        if self._final:
            self.seen.setdefault("output.weight", []).append(y)
        return y

    def _linear(self, x, prefix):
        _, _, layer, key = prefix.split(".", 3)
        if key in self.HF2G:
            self.seen.setdefault(f"blk.{layer}.{self.HF2G[key]}.weight", []).append(x)
        return super()._linear(x, prefix)


def test_moments_equal_the_reference_inputs(tiny, tmp_path):
    """Given tokens decoded by llama.cpp (the temporary model: BF16, as the source) vs the NumPy reference forward
    of the HF weights: every matrix's E[x x^T] (E[x^2] for ffn_down) agrees to 16-bit precision."""
    toks = np.random.default_rng(2).integers(3, 8192, (2, 48))
    toks[:, 0] = 1
    ref = _Collect(tiny)
    for r in toks:
        ref.logits(r)
    with _cal(tiny, tmp_path, tokens=toks) as c:
        assert c.count == toks.size and np.array_equal(c.tokens, toks)
        for name, xs in ref.seen.items():
            x = np.concatenate(xs).astype(np.float64)
            got = c.moment(name)
            want = (x * x).mean(0) if name.endswith("ffn_down.weight") else x.T @ x / len(x)
            assert got.shape == want.shape, name
            assert _rel(got, want) < 2e-2, (name, _rel(got, want))


def test_temporary_model_type(tiny_p, sample, tmp_path):
    """BF16 weights stay BF16 in the temporary model (exact, and llama.cpp's faster matmuls); any
    other source dtype gets F16; the model llama.cpp loads is that type."""
    from synth import make_model
    assert calib.temp_type(tiny_p) == "BF16" and sample.stats["model_type"] == "BF16"
    assert calib.temp_type(prepare(make_model(tmp_path / "f32", dtype="F32"))) == "F16"
    assert calib.temp_type(prepare(make_model(tmp_path / "f16", dtype="F16"))) == "F16"


def test_weights_hand_out_hessians_and_diagonals(sample):
    from ggufq.quant.gptq import Hessian
    h = sample.weights("blk.1.attn_q.weight")
    assert isinstance(h, Hessian) and h.n == 256
    assert sample.weights("blk.1.attn_k.weight") is h               # factored once per shared input
    d = sample.weights("blk.1.ffn_down.weight")
    assert d.dtype == np.float32 and d.ndim == 1
    real = np.ones(256, np.float32)
    assert np.array_equal(sample.weights("blk.1.attn_v.weight", real).diag, real)


def test_prefetch_factors_ahead_once_and_drops_what_is_behind(sample):
    """The writer starts the next factorization on a thread (calib.LazyWeights.prefetch); asking for it
    then gives that Hessian (the one an inline factorization gives), and the ones asked for before it
    are dropped."""
    from ggufq import blas
    from ggufq.quant.gptq import Hessian
    q, o = sample.lazy("blk.0.attn_q.weight"), sample.lazy("blk.0.attn_output.weight")
    assert q.factor_key is not None and q.factor_key != o.factor_key
    assert sample.lazy("blk.0.ffn_down.weight").factor_key is None          # diagonal only: nothing to factor
    hq = q()
    o.prefetch()
    o.prefetch()                                                            # once
    assert list(sample._hessians) == [q.factor_key, o.factor_key]
    ho = o()
    assert list(sample._hessians) == [o.factor_key]                         # q's is behind: dropped
    assert ho is o() and ho.n == 256 and not np.array_equal(ho.u, hq.u)
    with blas.threads(1):                           # as calib factors inputs up to SMALL_FACTOR wide
        assert np.array_equal(ho.u, Hessian.from_moment(sample.moment("blk.0.attn_output.weight")).u)
    assert any(t.name.startswith("ggufq-factor") for t in __import__("threading").enumerate())


def test_start_token(tiny, tiny_p, smollm2):
    assert calib.start_token(vocabs.load(tiny, tiny_p.model.config)) == 1              # SPM: BOS
    ps = prepare(smollm2)
    v = vocabs.load(smollm2, ps.model.config)                                          # BPE, no BOS added
    assert v.tokens[calib.start_token(v)] in (b"<|endoftext|>", "<|endoftext|>")


def test_self_calibrated_hqq_beats_the_kquant_file(tmp_path, tiny):
    """The user path end to end: `convert --method hqq` (self-calibrated) against `--method kquant`
    (llama-quantize's bytes) at Q4_K_M, KLD from the F16 file through llama-cpp-python on 16
    chunks of the held-out text. Measured at 60 chunks: 0.836x; here it must be under 0.92x."""
    from conftest import HELDOUT, run_cli
    from ggufq.eval import evaluate
    if not HELDOUT.is_file():
        pytest.skip(f"evaluation text not found at {HELDOUT}")
    out = {}
    for m in ("F16", "kquant", "hqq"):
        out[m] = tmp_path / f"{m}.gguf"
        args = ["--type", "F16"] if m == "F16" else ["--type", "Q4_K_M", "--method", m]
        r = run_cli("convert", tiny, "-o", out[m], *args, "-j", "2")
        assert r.returncode == 0, r.stderr
        if m == "hqq":
            assert "self-calibration: 64x512 tokens generated" in r.stderr
            assert not [f for f in tmp_path.iterdir() if f.name.startswith(".")]      # temporaries removed
    assert out["kquant"].stat().st_size == out["hqq"].stat().st_size
    kld = {m: evaluate(out[m], ref=out["F16"], text=HELDOUT, chunks=16, progress=False).kld["kld_mean"]
           for m in ("kquant", "hqq")}
    assert kld["hqq"] < 0.92 * kld["kquant"], kld


def test_calib_tokens_zero_is_the_data_free_path(tmp_path, tiny):
    from conftest import run_cli
    a, b = tmp_path / "a.gguf", tmp_path / "b.gguf"
    assert run_cli("convert", tiny, "-o", a, "--type", "Q4_K_M", "--method", "hqq", "--calib-tokens", "0",
                   "-q").returncode == 0
    assert run_cli("convert", tiny, "-o", b, "--type", "Q4_K_M", "--method", "hqq-fast", "-q").returncode == 0
    # hqq without calibration = hqq-fast for K types (data-free importance, same refinement)
    assert a.read_bytes() == b.read_bytes()


# ---- failure paths ---------------------------------------------------------------------------

def _leftovers(d):
    return sorted(f.name for f in d.iterdir())


def test_without_llama_cpp_python_one_line_and_nothing_written(tmp_path, tiny, monkeypatch):
    from ggufq.convert import convert
    monkeypatch.setattr(calib, "available", lambda: False)
    with pytest.raises(GgufqError, match=r"llama-cpp-python.*not installed.*--calib-tokens 0"):
        convert(tiny, tmp_path / "o.gguf", "Q4_K_M", method="calibrated", progress=False)
    assert _leftovers(tmp_path) == []


def test_a_worker_that_crashes_leaves_nothing(tmp_path, tiny, monkeypatch):
    """What a GPU build that cannot load looks like from here: the worker dies of a signal."""
    from ggufq.convert import convert
    monkeypatch.setattr(calib, "_ENTRY", "import os, signal; os.kill(os.getpid(), signal.SIGSEGV)")
    with pytest.raises(GgufqError, match=r"worker died \(exit code -11\), SIGSEGV"):
        convert(tiny, tmp_path / "o.gguf", "Q4_K_M", method="calibrated", progress=False)
    assert _leftovers(tmp_path) == []


def _session_procs(sid: int) -> list[int]:
    out = []
    for d in os.listdir("/proc"):
        if d.isdigit():
            try:
                with open(f"/proc/{d}/stat") as f:
                    fields = f.read().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(fields[3]) == sid:      # field 6 of stat: session id
                out.append(int(d))
    return out


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_ctrl_c_during_calibration_leaves_no_process_and_no_file(tmp_path, tiny):
    """Ctrl-C reaches the whole process group (as from a terminal) while the worker decodes:
    exit 130, one line, no worker left, the temporary folder gone."""
    from conftest import ROOT
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    p = subprocess.Popen([sys.executable, "-m", "ggufq", "convert", str(tiny), "-o", str(tmp_path / "o.gguf"),
                          "--type", "Q4_K_M", "--method", "calibrated", "-j", "1"],
                         env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:          # the scratch exists once the worker has decoded
            if any((d / "moments.f64").exists() for d in tmp_path.glob(".o.gguf.calib-*")):
                break
            time.sleep(0.1)
        else:
            pytest.fail("calibration never started")
        assert len(_session_procs(p.pid)) >= 2      # ggufq and its worker
        os.killpg(p.pid, signal.SIGINT)
        _, err = p.communicate(timeout=60)
    finally:
        if p.poll() is None:
            os.killpg(p.pid, signal.SIGKILL)
            p.wait()
    assert p.returncode == 130, err
    assert err.strip().splitlines()[-1] == "ggufq: interrupted"
    time.sleep(0.5)
    assert _session_procs(p.pid) == []
    assert _leftovers(tmp_path) == []


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="mounts a tmpfs")
def test_scratch_disk_full_one_line_and_nothing_left(tmp_path, tiny):
    """A disk with room for the temporary model but not for the moment scratch: the worker's
    ENOSPC becomes one line naming the scratch's size, exit code 1, the temporary folder gone."""
    from conftest import run_cli
    f16 = tmp_path / "f16.gguf"
    assert run_cli("convert", tiny, "-o", f16, "--type", "F16", "-q").returncode == 0
    mnt = tmp_path / "small"
    mnt.mkdir()
    size = f16.stat().st_size // (1 << 20) + 3            # the model fits, its 13 MiB of moments do not
    if subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}m", "tmpfs", str(mnt)],
                      capture_output=True).returncode != 0:
        pytest.skip("cannot mount a small tmpfs here (not root?)")
    try:
        r = run_cli("convert", tiny, "-o", mnt / "x.gguf", "--type", "Q4_K_M", "--method", "calibrated",
                    "--calib-tokens", "512", "-j", "1")
        assert r.returncode == 1, r.stderr
        last = r.stderr.strip().splitlines()[-1]
        assert last.startswith("ggufq: error: self-calibration: disk full in ") and "moment scratch" in last, last
        assert os.listdir(mnt) == []
    finally:
        subprocess.run(["umount", str(mnt)])


def test_save_imatrix_needs_a_calibrated_method(tmp_path, tiny):
    from ggufq.convert import convert
    with pytest.raises(GgufqError, match="--save-imatrix needs a self-calibrated"):
        convert(tiny, tmp_path / "o.gguf", "Q4_K_M", method="kquant", save_imatrix=tmp_path / "i.gguf",
                progress=False)
    assert _leftovers(tmp_path) == []


# ---- --save-imatrix ----------------------------------------------------------------------------

def test_save_imatrix_is_a_llama_imatrix_of_the_moments(tmp_path, tiny):
    """--save-imatrix writes llama-imatrix's GGUF format (sums of squares + token counts, sorted
    names) with the diagonal of the self-generated moments; llama-quantize --imatrix of it gives
    the same tensors, byte for byte, as ggufq's --method kquant --imatrix of it."""
    import gguf
    from conftest import LLAMA_BIN, run_cli
    from ggufq.imatrix import load
    im, out = tmp_path / "self.imatrix.gguf", tmp_path / "cal.gguf"
    r = run_cli("convert", tiny, "-o", out, "--type", "Q4_K_M", "--method", "calibrated", "--calib-tokens", "1024",
                "-j", "1", "--save-imatrix", im)
    assert r.returncode == 0, r.stderr
    assert "imatrix of 57 tensors" in r.stderr                   # 8 layers x 7 matrices + output
    rd = gguf.GGUFReader(im)
    assert bytes(rd.fields["general.type"].parts[-1]).decode() == "imatrix"
    assert "general.architecture" not in rd.fields
    names = [t.name for t in rd.tensors]
    assert names == [f"{n}.{s}" for n in sorted({x.rsplit('.', 1)[0] for x in names}) for s in ("in_sum2", "counts")]
    got = load(im)
    assert got.chunk_size == 512 and got.chunk_count == 2
    (tmp_path / "again").mkdir()
    with _cal(tiny, tmp_path / "again", 1024, seq_len=512) as c:
        for name in ("blk.0.attn_k.weight", "blk.5.ffn_down.weight", "output.weight"):
            m = c.moment(name)
            np.testing.assert_allclose(got.entries[name], np.diag(m) if m.ndim == 2 else m, rtol=1e-6)
    tool = LLAMA_BIN / "llama-quantize"
    if not tool.exists():
        pytest.skip(f"llama-quantize not built in {LLAMA_BIN}")
    f16, lq, gq = tmp_path / "f16.gguf", tmp_path / "lq.gguf", tmp_path / "gq.gguf"
    assert run_cli("convert", tiny, "-o", f16, "--type", "F16", "-q").returncode == 0
    r = subprocess.run([str(tool), "--imatrix", str(im), str(f16), str(lq), "Q4_K_M", "1"], capture_output=True,
                       text=True)
    assert r.returncode == 0, r.stderr[-2000:]
    assert run_cli("convert", tiny, "-o", gq, "--type", "Q4_K_M", "--imatrix", im, "-q").returncode == 0
    a, b = gguf.GGUFReader(lq), gguf.GGUFReader(gq)
    ta, tb = ({t.name: t for t in r.tensors} for r in (a, b))       # (the tensor order is not compared)
    assert sorted(ta) == sorted(tb)
    for name, x in ta.items():
        assert x.tensor_type == tb[name].tensor_type, name
        assert bytes(x.data) == bytes(tb[name].data), name
    for k in ("quantize.imatrix.file", "quantize.imatrix.dataset", "quantize.imatrix.entries_count",
              "quantize.imatrix.chunks_count"):
        assert a.fields[k].parts[-1].tobytes() == b.fields[k].parts[-1].tobytes(), k


# ---- the self-made imatrix of the i-quant mixtures -----------------------------------------------

def test_iq_mixture_without_imatrix_makes_its_own(tmp_path, tiny):
    """--type IQ2_XXS with no --imatrix: llama-quantize refuses it; ggufq calibrates itself through
    llama.cpp, says so, and the file is exactly ggufq's (so llama-quantize's) IQ2_XXS with the
    saved imatrix of that sample; llama-cpp-python runs it. Without llama-cpp-python it is the
    refusal naming --imatrix FILE."""
    import gguf
    from conftest import run_cli
    im, out, again = tmp_path / "self.imatrix.gguf", tmp_path / "self.gguf", tmp_path / "again.gguf"
    r = run_cli("convert", tiny, "-o", out, "--type", "IQ2_XXS", "--calib-tokens", "512", "-j", "2",
                "--save-imatrix", im)
    assert r.returncode == 0, r.stderr
    assert "needs an importance matrix: made one from the model's own 1x512-token sample" in r.stderr
    types = {t.name: t.tensor_type.name for t in gguf.GGUFReader(out).tensors}
    assert types["blk.0.attn_q.weight"] == "IQ2_XXS"
    r = run_cli("convert", tiny, "-o", again, "--type", "IQ2_XXS", "--imatrix", im, "-j", "2", "-q")
    assert r.returncode == 0, r.stderr
    a = {t.name: bytes(t.data) for t in gguf.GGUFReader(out).tensors}
    b = {t.name: bytes(t.data) for t in gguf.GGUFReader(again).tensors}
    assert a == b
    import llama_cpp
    llm = llama_cpp.Llama(str(out), n_ctx=64, n_threads=2, verbose=False)
    toks = llm.tokenize(b"The word apple means")
    llm.eval(toks)
    # without logits_all llama-cpp-python fills only the last position's row (the others are uninitialised)
    assert np.isfinite(np.array(llm.scores[len(toks) - 1])).all()
    del llm


def test_iq_mixture_without_any_importance_source_is_one_line(tmp_path, tiny):
    from ggufq.convert import convert
    with pytest.raises(GgufqError, match=r"needs an importance matrix .* pass --imatrix FILE"):
        convert(tiny, tmp_path / "o.gguf", "IQ2_XXS", calib_tokens=0, progress=False)
    assert _leftovers(tmp_path) == []


def test_worker_sums_the_same_in_the_background(tmp_path):
    """The worker's moment sums (calib_worker.Collector, with llama.cpp's ggml loaded): spread over
    threads by input, and summed on a background thread from a second set of buffers (GPU offload),
    they are bit-equal to one thread summing every flush in line."""
    from concurrent.futures import ThreadPoolExecutor
    from ggufq import calib_worker
    rng = np.random.default_rng(5)
    keys = {b"attn_norm-0": 48, b"ffn_inp-0": 40, b"kqv_out-0": 48}
    batches = [{k: rng.standard_normal((rows, n)).astype(np.float32) for k, n in keys.items()}
               for rows in (300, 7, 256, 129, 64)]
    out = []
    for mode in ("inline", "threads", "background"):
        col = calib_worker.Collector({}, str(tmp_path / f"{mode}.f64"), 1 << 20)
        for k, n in keys.items():
            col.kind[k], col.width[k] = "full", n
        if mode != "inline":
            col.sum_pool = ThreadPoolExecutor(3)
        if mode == "background":
            col.background = ThreadPoolExecutor(1)
        for b in batches:
            for k, a in b.items():
                col._buffer(k, a)
            col.flush()
            if mode == "background":
                assert col.pending is not None and not col.fill       # summing while the next rows buffer
        col.flush(final=True)
        assert col.pending is None and col.count == sum(len(b[b"attn_norm-0"]) for b in batches)
        out.append({k: np.array(col.acc[k]) for k in keys})
    for k in keys:
        want = sum(b[k].T.astype(np.float64) @ b[k].astype(np.float64) for b in batches)
        assert _rel(out[0][k], want) < 1e-5                                  # float32 products, float64 sums
        assert np.array_equal(out[0][k], out[1][k]) and np.array_equal(out[0][k], out[2][k])


def test_encoder_workers_fork_before_the_first_prefetch(tiny, tmp_path, monkeypatch):
    """`convert --method calibrated -j 2` forks both encoder workers before the writer starts factoring a
    Hessian on a thread: a fork during that thread's BLAS call copies OpenBLAS's held lock into the worker,
    whose first BLAS call (its one-thread initializer) then hangs (seen in tools.pareto on SmolLM2)."""
    import multiprocessing as mp

    from ggufq.convert import convert
    seen = []
    orig = calib.LazyWeights.prefetch

    def spy(self):
        seen.append(len(mp.active_children()))
        return orig(self)

    monkeypatch.setattr(calib.LazyWeights, "prefetch", spy)
    convert(tiny, tmp_path / "o.gguf", "Q4_K_M", method="calibrated", calib_tokens=512, jobs=2, progress=False)
    assert seen and min(seen) >= 2


def test_writer_prefetches_the_next_different_factorization(sample):
    """write._prefetch_next: at q (whose k and v share its input) the writer starts attn_output's
    factorization, the next different one, and nothing at the last tensor."""
    from ggufq import write
    names = ["blk.0.attn_q.weight", "blk.0.attn_k.weight", "blk.0.attn_v.weight", "blk.0.attn_output.weight",
             "blk.0.ffn_down.weight"]
    jobs = [write.Job(None, None, sample.lazy(n)) for n in names]
    jobs[0].imatrix()
    write._prefetch_next(jobs, 0)
    assert list(sample._hessians) == [jobs[0].imatrix.factor_key, jobs[3].imatrix.factor_key]
    write._prefetch_next(jobs, 4)
    assert len(sample._hessians) == 2


def test_low_bit_ffn_down_gets_a_full_moment(tiny_p):
    """ffn_down keeps a diagonal moment, except where the plan puts it at a type of under 8 bits with rows of
    at most FULL_DOWN_MAX: there the error feedback gets its full moment (and the worker is asked for it)."""
    downs = [t.name for t in tiny_p.tensors if ".ffn_down." in t.name]
    types = {n: ("IQ2_XS" if i % 2 else "Q8_0") for i, n in enumerate(downs)} | {"blk.0.attn_q.weight": "IQ2_XS"}
    full = calib.full_down(tiny_p.tensors, types)
    assert full == {n for i, n in enumerate(downs) if i % 2}
    w = calib.wanted(tiny_p.tensors, full)
    assert all(w[n] == ("full" if n in full else "diag") for n in downs)
    assert calib.wanted(tiny_p.tensors)[downs[1]] == "diag" and w["blk.0.attn_q.weight"] == "full"


def test_calibrated_iq2_feeds_back_into_ffn_down(tiny, tmp_path):
    """--method calibrated at IQ2_XS: the ffn_downs get Hessians (full moments) from the self-calibration."""
    from ggufq.quant.gptq import Hessian
    p = prepare(tiny)
    c = _cal(tiny, tmp_path, 512, seed=3, full=calib.full_down(p.tensors, {"blk.1.ffn_down.weight": "IQ2_XS"}))
    try:
        assert isinstance(c.weights("blk.1.ffn_down.weight"), Hessian)
        assert c.weights("blk.0.ffn_down.weight").ndim == 1
    finally:
        c.close()
