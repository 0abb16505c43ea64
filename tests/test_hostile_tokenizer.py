"""Hostile tokenizer files and model cards of the tinyllama fixture: one line, exit 1,
nothing written, no process left."""
from __future__ import annotations


import pytest

from hostile import check_case, edit_json, model_copy, replace

TC = "tokenizer_config.json"


def _tc(**kv):
    return lambda m: edit_json(m / TC, lambda d: d.update(kv))


CASES = {
    "tokenizer.model garbage": (lambda m: replace(m / "tokenizer.model", b"\x0a\xff\xff\xff\xff\x0f" + b"x" * 64),
                                "tokenizer.model"),
    "tokenizer.model empty": (lambda m: replace(m / "tokenizer.model", b""), "tokenizer.model"),
    "tokenizer.model truncated": (lambda m: replace(m / "tokenizer.model",
                                                    (m / "tokenizer.model").read_bytes()[:5000]), "tokenizer.model"),
    "tokenizer_config not JSON": (lambda m: replace(m / TC, "{"), "not valid JSON"),
    "tokenizer_config a list": (lambda m: replace(m / TC, "[]"), "must hold a JSON object"),
    "tokenizer_config duplicate key": (lambda m: replace(m / TC, '{"add_bos_token": true, "add_bos_token": false}'),
                                       "duplicate key"),
    "tokenizer_config nested deeply": (lambda m: replace(m / TC, '{"a":' + "[" * 100000 + "]" * 100000 + "}"),
                                       "nested too deeply"),
    "chat_template a list of numbers": (_tc(chat_template=[1, 2]), "the tokenizer files"),
    "added_tokens_decoder wrong": (_tc(added_tokens_decoder={"x": "y"}), "the tokenizer files"),
    "special_tokens_map a list": (lambda m: replace(m / "special_tokens_map.json", "[1]"), "must hold a JSON object"),
    "generation_config not JSON": (lambda m: replace(m / "generation_config.json", "{"), "not valid JSON"),
    "tokenizer.json duplicate key": (lambda m: replace(m / "tokenizer.json", '{"model": {}, "model": {}}'),
                                     "duplicate key"),
    "README YAML unclosed bracket": (lambda m: replace(m / "README.md", "---\nlicense: [mit\n---\n# x\n"),
                                     "README.md"),
    "README YAML bad indentation": (lambda m: replace(m / "README.md", "---\na: b\n  c: d\n---\n"), "README.md"),
    "README YAML python object tag": (lambda m: replace(m / "README.md", "---\na: !!python/object/apply:os.system ['echo pwned']\n---\n"),
                                      "README.md"),
    "README not UTF-8": (lambda m: replace(m / "README.md", b"---\nname: \xff\xfe\n---\n"), ""),
}


@pytest.mark.parametrize("case", list(CASES))
def test_hostile_tokenizer_and_card(case, tmp_path):
    m = model_copy(tmp_path / "m")
    mutate, want = CASES[case]
    mutate(m)
    out = tmp_path / "o"
    out.mkdir()
    check_case(["convert", m, "-o", out / "x.gguf", "-t", "Q8_0"], [out, m], want)


# Wrong types that llama.cpp's converter (gguf-py's SpecialVocab / Metadata) skips: ggufq converts
# as it does, with nothing on stderr but the summary -- the same GGUF llama.cpp would write.
LENIENT = {
    "add_bos_token a string": _tc(add_bos_token="yes"),
    "chat_template a number": _tc(chat_template=5),
    "bos_token a number": _tc(bos_token=5),
    "README YAML a list": lambda m: replace(m / "README.md", "---\n- a\n- b\n---\n"),
    "README YAML tags a number": lambda m: replace(m / "README.md", "---\ntags: 5\nbase_model: 7\n---\n"),
}


@pytest.mark.parametrize("case", list(LENIENT))
def test_skipped_like_llama_cpp(case, tmp_path):
    from hostile import no_process_left, run_forked
    m = model_copy(tmp_path / "m")
    LENIENT[case](m)
    out = tmp_path / "o"
    out.mkdir()
    r = run_forked("convert", m, "-o", out / "x.gguf", "-t", "Q8_0", "-q")
    assert r.rc == 0 and r.err == "", r.err
    no_process_left()
