"""--target-size / --bpw: the budget, the exact allocation, map rules as fixed points, the recipe key,
and a file llama.cpp runs."""
from __future__ import annotations

import itertools
import json

import gguf
import numpy as np
import pytest
from gguf import GGMLQuantizationType as T

from ggufq.alloc import KEY_RECIPE, KEY_TARGET, size as S, solve as SV
from tests.conftest import run_cli


def test_size_strings():
    assert S.parse("4.2G") == 4_200_000_000
    assert S.parse("4200M") == 4_200_000_000
    assert S.parse("3.9GiB") == int(3.9 * (1 << 30))
    assert S.parse("512k") == 512_000
    assert S.parse("123456") == 123456
    assert S.parse("7 MB") == 7_000_000
    for bad in ("4.x", "", "G", "-3M", "1e3", "nan", "4.2Q"):
        assert S.parse(bad) is None, bad


def _brute(costs, losses, budget):
    best = None
    for ch in itertools.product(*[range(len(c)) for c in costs]):
        c = sum(cs[j] for cs, j in zip(costs, ch))
        if c <= budget:
            l = sum(ls[j] for ls, j in zip(losses, ch))
            if best is None or l < best - 1e-12:
                best = l
    return best


def test_solver_fits_and_is_near_exact():
    """Random multiple-choice knapsacks against brute force: the answer always fits, and loses at most
    what one DP cell of rounding can cost; the dual bound is a true lower bound."""
    rng = np.random.default_rng(0)
    worse = 0
    for trial in range(40):
        n = rng.integers(3, 6)
        costs, losses = [], []
        for _ in range(n):
            c = np.sort(rng.integers(10, 400, 4))
            costs.append(c)
            losses.append(np.sort(rng.random(4) * 10)[::-1])
        lo, hi = sum(int(c.min()) for c in costs), sum(int(c.max()) for c in costs)
        budget = int(rng.integers(lo, hi + 1))
        sol = SV.solve(costs, losses, budget)
        assert sol.cost <= budget
        opt = _brute(costs, losses, budget)
        assert sol.bound <= opt + 1e-9
        worse += sol.loss > opt + 1e-9
    assert worse <= 2          # DP cells are ~budget/4000 bytes: rounding rarely matters here


def test_solver_refuses_impossible_budget():
    with pytest.raises(ValueError):
        SV.solve([np.array([10, 20])], [np.array([1.0, 0.0])], 9)


@pytest.mark.parametrize("args", [["--target-size", "1K"], ["--target-size", "4.x"], ["--bpw", "40"],
                                  ["--target-size", "1T"]])
def test_bad_budgets_are_one_line(tmp_path, tiny, args):
    out = tmp_path / "x.gguf"
    r = run_cli("convert", tiny, "-o", out, *args)
    assert r.returncode == 1, r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and "feasible" in lines[0] and "F32" in lines[0], r.stderr
    assert not out.exists() and list(tmp_path.iterdir()) == []


def test_target_size_with_map_writes_a_file_llama_runs(tmp_path, tiny):
    """Data-free budget allocation (--calib-tokens 0: plain squared error, no probe): within 1% under
    the target, the map's tensors as the map says, the recipe in quantize.ggufq.*, loads and generates."""
    import llama_cpp
    m = tmp_path / "map.toml"
    m.write_text('[[rule]]\npattern = "blk.0.attn_v.weight"\ntype = "Q8_0"\n'
                 '[[rule]]\npattern = "output.weight"\ntype = "Q6_K"\n')
    out = tmp_path / "t.gguf"
    target = 5_500_000
    r = run_cli("convert", tiny, "-o", out, "--target-size", str(target), "--map", m, "--calib-tokens", "0", "-q")
    assert r.returncode == 0, r.stderr
    n = out.stat().st_size
    assert 0.99 * target <= n <= target, n
    rd = gguf.GGUFReader(out)
    types = {t.name: T(int(t.tensor_type)) for t in rd.tensors}
    assert types["blk.0.attn_v.weight"] == T.Q8_0 and types["output.weight"] == T.Q6_K
    assert len({types[k] for k in types if k.endswith(("attn_q.weight", "ffn_up.weight", "ffn_down.weight"))}) > 1
    f = rd.fields[KEY_RECIPE]
    recipe = json.loads(bytes(f.parts[f.data[0]]).decode())
    assert recipe["target_bytes"] == target and recipe["method"] == "kquant"
    f = rd.fields[KEY_TARGET]
    assert int(f.parts[f.data[0]][0]) == target
    llm = llama_cpp.Llama(str(out), n_ctx=64, n_threads=2, verbose=False)
    assert llm("The word apple means", max_tokens=8, temperature=0)["choices"][0]["text"].strip()


