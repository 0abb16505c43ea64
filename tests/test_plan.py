"""The layer map: llama-quantize's mixtures, row-length fallbacks, presets, map files, report.

Parity is checked three ways:
* bits per weight of Llama-3.1-8B's tensor list against llama.cpp's published table
  (tools/quantize/README.md);
* per-tensor types against llama.cpp's own ``llama_quant_compute_types`` (ctypes into the
  libllama of llama-cpp-python) for synthetic models covering GQA, 70B, MoE, Falcon, odd rows;
* per-tensor types against files llama-quantize writes from real F16 GGUFs made by
  ``ggufq convert`` (tinyllama-spm-10m, smollm2-135m-dither when built). All types, and F16
  GGUFs from llama.cpp's convert_hf_to_gguf.py: tools/plan_parity.py.
"""
from __future__ import annotations

import json
import os
import random
from pathlib import Path

import pytest
from gguf import GGMLQuantizationType as T, LlamaFileType

from ggufq import GgufqError
from ggufq.plan import load_map, make_plan, parse_map, specs_from_gguf
from ggufq.plan import rules as R
from ggufq.plan.report import format_table, to_json

ROOT = Path(__file__).resolve().parents[1]
TINYLLAMA = Path(__file__).resolve().parent.parent / "fixtures" / "tinyllama-spm-10m"
SMOLLM2 = Path.home() / ".cache/ggufq/smollm2-135m-dither"
LLAMA_BIN = Path(os.environ.get("GGUFQ_LLAMA_BIN", str(Path.home() / ".cache/ggufq/llama-bin")))

QUANT_TYPES = ["Q2_K", "Q3_K_S", "Q3_K_M", "Q3_K_L", "Q4_K_S", "Q4_K_M", "Q5_K_S", "Q5_K_M", "Q6_K",
               "Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1"]
IQ_TYPES = ["IQ1_S", "IQ1_M", "IQ2_XXS", "IQ2_XS", "IQ2_S", "IQ2_M", "IQ3_XXS", "IQ3_XS", "IQ3_S", "IQ3_M",
            "IQ4_NL", "IQ4_XS", "Q2_K_S", "TQ1_0", "TQ2_0", "MXFP4_MOE"]
ALL_TYPES = QUANT_TYPES + ["F16", "BF16", "F32"] + IQ_TYPES


# ---------------------------------------------------------------------------
# tensor lists of real architectures, as their GGUF files name and shape them (numpy order)
def _parity_tool():
    from tools import plan_parity
    return plan_parity


TOOL = _parity_tool()
llama_like = TOOL.llama_like


llama3_8b = TOOL.llama31_8b
mixtral_8x7b = TOOL.mixtral_8x7b
falcon_7b = TOOL.falcon_7b
MODELS = TOOL.SYNTHETIC


# ---------------------------------------------------------------------------
# 1. published figures: tools/quantize/README.md, Llama-3.1-8B, bits/weight
PUBLISHED_BPW = TOOL.PUBLISHED_BPW


@pytest.mark.parametrize("ftype", list(PUBLISHED_BPW))
def test_llama3_8b_bits_per_weight_match_llama_cpp_readme(ftype):
    specs, info = llama3_8b()
    plan = make_plan(specs, info, ftype, has_imatrix=ftype in TOOL.PUBLISHED_WITH_IMATRIX)
    # llama-bench's figure: model bytes * 8 / model parameters, norms and rope_freqs included
    assert plan.n_elements == 8_030_261_312
    assert round(plan.bits_per_weight, 4) == PUBLISHED_BPW[ftype]


def test_llama3_8b_q4_k_m_layer_choices():
    specs, info = llama3_8b()
    plan = make_plan(specs, info, "Q4_K_M")
    assert plan.file_type == LlamaFileType.MOSTLY_Q4_K_M
    more = [i for i in range(32) if R.use_more_bits(i, 32)]
    assert more == [0, 1, 2, 3, 6, 9, 12, 15, 18, 21, 24, 27, 28, 29, 30, 31]
    for i in range(32):
        want = T.Q6_K if i in more else T.Q4_K
        assert plan[f"blk.{i}.attn_v.weight"].qtype == want
        assert plan[f"blk.{i}.ffn_down.weight"].qtype == want
        assert plan[f"blk.{i}.attn_q.weight"].qtype == T.Q4_K
    assert plan["blk.0.attn_v.weight"].reason == "Q4_K_M: use_more_bits(attn_v, layer 0) -> Q6_K"
    assert plan["output.weight"].qtype == T.Q6_K
    assert plan["token_embd.weight"].qtype == T.Q4_K
    assert plan["blk.0.attn_norm.weight"].qtype == T.F32
    assert plan["rope_freqs.weight"].qtype == T.F32
    assert plan.n_fallback == 0


