"""ggufq eval: statistics by hand, the real tiny model through llama-cpp-python against
llama-perplexity, and the one-line errors."""
from __future__ import annotations

import json
import math
import re
import subprocess
import sys

import numpy as np
import pytest

from conftest import HELDOUT, LLAMA_BIN, ROOT, run_cli
from ggufq import GgufqError
from ggufq.eval import evaluate
from ggufq.eval import stats as S

CTX = 128
CHUNKS = 6


# ------------------------------------------------------------------ statistics

def test_log_softmax_by_hand():
    x = np.array([[0.0, math.log(3.0)], [1.0, 1.0]], dtype=np.float32)
    got = S.log_softmax(x)
    assert got.dtype == np.float64
    np.testing.assert_allclose(got, [[math.log(0.25), math.log(0.75)], [math.log(0.5), math.log(0.5)]], rtol=1e-7)


def test_token_scores_by_hand():
    # reference p = (1/2, 1/2); model q = (3/4, 1/4) then (1/4, 3/4)
    q = np.array([[math.log(3.0), 0.0], [0.0, math.log(3.0)]], dtype=np.float32)
    p = np.zeros((2, 2), dtype=np.float32)
    s = S.token_scores(q, np.array([0, 0]), p)
    np.testing.assert_allclose(s.nll, [-math.log(0.75), -math.log(0.25)], rtol=1e-6)
    np.testing.assert_allclose(s.nll_base, [math.log(2.0)] * 2, rtol=1e-7)
    kl = 0.5 * math.log(0.5 / 0.75) + 0.5 * math.log(0.5 / 0.25)    # = 0.5 ln(4/3)
    np.testing.assert_allclose(s.kld, [kl, kl], rtol=1e-6)
    np.testing.assert_allclose(s.p_diff, [0.25, -0.25], atol=1e-6)
    # ties go to the first index, as llama-perplexity's strict '>' loop: p's top is token 0
    assert s.same_top.tolist() == [True, False]
    # without a reference only the nll is there
    assert S.token_scores(q, np.array([1, 1])).kld is None


def test_token_scores_blocks_agree():
    rng = np.random.default_rng(1)
    q = rng.standard_normal((37, 50)).astype(np.float32)
    p = rng.standard_normal((37, 50)).astype(np.float32)
    t = rng.integers(0, 50, 37)
    a, b = S.token_scores(q, t, p, block=5), S.token_scores(q, t, p, block=64)
    for k in ("nll", "nll_base", "kld", "p_diff", "same_top"):
        np.testing.assert_array_equal(getattr(a, k), getattr(b, k))
    assert (a.kld >= -1e-12).all()


def test_ppl_summary_by_hand():
    s = S.ppl_summary(np.array([1.0, 2.0, 3.0]))
    assert s["ppl"] == pytest.approx(math.exp(2.0))
    # var = 14/3 - 4 = 2/3; stderr = sqrt(var/(n-1)) = sqrt(1/3)
    assert s["ppl_err"] == pytest.approx(math.sqrt(1 / 3) * math.exp(2.0))
    assert s["n_tokens"] == 3


def test_mean_and_uncertainty_and_covariance():
    assert S.mean_and_uncertainty(np.arange(10.0)) == (4.5, 0.0)        # n <= 10: no error estimate
    v = np.arange(11.0)                                                  # mean 5, E[x^2] = 35
    f, df = S.mean_and_uncertainty(v)
    assert f == 5.0 and df == pytest.approx(math.sqrt(10.0 / 10))
    assert S.covariance(np.arange(9.0), np.arange(9.0)) == 0.0           # n < 10
    a = np.arange(11.0)
    assert S.covariance(a, a) == pytest.approx(10.0 / 10)
    assert S.covariance(a, -a) == pytest.approx(-1.0)


def test_percentile_and_median_like_llama_perplexity():
    v = np.array([0.0, 1.0, 2.0, 3.0, 4.0], dtype=np.float32)
    assert S.percentile(v, 0.9) == pytest.approx(3.6, rel=1e-6)        # 0.9 * (5-1) = 3.6
    assert S.percentile(v, 0.999) == pytest.approx(3.996, rel=1e-6)
    assert S.percentile(v, 0.0) == 0.0 and S.percentile(v, 1.0) == 4.0
    assert S.median(np.array([1, 2, 3, 10], dtype=np.float32)) == 2.5
    assert S.median(np.array([1, 2, 30], dtype=np.float32)) == 2.0