def test_bpw_budget(tmp_path, tiny):
    out = tmp_path / "b.gguf"
    r = run_cli("convert", tiny, "-o", out, "--bpw", "4.5", "--calib-tokens", "0", "-q")
    assert r.returncode == 0, r.stderr
    rd = gguf.GGUFReader(out)
    nel = sum(int(np.prod(t.shape)) for t in rd.tensors)
    data = sum(int(t.n_bytes) for t in rd.tensors)
    assert 4.5 * 0.99 <= data * 8 / nel <= 4.5 * 1.001


def test_plan_prints_the_allocation_and_the_nearest_preset(tiny):
    """ggufq plan --target-size: the per-tensor table, the totals, the predicted loss and the nearest
    llama-quantize mixture with the roles where the allocation differs from it; nothing written."""
    r = run_cli("plan", tiny, "--target-size", "6.9M", "--calib-tokens", "0")
    assert r.returncode == 0, r.stderr
    out = r.stdout
    assert "target-size -> " in out and "predicted KLD" in out and "gap" in out
    assert "nearest llama-quantize mixture: Q4_K_M" in out
    r = run_cli("plan", tiny, "--target-size", "6.9M", "--type", "Q4_K_M")
    assert r.returncode == 2 and "not both" in r.stderr


def test_probe_shared_process_sees_the_patched_weights(tmp_path, tiny):
    """The probe patches dequantized weights into one F16 file that a single llama.cpp process keeps
    mapped: its KLD per set (layer groups, a role set, a tensor perturbed only in a table's sampled rows)
    equals a fresh process's (and is not zero)."""
    import functools

    from ggufq import vocab as vocabs
    from ggufq.alloc import loss as L, probe as P
    from ggufq.convert import metadata_for, prepare, write_header
    p = prepare(tiny)
    vocab = vocabs.load(p.model.path, p.model.config)
    add = functools.partial(write_header, p, metadata_for(p), vocab)
    groups = {}
    for t in p.tensors:
        if L.group_of(t.name) in ("blk.0.ffn", "blk.5.attn"):
            groups.setdefault(L.group_of(t.name), []).append(t)
    roles = {"attn_v": [t for t in p.tensors if t.name in ("blk.1.attn_v.weight", "blk.5.attn_v.weight")]}
    # blk.0.ffn_up perturbed in the rows an error table encoded (a Sample), the others whole
    up = next(t for t in p.tensors if t.name == "blk.0.ffn_up.weight")
    with p.model:
        _, sample = L.tensor_losses(up, [T.Q2_K, T.Q4_K], None, None, n_sample=64, keep=T.Q2_K)
    assert sum(hi - lo for lo, hi in sample.runs) == 64 < up.n_rows
    tokens = np.concatenate([np.ones((1, 1), np.int64), np.random.default_rng(0).integers(3, 8000, (1, 127))], 1)
    res = [P.probe(p, groups, lambda n: None, lambda n: None, tokens, add, tmp_path, fresh=fresh, roles=roles,
                   samples={up.name: sample}) for fresh in (False, True)]
    got = [r.kld for r in res]
    assert set(got[0]) == set(groups) | {"role:attn_v"}
    for g in got[0]:
        assert got[0][g] > 1e-4
        assert got[0][g] == pytest.approx(got[1][g], rel=1e-4), (g, got)
    rows = dict(res[0].rows)
    assert rows[up.name] == sample.error and up.name not in res[0].whole
    assert "blk.0.ffn_down.weight" in res[0].whole
    # every tensor of a measured group has a positive scale (blk.5.attn_v's also set by its role)
    assert all(res[0].scales[n] > 0 for n in rows if L.group_of(n) in groups)
    assert list(tmp_path.iterdir()) == []