def test_plan_follows_llama_cpp_visit_order_not_input_order():
    specs, info = llama3_8b()
    shuffled = list(specs)
    random.Random(0).shuffle(shuffled)
    a, b = make_plan(specs, info, "Q3_K_M"), make_plan(shuffled, info, "Q3_K_M")
    assert {e.name: e.qtype for e in a.entries} == {e.name: e.qtype for e in b.entries}
    assert [e.name for e in b.entries] == [s.name for s in shuffled]     # entries keep the input order
    # Q3_K_M: the first two attn_v in llama.cpp's order (blk.0, blk.1, not blk.0, blk.10) get Q5_K
    assert [i for i in range(32) if b[f"blk.{i}.attn_v.weight"].qtype == T.Q5_K] == [0, 1]


# ---------------------------------------------------------------------------
# 2. llama.cpp's own type selection (llama_quant_compute_types), synthetic models
def _llama_ref():
    from ggufq_ref import llama_ref
    if not llama_ref.available():
        pytest.skip("llama-cpp-python's libllama (llama_quant_compute_types) is not loadable")
    return llama_ref


@pytest.mark.parametrize("model", list(MODELS))
def test_types_match_llama_cpp_type_selection(model):
    _llama_ref()
    specs, info = MODELS[model]()
    for ftype in ALL_TYPES:
        assert TOOL.reference_mismatches(specs, info, ftype) == [], (model, ftype)


def test_special_rules_fire_where_llama_cpp_says():
    specs, info = MODELS["llama3.1-70b"]()
    p = make_plan(specs, info, "Q3_K_S")
    assert p["blk.40.attn_v.weight"].qtype == T.Q5_K and "70B attn_v" in p["blk.40.attn_v.weight"].reason
    # llama-quantize types an 80-layer qwen2 70B too (src/models/qwen2.cpp); the mock of llama_ref does not
    specs, info = llama_like(152064, 8192, 80, 64, 8, 29568, arch="qwen2")
    p = make_plan(specs, info, "Q4_K_S")
    assert p["blk.10.attn_v.weight"].qtype == T.Q5_K and "70B attn_v" in p["blk.10.attn_v.weight"].reason
    assert p["blk.10.ffn_down.weight"].qtype == T.Q5_0 and p["blk.10.ffn_down.weight"].fallback  # 29568 % 256
    specs, info = mixtral_8x7b()
    p = make_plan(specs, info, "Q4_K_M")
    assert p["blk.3.attn_v.weight"].qtype == T.Q8_0 and p["blk.3.attn_k.weight"].qtype == T.Q8_0
    assert p["blk.3.attn_output.weight"].qtype == T.Q5_K
    assert p["blk.0.ffn_down_exps.weight"].qtype == T.Q6_K                   # layer 0 from the name
    assert p["blk.3.ffn_gate_inp.weight"].qtype == T.F32                     # router: never quantized
    # with an importance matrix, Q4_0/Q5_0 guard the first eighth of ffn_down (llama_tensor_get_type_impl)
    specs, info = llama3_8b()
    for ft, up in (("Q4_0", T.Q4_1), ("Q5_0", T.Q5_1)):
        plain, im = make_plan(specs, info, ft), make_plan(specs, info, ft, has_imatrix=True)
        assert [i for i in range(32) if im[f"blk.{i}.ffn_down.weight"].qtype == up] == [0, 1, 2, 3]
        assert all(plain[f"blk.{i}.ffn_down.weight"].qtype == T[ft] for i in range(32))
    specs, info = falcon_7b()
    p = make_plan(specs, info, "Q4_K_M")
    e = p["output.weight"]
    assert e.qtype == T.Q8_0 and "falcon" in e.reason
    e = p["blk.5.attn_qkv.weight"]                                         # 4544 % 256 != 0
    assert e.fallback and e.qtype == T.Q5_0 and "row 4544 not a multiple of 256: Q4_K -> Q5_0 fallback" in e.reason