def test_kld_summary_by_hand():
    n = 20
    nll = np.full(n, 2.0)
    nll[:10] = 1.0                        # mean 1.5
    base = nll - 0.5                      # mean 1.0, perfectly correlated
    kld = np.linspace(0.0, 1.9, n)
    same = np.arange(n) < 15              # 75 %
    pd = np.exp(-nll) - np.exp(-base)
    k = S.kld_summary(nll, base, kld, pd, same)
    assert k["ppl"] == pytest.approx(math.exp(1.5)) and k["ppl_base"] == pytest.approx(math.e)
    assert k["ln_ppl_ratio"] == pytest.approx(0.5)
    assert k["ppl_ratio"] == pytest.approx(math.exp(0.5))
    assert k["ppl_diff"] == pytest.approx(math.exp(1.5) - math.e)
    assert k["ppl_diff_pct"] == pytest.approx((math.exp(0.5) - 1) * 100)
    assert k["cor_ln_ppl"] == pytest.approx(1.0)
    assert k["ln_ppl_ratio_err"] == pytest.approx(0.0, abs=1e-6)       # identical spreads cancel
    assert k["kld_mean"] == pytest.approx(0.95)
    assert k["kld_median"] == pytest.approx(0.95, rel=1e-6)            # (0.9 + 1.0) / 2
    assert k["kld_max"] == pytest.approx(1.9) and k["kld_min"] == 0.0
    assert k["kld_p90"] == pytest.approx(0.9 * 19 * 0.1, rel=1e-5)     # linspace step 0.1
    assert k["same_top"] == 0.75
    assert k["same_top_err"] == pytest.approx(math.sqrt(0.75 * 0.25 / 19))
    assert k["rms_dp"] == pytest.approx(math.sqrt(np.mean(pd ** 2)))


# ------------------------------------------------------------------ real model

@pytest.fixture(scope="module")
def ggufs(tmp_path_factory, tiny):
    from ggufq.convert import convert

    d = tmp_path_factory.mktemp("eval")
    out = {}
    for ft in ("F16", "Q8_0"):
        out[ft] = d / f"tiny-{ft}.gguf"
        convert(tiny, out[ft], ft, progress=False)
    return out


@pytest.fixture(scope="module")
def text(tmp_path_factory):
    if not HELDOUT.is_file():
        pytest.skip(f"evaluation text not found at {HELDOUT}")
    p = tmp_path_factory.mktemp("text") / "heldout-head.txt"
    p.write_bytes(HELDOUT.read_bytes()[:40000])
    return p


@pytest.fixture
def anytext(tmp_path):
    """A text for the error paths, which fail before any token is scored."""
    p = tmp_path / "words.txt"
    p.write_text("The quick brown fox jumps over the lazy dog. " * 50)
    return p


def _llama_perplexity(*args, expect=()) -> str:
    exe = LLAMA_BIN / "llama-perplexity"
    if not exe.exists():
        pytest.skip(f"llama-perplexity not built in {LLAMA_BIN} (tools/build_llama_tools.sh)")
    # llama.cpp's common logger writes from a background thread and is never flushed at exit
    # (common_log_main() leaks it), so a run can exit 0 with the tail of its report lost; that
    # happens far less into a file than into a pipe. A run whose report is cut short is repeated.
    import tempfile
    expect = (expect,) if isinstance(expect, str) else tuple(expect)
    out = ""
    for _ in range(8):
        with tempfile.TemporaryFile("w+") as f:
            r = subprocess.run([str(exe), *map(str, args)], stdout=f, stderr=subprocess.STDOUT, timeout=300)
            f.seek(0)
            out = f.read()
        assert r.returncode == 0, out[-2000:]
        if all(e in out for e in expect):
            break
    return out