def test_fit_scales_recovers_group_and_role_factors():
    """Measurements made by a known model (KLD = sum over tensors of s[layer group] * c[role] * error,
    one set of role measurements taken at another overall level) give back every tensor's s * c."""
    from ggufq.alloc import loss as L, probe as P
    rng = np.random.default_rng(1)
    roles = ["attn_q", "attn_v", "attn_output", "ffn_up", "ffn_down"]
    s = {f"blk.{i}.{k}": rng.uniform(0.2, 5) for i in range(4) for k in ("attn", "ffn")}
    s["token_embd"] = 0.7
    c = dict(zip(roles, rng.uniform(0.1, 10, len(roles))))
    err = {f"blk.{i}.{r}.weight": rng.uniform(0.5, 2) for i in range(4) for r in roles}
    err["token_embd.weight"] = 3.0
    truth = {n: s[L.group_of(n)] * c.get(P.role_of(n), 1.0) for n in err}
    kld = {}
    for n, e in err.items():
        kld[L.group_of(n)] = kld.get(L.group_of(n), 0.0) + truth[n] * e
        if P.role_of(n):
            kld["role:" + P.role_of(n)] = kld.get("role:" + P.role_of(n), 0.0) + 3.0 * truth[n] * e
    got = P.fit_scales(list(err.items()), L.group_of, kld, {r: [] for r in roles})
    for n in err:
        assert got[n] == pytest.approx(truth[n], rel=1e-3), n
    # without role measurements: one scale per group (its KLD over its summed error)
    flat = P.fit_scales(list(err.items()), L.group_of, {g: v for g, v in kld.items() if ":" not in g}, {})
    g0 = "blk.0.attn"
    tot = sum(e for n, e in err.items() if L.group_of(n) == g0)
    assert flat["blk.0.attn_q.weight"] == pytest.approx(kld[g0] / tot)
    # a per-tensor probe (one set per tensor): each scale is the tensor's KLD over its error, and
    # product_scales fits those measurements back as s[layer] x c[role] (exact when they are of that form)
    by_tensor = {n: truth[n] * e for n, e in err.items()}
    own = P.fit_scales(list(err.items()), lambda n: n, by_tensor, {})
    assert all(own[n] == pytest.approx(truth[n], rel=1e-9) for n in err)
    s2 = {i: rng.uniform(0.2, 5) for i in range(4)}
    prod = {n: s2[int(n.split(".")[1])] * c[P.role_of(n)] if P.role_of(n) else 0.7 for n in err}
    res = P.ProbeResult({}, {n: prod[n] * e for n, e in err.items()}, {}, rows=list(err.items()), sets="tensor")
    got = P.product_scales(res)
    for n in err:
        assert got[n] == pytest.approx(prod[n], rel=1e-3), n


def test_calibrated_table_is_the_error_feedback_encoders_error(tmp_path_factory):
    """--method calibrated: the table's tr(E H E^T) per type is what the method's encoder (error-feedback
    rounding against the held-out moments, llama.cpp-collected) leaves on the sampled rows, below the
    k-quant search's at every candidate, and the same number the file's encoder gives those rows."""
    from quant_helpers import ffn_gate_moments, out_err

    from ggufq.alloc import loss as L
    from ggufq.quant import gptq, methods
    rows, m, _ = ffn_gate_moments(tmp_path_factory, 96)

    class Rows:       # the row reader a table estimate reads (the first 96 rows of blk.1.ffn_gate)
        n_rows, row_len = rows.shape

        def read(self, lo, hi):
            return rows[lo:hi]

    h = gptq.Hessian.from_moment(m)
    enc = methods.get("calibrated").encoder
    types = [T.Q3_K, T.IQ4_XS, T.Q4_K, T.Q5_K, T.Q6_K]
    fb = L.tensor_losses(Rows(), types, h, m, encoder=enc)
    ks = L.tensor_losses(Rows(), types, h.diag, m)
    assert (fb < ks).all(), (fb, ks)
    for t, e in zip(types, fb):
        assert e == pytest.approx(out_err(t, rows, enc(t, rows, h), m), rel=1e-4)


def test_probe_sets_follow_the_calibration_size():
    """"auto": a probe set per tensor while their decoded tokens fit the self-calibration's, layer and role
    sets beyond (the probe's cost stays about a calibration pass as the model grows); explicit choices stand."""
    from ggufq.alloc.probe import PROBE_SETS, choose_sets
    assert PROBE_SETS == "auto"
    assert choose_sets("auto", 58, 512, 32768) == "tensor"          # tinyllama at the default calibration
    assert choose_sets("auto", 212, 512, 32768) == "layer"          # SmolLM2: 108k tokens of probe
    assert choose_sets("auto", 212, 512, 212 * 512) == "tensor"
    assert choose_sets("tensor", 212, 512, 2048) == "tensor" and choose_sets("layer", 2, 512, 1 << 20) == "layer"