def test_row_fallbacks_smollm2_and_odd_rows():
    specs, info = MODELS["smollm2-135m"]()
    p = make_plan(specs, info, "Q4_K_M")
    e = p["blk.0.attn_q.weight"]
    assert e.qtype == T.Q5_0 and e.fallback
    assert e.reason == "Q4_K_M: default Q4_K; row 576 not a multiple of 256: Q4_K -> Q5_0 fallback"
    assert p["blk.0.attn_v.weight"].qtype == T.Q8_0                         # Q6_K -> Q8_0
    assert p["blk.0.ffn_down.weight"].qtype == T.Q6_K                       # 1536 = 6 * 256: no fallback
    assert "output.weight" not in [x.name for x in p.entries]
    e = p["token_embd.weight"]                                             # tied: treated as output
    assert e.qtype == T.Q8_0 and not e.fallback and "tied" in e.reason
    p = make_plan(specs, info, "Q5_K_S")
    assert p["blk.0.attn_q.weight"].qtype == T.Q5_1
    p = make_plan(specs, info, "Q3_K_L")
    assert p["blk.0.attn_q.weight"].qtype == T.Q4_0
    specs, info = MODELS["odd-rows"]()
    p = make_plan(specs, info, "Q4_K_M")
    e = p["blk.1.attn_q.weight"]
    assert e.qtype == T.F16 and e.fallback and "-> F16 fallback" in e.reason
    assert make_plan(specs, info, "Q8_0")["blk.1.attn_q.weight"].qtype == T.F16
    assert make_plan(specs, info, "F16")["blk.1.attn_q.weight"].qtype == T.F16


# ---------------------------------------------------------------------------
# 3. real files written by llama-quantize
def _need_llama_quantize():
    if not (LLAMA_BIN / "llama-quantize").exists():
        pytest.skip(f"llama-quantize not built in {LLAMA_BIN}")


def _f16(request, model_dir: Path, tool) -> Path:
    """An F16 GGUF of model_dir made by ggufq's own converter, cached in .pytest_cache under a
    stamp of ggufq's sources (so a converter change makes a new one; older ones are removed)."""
    import hashlib

    h = hashlib.sha1()
    for f in sorted((ROOT / "ggufq").rglob("*.py")):
        h.update(f.read_bytes())
    cache = Path(request.config.cache.mkdir("ggufq-plan"))
    path = cache / f"{model_dir.name}.ggufq-{h.hexdigest()[:12]}.f16.gguf"
    if not path.exists():
        for old in cache.glob(f"{model_dir.name}.*"):
            old.unlink()
    return tool.make_f16(model_dir, path, "ggufq")


@pytest.mark.slow
@pytest.mark.parametrize("model_dir,types", [
    (TINYLLAMA, ["Q4_K_M", "Q3_K_M", "Q2_K"]),
    (SMOLLM2, ["Q4_K_M", "Q4_0"]),
])
def test_types_match_llama_quantize_output(request, model_dir, types):
    _need_llama_quantize()
    if not model_dir.exists():
        pytest.skip(f"{model_dir} is not built")
    tool = TOOL
    f16 = _f16(request, model_dir, tool)
    specs, info = specs_from_gguf(f16)
    if model_dir == TINYLLAMA:   # the quick header reader agrees with gguf-py's
        from gguf import GGUFReader
        r = GGUFReader(f16)
        assert [(s.name, s.shape) for s in specs] == [(t.name, tuple(int(d) for d in reversed(t.shape))) for t in r.tensors]
        assert (info.arch, info.n_layer, info.n_embd, info.n_head, info.n_head_kv) == ("llama", 8, 256, 4, 2)
    for ftype in types:
        out = tool.quantize(LLAMA_BIN, f16, f16.with_suffix(f".{ftype}.gguf"), ftype)  # cached with its F16
        plan = make_plan(specs, info, ftype)
        bad, file_bytes = tool.compare(plan, out)
        assert bad == [], f"{model_dir.name} {ftype}: {bad[:5]}"
        assert file_bytes == plan.total_bytes
        if model_dir == SMOLLM2 and ftype == "Q4_K_M":
            assert plan.n_fallback == 180                                  # 6 matrices x 30 layers of 576 rows