def test_ppl_equals_llama_perplexity(ggufs, text):
    r = evaluate(ggufs["F16"], text=text, ctx=CTX, chunks=CHUNKS, progress=False)
    assert r.n_chunks == CHUNKS and r.n_scored == CHUNKS * (CTX - 1 - CTX // 2)
    assert r.device == "CPU" or r.device.startswith("GPU")
    assert 2.0 < r.ppl < 50.0 and r.ppl_err > 0
    out = _llama_perplexity("-m", ggufs["F16"], "-f", text, "-c", CTX, "-b", CTX, "--chunks", CHUNKS, "-t", 2,
                            expect="Final estimate")
    m = re.search(r"Final estimate: PPL = ([\d.]+) \+/- ([\d.]+)", out)
    assert m, out[-2000:]
    assert r.ppl == pytest.approx(float(m.group(1)), rel=1e-3)
    assert r.ppl_err == pytest.approx(float(m.group(2)), rel=1e-2)


def test_kld_equals_llama_perplexity(ggufs, text, tmp_path):
    r = evaluate(ggufs["Q8_0"], ref=ggufs["F16"], text=text, ctx=CTX, chunks=CHUNKS, progress=False)
    k = r.kld
    assert k["n_tokens"] == r.n_scored and 0 < k["kld_mean"] < 0.05 and 0.9 < k["same_top"] <= 1.0
    base = tmp_path / "f16.kld"
    # -b CTX: one chunk per batch as ggufq decodes; llama-perplexity's default packs 2048/CTX chunks
    # into each batch, and on CPU the Q8_0 kernels then round differently (KLD of Q8_0 vs itself
    # across the two layouts is about half of Q8_0's own KLD at ctx 128)
    common = ("-f", text, "-c", CTX, "-b", CTX, "--chunks", CHUNKS, "-t", 2, "--kl-divergence-base", base)
    _llama_perplexity("-m", ggufs["F16"], *common)
    out = _llama_perplexity("-m", ggufs["Q8_0"], *common, "--kl-divergence",
                            expect=("Mean PPL(Q)", "Mean PPL(base)", "Mean    KLD:", "99.0%   KLD:", "Same top p:"))
    assert "Same top p:" in out and "Mean PPL(Q)" in out, out[-3000:]
    want = {
        "ppl": float(re.search(r"Mean PPL\(Q\)\s*:\s*([\d.]+)", out).group(1)),
        "ppl_base": float(re.search(r"Mean PPL\(base\)\s*:\s*([\d.]+)", out).group(1)),
        "kld_mean": float(re.search(r"Mean\s+KLD:\s*([-\d.]+)", out).group(1)),
        "kld_p99": float(re.search(r"99\.0%\s+KLD:\s*([-\d.]+)", out).group(1)),
        "same_top": float(re.search(r"Same top p:\s*([\d.]+)", out).group(1)) / 100,
    }
    assert k["ppl"] == pytest.approx(want["ppl"], rel=1e-3)
    assert k["ppl_base"] == pytest.approx(want["ppl_base"], rel=1e-3)
    assert k["kld_mean"] == pytest.approx(want["kld_mean"], rel=0.01)
    assert k["kld_p99"] == pytest.approx(want["kld_p99"], rel=0.01)
    assert k["same_top"] == pytest.approx(want["same_top"], abs=0.006)    # one token of 378 may flip


def test_model_against_itself_is_exactly_zero(ggufs, text):
    r = evaluate(ggufs["F16"], ref=ggufs["F16"], text=text, ctx=CTX, chunks=2, progress=False)
    k = r.kld
    assert k["kld_mean"] == 0.0 and k["kld_max"] == 0.0 and k["same_top"] == 1.0
    assert k["ppl_diff"] == 0.0 and k["ppl"] == r.ppl


def test_cli_json_and_no_llama_cpp_in_parent(ggufs, text, tmp_path):
    js = tmp_path / "out.json"
    code = (
        "import sys, numpy\n"
        "from ggufq.cli import main\n"
        f"sys.argv = ['ggufq', 'eval', {str(ggufs['Q8_0'])!r}, '--ref', {str(ggufs['F16'])!r}, "
        f"'--text', {str(text)!r}, '--ctx', '{CTX}', '--chunks', '2', '--json', {str(js)!r}, '-t', '1']\n"
        "try:\n    main()\nexcept SystemExit as e:\n    assert not e.code, e.code\n"
        "assert 'llama_cpp' not in sys.modules, 'the parent imported llama_cpp'\n"
    )
    p = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300,
                       env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"})
    assert p.returncode == 0, p.stderr[-3000:]
    assert "KLD mean" in p.stdout and "same top" in p.stdout and "CPU" in p.stdout
    d = json.loads(js.read_text())
    assert d["n_chunks"] == 2 and d["n_ctx"] == CTX and d["threads"] == 1
    assert d["kld"]["kld_mean"] > 0 and d["ppl"] == pytest.approx(d["kld"]["ppl"])


# ------------------------------------------------------------------ errors

def _eval_fails(*args, must: str):
    r = run_cli("eval", *args)
    assert r.returncode == 1, (r.stdout, r.stderr)
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("ggufq: error: "), r.stderr
    assert must in lines[0], lines[0]


def test_missing_model(tmp_path, anytext):
    _eval_fails(tmp_path / "nope.gguf", "--text", anytext, must="model file not found")


def test_not_a_gguf(tmp_path, anytext):
    p = tmp_path / "x.gguf"
    p.write_bytes(b"not a model at all")
    _eval_fails(p, "--text", anytext, must="is not a GGUF file")


def test_truncated_gguf(ggufs, tmp_path, anytext):
    p = tmp_path / "cut.gguf"
    p.write_bytes(ggufs["Q8_0"].read_bytes()[:3_000_000])
    _eval_fails(p, "--text", anytext, must="llama.cpp could not load")


def test_text_shorter_than_two_chunks(ggufs, tmp_path):
    t = tmp_path / "short.txt"
    t.write_text("A tiny text. " * 20)
    _eval_fails(ggufs["F16"], "--text", t, "--ctx", "128", must="needs at least 256 (two chunks)")


def test_ctx_above_training_context(ggufs, anytext):
    _eval_fails(ggufs["F16"], "--text", anytext, "--ctx", "4096", must="above the training context")


def test_missing_text(ggufs, tmp_path):
    _eval_fails(ggufs["F16"], "--text", tmp_path / "none.txt", must="text file not found")


def test_ref_with_other_vocab(ggufs, tmp_path, anytext):
    import gguf
    from gguf.scripts.gguf_new_metadata import MetadataDetails, copy_with_new_metadata

    rd = gguf.GGUFReader(ggufs["F16"])
    toks = rd.fields["tokenizer.ggml.tokens"].contents()
    toks[-1] = "\u2581ggufq-not-this-vocab"
    dst = tmp_path / "other-vocab.gguf"
    w = gguf.GGUFWriter(dst, "llama")
    copy_with_new_metadata(rd, w, {"tokenizer.ggml.tokens": MetadataDetails(
        gguf.GGUFValueType.ARRAY, toks, sub_type=gguf.GGUFValueType.STRING)}, [])
    _eval_fails(ggufs["Q8_0"], "--ref", dst, "--text", anytext, "--ctx", str(CTX), must="different vocabularies")


def test_evaluate_needs_text(ggufs):
    with pytest.raises(GgufqError, match="no evaluation text"):
        evaluate(ggufs["F16"])


def test_convert_validate_prints_table_and_removes_reference(tmp_path):
    from conftest import HELDOUT, TINY, run_cli
    if not HELDOUT.exists():
        pytest.skip("held-out text not found")
    out = tmp_path / "q.gguf"
    r = run_cli("convert", TINY, "-o", out, "--type", "Q8_0", "--validate", "--text", HELDOUT,
                "--chunks", "3", "--ctx", "128")
    assert r.returncode == 0, r.stderr
    assert "KLD mean" in r.stdout and "same top" in r.stdout and "PPL(ref)" in r.stdout
    assert sorted(p.name for p in tmp_path.iterdir()) == ["q.gguf"]
    r = run_cli("convert", TINY, "-o", tmp_path / "x.gguf", "--validate")
    assert r.returncode == 2 and "--validate needs --text" in r.stderr