@pytest.mark.slow
@pytest.mark.parametrize("model_dir,types,refused_want", [
    (TINYLLAMA, ["IQ4_XS", "IQ4_NL", "IQ3_XXS", "IQ3_XS", "IQ2_M", "IQ1_S", "Q2_K_S", "TQ1_0", "MXFP4_MOE"],
     ["IQ3_XXS", "IQ3_XS", "IQ2_M", "IQ1_S", "Q2_K_S"]),
    # SmolLM2's 576-wide rows fall back to IQ4_NL: IQ3_XXS without an imatrix keeps nothing that needs one
    (SMOLLM2, ["IQ4_XS", "IQ3_XXS", "IQ2_XXS", "TQ2_0"], ["IQ2_XXS"]),
])
def test_iq_types_match_llama_quantize_output_with_and_without_imatrix(request, model_dir, types, refused_want):
    """llama-quantize with and without an imatrix (a synthetic GGUF imatrix): the same type for every
    tensor, the same bytes, and a refusal exactly where the plan needs an imatrix."""
    _need_llama_quantize()
    if not model_dir.exists():
        pytest.skip(f"{model_dir} is not built")
    f16 = _f16(request, model_dir, TOOL)
    specs, info = specs_from_gguf(f16)
    im = f16.with_suffix(".imatrix.gguf")
    if not im.exists():
        TOOL.write_imatrix(im, specs)
    refused = []
    for ftype in types:
        for imatrix in (None, im):
            dst = f16.with_suffix(f".{ftype}{'.im' if imatrix else ''}.gguf")
            plan, bad, file_bytes = TOOL.check_type(LLAMA_BIN, f16, specs, info, ftype, dst, imatrix)
            assert bad == [], f"{model_dir.name} {ftype} imatrix={imatrix is not None}: {bad[:5]}"
            if file_bytes is None:
                refused.append(ftype)
                assert imatrix is None and plan.needs_imatrix()
            else:
                assert file_bytes == plan.total_bytes
    assert refused == refused_want


# ---------------------------------------------------------------------------
# 4. attn8-mlp4
@pytest.mark.parametrize("model", ["tinyllama-10m", "smollm2-135m", "llama3-8b"])
def test_attn8_mlp4_preset(model):
    specs, info = MODELS[model]()
    p = make_plan(specs, info, preset="attn8-mlp4")
    q4km = make_plan(specs, info, "Q4_K_M")
    assert p.ftype == "Q4_K_M" and p.preset == "attn8-mlp4" and p.file_type == LlamaFileType.MOSTLY_Q4_K_M
    assert {e.name: e.qtype for e in make_plan(specs, info, "attn8-mlp4").entries} == \
        {e.name: e.qtype for e in p.entries}
    mlp4 = R.fallback(T.Q4_K, info.n_embd)[0]
    for e in p.entries:
        kind = e.name.split(".")[-2] if e.name.startswith("blk.") else e.name
        if kind in ("attn_q", "attn_k", "attn_v", "attn_output"):
            assert e.qtype == T.Q8_0, e
        elif kind in ("ffn_gate", "ffn_up"):
            assert e.qtype == mlp4 and e.fallback == (mlp4 != T.Q4_K), e
        elif kind == "ffn_down":
            assert e.qtype == R.fallback(T.Q4_K, e.shape[-1])[0], e
        else:                                         # token_embd, output, norms: as Q4_K_M
            assert e.qtype == q4km[e.name].qtype, e
    if model == "smollm2-135m":
        assert p["blk.0.ffn_up.weight"].reason.endswith("row 576 not a multiple of 256: Q4_K -> Q5_0 fallback")
    with pytest.raises(GgufqError, match="unknown preset"):
        make_plan(specs, info, preset="attn9")


# ---------------------------------------------------------------------------
# 5. map files
MAP = """
# sensitive layers
[[rule]]
pattern = "blk.*.ffn_down.weight"
layers = "0-1,7"
type = "Q6_K"

[[rule]]
pattern = "blk.*.ffn_*.weight"
layers = [3, 5]
type = "q8_0"

[[rule]]
pattern = "output.weight"
type = "Q4_K"

[[rule]]
pattern = "*_norm.weight"
type = "Q4_0"
"""


def test_map_rules_first_match_layers_and_fallback(tmp_path):
    f = tmp_path / "mine.toml"
    f.write_text(MAP)
    rules = load_map(f)
    assert [r.source for r in rules] == [f"mine.toml rule {i}" for i in (1, 2, 3, 4)]
    assert rules[0].layers == {0, 1, 7} and rules[1].layers == {3, 5} and rules[1].qtype == T.Q8_0
    specs, info = MODELS["tinyllama-10m"]()
    p = make_plan(specs, info, "Q4_K_M", rules=rules)
    for i in range(8):
        down, gate = p[f"blk.{i}.ffn_down.weight"], p[f"blk.{i}.ffn_gate.weight"]
        if i in (0, 1, 7):
            assert down.qtype == T.Q6_K and down.reason.startswith("mine.toml rule 1 (blk.*.ffn_down.weight layers 0-1,7)")
        elif i in (3, 5):
            assert down.qtype == T.Q8_0 and gate.qtype == T.Q8_0 and "rule 2" in down.reason
        else:   # unmatched: the Q4_K_M mixture, counted as if no map existed
            assert down.reason.startswith("Q4_K_M:")
            assert down.qtype == (T.Q6_K if R.use_more_bits(i, 8) else T.Q4_K)
    assert p["output.weight"].qtype == T.Q4_K
    assert p["blk.0.attn_norm.weight"].qtype == T.F32            # maps never quantize norms
    assert p.warnings == ["mine.toml rule 4 (*_norm.weight) matched no quantizable tensor"]
    # a rule's type that does not fit the row falls back as llama.cpp does, and says so
    specs, info = MODELS["smollm2-135m"]()
    p = make_plan(specs, info, "Q8_0", rules=parse_map(
        '[[rule]]\npattern = "blk.*.attn_q.weight"\ntype = "Q6_K"\n', "m.toml"))
    e = p["blk.2.attn_q.weight"]
    assert e.qtype == T.Q8_0 and e.fallback
    assert e.reason == "m.toml rule 1 (blk.*.attn_q.weight) -> Q6_K; row 576 not a multiple of 256: Q6_K -> Q8_0 fallback"
    # user map over a preset over --type
    p = make_plan(specs, info, preset="attn8-mlp4", rules=parse_map(
        '[[rule]]\npattern = "blk.0.attn_*"\ntype = "F16"\n', "m.toml"))
    assert p["blk.0.attn_q.weight"].qtype == T.F16 and p["blk.1.attn_q.weight"].qtype == T.Q8_0


@pytest.mark.parametrize("text,msg", [
    ('[[rule]]\npattern = "blk.*"\ntype = "Q4_KK"\n', r"m.toml: rule 1: unknown type 'Q4_KK'; choose one of F32, F16"),
    ('[[rule]]\npattern = "blk.*"\ntype = "IQ4_XX"\n', r"rule 1: unknown type 'IQ4_XX'"),
    ('[[rule]]\npattern = "blk.[0-3.ffn_up.weight"\ntype = "Q8_0"\n', r"rule 1: bad glob 'blk.\[0-3.ffn_up.weight': '\[' at 4 is never closed"),
    ('[[rule]]\npattern = ""\ntype = "Q8_0"\n', r"rule 1: 'pattern' must be a non-empty glob"),
    ('[[rule]]\npattern = "blk. *"\ntype = "Q8_0"\n', r"bad glob"),
    ('[[rule]]\npattern = "a"\ntype = "Q8_0"\n[[rule]]\npattern = "b"\nlayers = "3-1"\ntype = "Q8_0"\n', r"m.toml: rule 2: bad layers '3-1'"),
    ('[[rule]]\npattern = "b"\nlayers = "x"\ntype = "Q8_0"\n', r"bad layers 'x'"),
    ('[[rule]]\npattern = "b"\nlayers = [-1]\ntype = "Q8_0"\n', r"bad layers \[-1\]"),
    ('[[rule]]\npattern = "b"\nlayers = []\ntype = "Q8_0"\n', r"bad layers \[\]"),
    ('[[rule]]\npattern = "b"\ntype = "Q8_0"\nlayer = "1"\n', r"rule 1: unknown key 'layer'"),
    ('[[rule]]\npattern = "b"\n', r"rule 1: missing 'type'"),
    ('[[rule]]\npattern = "b"\ntype = "Q8_0"\n\n[[rule]\n', r"m.toml: TOML syntax error: .*at line 5, column 7"),
    ('pattern = "b"\n', r"unknown key 'pattern'; a map holds \[\[rule\]\] tables only"),
    ('', r"no \[\[rule\]\] tables"),
])
def test_bad_map_files_give_one_line_errors(text, msg):
    with pytest.raises(GgufqError, match=msg) as ei:
        parse_map(text, "m.toml")
    assert "\n" not in str(ei.value)


def test_map_errors_at_plan_and_load_time(tmp_path):
    specs, info = MODELS["tinyllama-10m"]()
    with pytest.raises(GgufqError, match=r"m.toml rule 1: layers 6-9 outside the model's 0-7"):
        make_plan(specs, info, "Q4_K_M", rules=parse_map('[[rule]]\npattern="*"\nlayers="6-9"\ntype="Q8_0"', "m.toml"))
    with pytest.raises(GgufqError, match="cannot read map file"):
        load_map(tmp_path / "missing.toml")
    with pytest.raises(GgufqError, match=r"unknown --type 'Q4_K_X'"):
        make_plan(specs, info, "Q4_K_X")


# ---------------------------------------------------------------------------
# 6. report and command
def test_report_table_and_json():
    specs, info = MODELS["smollm2-135m"]()
    plan = make_plan(specs, info, "Q4_K_M")
    table = format_table(plan)
    lines = table.splitlines()
    assert lines[0] == "plan: --type Q4_K_M, general.file_type MOSTLY_Q4_K_M (15)"
    assert len(lines) == 2 + len(specs) + 1 + 1 + len(plan.type_counts()) + 1
    row = next(ln for ln in lines if ln.startswith("blk.0.attn_q.weight"))
    assert "576x576" in row and " Q5_0 " in row and "fallback" in row
    assert f"{plan.bits_per_weight:.4f} bits per weight" in table
    assert "fallbacks taken: 180" in table
    j = json.loads(json.dumps(to_json(plan)))
    assert j["totals"]["bytes"] == plan.total_bytes == sum(t["bytes"] for t in j["tensors"])
    assert j["totals"]["types"] == plan.type_counts() and j["totals"]["fallbacks"] == 180
    assert j["file_type"] == int(LlamaFileType.MOSTLY_Q4_K_M)
    assert j["tensors"][1] == {"name": "output_norm.weight", "shape": [576], "type": "F32", "bytes": 2304,
                               "elements": 576, "reason": "1-D: not quantized, F32", "fallback": False}


def _plan_command():
    try:
        from ggufq.cli import main
    except ImportError as e:
        pytest.skip(f"ggufq.cli does not import yet ({e})")
    if "plan" not in main.commands:
        from ggufq.cli.plan import command
        main.add_command(command)
    return main


def test_plan_command_on_a_gguf_file(tmp_path):
    from click.testing import CliRunner

    from gguf import GGUFWriter
    import numpy as np

    main = _plan_command()
    path = tmp_path / "m.gguf"
    w = GGUFWriter(str(path), "llama")
    w.add_block_count(2)
    w.add_embedding_length(576)
    w.add_head_count(9)
    w.add_head_count_kv(3)
    specs, _ = llama_like(64, 576, 2, 9, 3, 1536, tied=True)
    for s in specs:
        w.add_tensor_info(s.name, s.shape, np.dtype(np.float32 if len(s.shape) == 1 else np.float16),
                          int(np.prod(s.shape)) * (4 if len(s.shape) == 1 else 2))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_ti_data_to_file()
    w.close()
    f = tmp_path / "map.toml"
    f.write_text('[[rule]]\npattern = "blk.1.*"\ntype = "Q8_0"\n')
    r = CliRunner().invoke(main, ["plan", str(path), "--preset", "attn8-mlp4", "--map", str(f), "--json"])
    assert r.exit_code == 0, r.output
    j = json.loads(r.output)
    types = {t["name"]: t["type"] for t in j["tensors"]}
    assert types["blk.0.ffn_up.weight"] == "Q5_0" and types["blk.1.ffn_up.weight"] == "Q8_0"
    assert types["blk.0.attn_q.weight"] == "Q8_0" and types["token_embd.weight"] == "Q8_0"
    r = CliRunner().invoke(main, ["plan", str(path), "--type", "Q4_K_M"])
    assert r.exit_code == 0 and "fallbacks taken: 12" in r.output
    f.write_text('[[rule]]\npattern = "blk.1.*"\ntype = "Q9"\n')
    r = CliRunner().invoke(main, ["plan", str(path), "--type", "Q4_K_M", "--map", str(f)])
    assert r.exit_code == 1
    assert "ggufq: error: map.toml: rule 1: unknown type 'Q9'" in r.output


@pytest.mark.parametrize("model_dir", [TINYLLAMA, SMOLLM2])
def test_plan_command_on_a_model_folder(request, model_dir):
    """ggufq plan MODEL_DIR (tensor list from ggufq.convert) plans what llama-quantize writes."""
    from click.testing import CliRunner

    if not model_dir.exists():
        pytest.skip(f"{model_dir} is not built")
    main = _plan_command()
    r = CliRunner().invoke(main, ["plan", str(model_dir), "--type", "Q4_K_M", "--json"])
    assert r.exit_code == 0, r.output
    got = {t["name"]: t["type"] for t in json.loads(r.output)["tensors"]}
    _need_llama_quantize()
    f16 = _f16(request, model_dir, TOOL)
    out = TOOL.quantize(LLAMA_BIN, f16, f16.with_suffix(".Q4_K_M.gguf"), "Q4_K_M")
    assert got == {n: t.name for n, (t, _) in TOOL.gguf_types(out).items()}


def test_check_encoders_names_the_types_ggufq_cannot_write_yet():
    from ggufq import quant

    specs, info = MODELS["smollm2-135m"]()
    have = set(quant.encoders())
    for ftype in ALL_TYPES:
        plan = make_plan(specs, info, ftype)
        missing = sorted({e.qtype.name for e in plan.entries if e.qtype not in have})
        if missing:
            with pytest.raises(GgufqError, match=f"--type {ftype} needs ") as ei:
                plan.check_encoders()
            assert all(f"{m} (" in str(ei.value) for m in missing)
        else:
            plan.check_encoders()
    assert T.Q8_0 in have
    make_plan(specs, info, "Q8_0").check_encoders()


# ---------------------------------------------------------------------------
# 7. i-quant, ternary and MXFP4 mixtures: the branches llama_quant_compute_types cannot show
#    (it always plans as without an imatrix) and the imatrix requirement
def _types(plan, *names):
    return [plan[n].qtype for n in names]


def test_iq3_xxs_and_iq4_follow_the_imatrix():
    specs, info = MODELS["tinyllama-10m"]()            # n_gqa 2, 8 layers: n_layer/8 = 1
    plain, im = make_plan(specs, info, "IQ3_XXS"), make_plan(specs, info, "IQ3_XXS", has_imatrix=True)
    assert plain["blk.3.attn_v.weight"].qtype == T.IQ3_S and "no imatrix" in plain["blk.3.attn_v.weight"].reason
    assert im["blk.3.attn_v.weight"].qtype == T.IQ3_XXS
    assert _types(plain, "blk.0.ffn_down.weight", "blk.1.ffn_down.weight") == [T.Q4_K, T.Q3_K]
    assert _types(im, "blk.0.ffn_down.weight", "blk.1.ffn_down.weight") == [T.IQ3_XXS, T.IQ3_XXS]
    for p in (plain, im):
        assert _types(p, "blk.2.attn_q.weight", "blk.2.attn_k.weight", "blk.2.attn_output.weight") == \
            [T.IQ2_S, T.IQ2_S, T.IQ3_S]
        assert _types(p, "token_embd.weight", "output.weight") == [T.IQ3_S, T.Q5_K]
    specs, info = llama3_8b()                           # n_gqa 4
    for ft in ("IQ4_XS", "IQ4_NL"):
        plain, im = make_plan(specs, info, ft), make_plan(specs, info, ft, has_imatrix=True)
        assert [i for i in range(32) if plain[f"blk.{i}.ffn_down.weight"].qtype == T.Q5_K] == [0, 1, 2, 3]
        assert all(im[f"blk.{i}.ffn_down.weight"].qtype == T[ft] for i in range(32))
        assert plain["blk.7.attn_v.weight"].qtype == T.Q5_K and plain["output.weight"].qtype == T.Q6_K


def test_iq2_branch_moe_mxfp4_and_fallbacks():
    specs, info = mixtral_8x7b()
    p = make_plan(specs, info, "IQ2_XXS")
    # the IQ2 branch takes no 8-expert Q8_0 bump; its ffn_down rule counts tensors, not layers
    assert _types(p, "blk.5.attn_v.weight", "blk.5.attn_k.weight", "blk.5.attn_output.weight") == [T.Q4_K, T.Q4_K, T.Q5_K]
    assert [i for i in range(32) if p[f"blk.{i}.ffn_down_exps.weight"].qtype == T.Q2_K] == [0, 1, 2, 3]
    assert _types(p, "token_embd.weight", "output.weight", "blk.9.ffn_up_exps.weight") == [T.Q2_K, T.Q5_K, T.IQ2_XXS]
    p = make_plan(specs, info, "MXFP4_MOE")
    assert p.file_type == LlamaFileType.MOSTLY_MXFP4_MOE
    assert _types(p, "blk.0.ffn_gate_exps.weight", "blk.0.ffn_up_exps.weight", "blk.0.ffn_down_exps.weight") == [T.MXFP4] * 3
    assert _types(p, "blk.0.attn_q.weight", "blk.0.attn_v.weight", "token_embd.weight", "output.weight") == [T.Q8_0] * 4
    assert p["blk.0.ffn_gate_inp.weight"].qtype == T.F32
    specs, info = MODELS["smollm2-135m"]()              # 576 = 18 * 32: 256-blocks fall back
    p = make_plan(specs, info, "IQ2_M")
    e = p["blk.4.attn_q.weight"]
    assert e.qtype == T.IQ4_NL and e.fallback and e.reason.endswith("row 576 not a multiple of 256: IQ2_S -> IQ4_NL fallback")
    # ffn_down rows of 1536 fit: the first n_layer/8 = 3 get IQ3_S, the rest the default IQ2_S
    assert _types(p, "blk.2.ffn_down.weight", "blk.3.ffn_down.weight") == [T.IQ3_S, T.IQ2_S]
    assert make_plan(specs, info, "TQ1_0")["blk.4.attn_q.weight"].qtype == T.Q4_0
    specs, info = MODELS["odd-rows"]()                  # 200 % 32 != 0
    for ft in ("IQ4_NL", "IQ4_XS", "IQ2_XXS", "MXFP4_MOE"):
        assert make_plan(specs, info, ft)["blk.1.attn_q.weight"].qtype == T.F16, ft


def test_imatrix_requirement_as_llama_quantize():
    specs, info = llama3_8b()
    p = make_plan(specs, info, "IQ2_XXS")
    need = {e.name for e in p.needs_imatrix()}
    assert "blk.0.attn_q.weight" in need and "blk.31.ffn_up.weight" in need
    assert "token_embd.weight" not in need and "output.weight" not in need and "blk.0.attn_v.weight" not in need  # Q4_K
    with pytest.raises(GgufqError) as ei:
        p.check_imatrix(False)
    msg = str(ei.value)
    assert "\n" not in msg and "--imatrix FILE" in msg and "ggufq[eval]" in msg and "IQ2_XXS" in msg
    p.check_imatrix(True)
    with pytest.raises(GgufqError, match="the imatrix has no entry for blk.0.attn_q.weight"):
        p.check_imatrix(True, covered={"blk.1.attn_q.weight"})
    # Q2_K_S: its Q2_K tensors need one (a plain Q2_K file does not); IQ3_XXS, IQ4_*, TQ*, MXFP4 never refuse
    assert make_plan(specs, info, "Q2_K_S").needs_imatrix() and not make_plan(specs, info, "Q2_K").needs_imatrix()
    for ft in ("IQ4_XS", "IQ4_NL", "TQ1_0", "TQ2_0", "MXFP4_MOE", "IQ3_S", "IQ3_M"):
        assert not make_plan(specs, info, ft).needs_imatrix(), ft
    assert make_plan(specs, info, "IQ3_XXS", has_imatrix=True).needs_imatrix()


def test_convert_refuses_grid_presets_before_writing(tmp_path, tiny):
    """Without their encoders (or without any importance: no --imatrix and no self-calibration) the grid
    presets stop with one line, nothing written (with llama-cpp-python and --calib-tokens > 0 the model
    makes its own imatrix: tests/test_calib.py)."""
    from conftest import run_cli
    from ggufq import quant

    out = tmp_path / "x.gguf"
    r = run_cli("convert", tiny, "-o", out, "--type", "IQ2_XXS", "--calib-tokens", "0", "-q")
    assert r.returncode == 1 and not out.exists() and not list(tmp_path.iterdir())
    err = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert len(err) == 1 and err[0].startswith("ggufq: error: --type IQ2_XXS needs ")
    if T.IQ2_XXS in quant.encoders():
        assert "--imatrix FILE" in err[0] and "--calib-tokens > 0" in err[0]
    else:
        assert "cannot encode yet" in err[0] and "IQ2_XXS (" in err[0]
