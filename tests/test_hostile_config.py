"""Hostile config.json variants of the tinyllama fixture: types, bounds against the tensors
present, non-finite hyperparameters; one line, exit 1, nothing written, no process left."""
from __future__ import annotations

import pytest

from hostile import check_case, edit_json, model_copy, replace


def _set(**kv):
    return lambda d: d.update(kv)


def _rope(**kv):
    return lambda d: d["rope_parameters"].update(kv)


CASES = {
    "num_hidden_layers 1e9": (_set(num_hidden_layers=1000000000), "num_hidden_layers = 1000000000 but"),
    "num_hidden_layers 9 of 8": (_set(num_hidden_layers=9), "files hold 8 layers"),
    "num_hidden_layers string": (_set(num_hidden_layers="8"), "num_hidden_layers must be an integer"),
    "num_hidden_layers 7.5": (_set(num_hidden_layers=7.5), "must be an integer"),
    "num_hidden_layers true": (_set(num_hidden_layers=True), "must be an integer"),
    "num_hidden_layers 0": (_set(num_hidden_layers=0), "at least 1"),
    "num_hidden_layers negative": (_set(num_hidden_layers=-1), "must not be negative"),
    "hidden_size 2^40": (_set(hidden_size=1 << 40), "no tensor has a dimension that large"),
    "hidden_size null list": (_set(hidden_size=[256]), "hidden_size must be an integer"),
    "hidden_size 0": (_set(hidden_size=0), "at least 1"),
    "vocab_size 10^12": (_set(vocab_size=10 ** 12), "vocab_size"),
    "intermediate_size string": (_set(intermediate_size="768"), "intermediate_size must be an integer"),
    "zero heads": (_set(num_attention_heads=0), "at least 1"),
    "zero kv heads": (_set(num_key_value_heads=0), "at least 1"),
    "heads > hidden": (_set(num_attention_heads=512), "more than hidden_size"),
    "heads not multiple of kv": (_set(num_key_value_heads=3), "not a multiple of num_key_value_heads"),
    "hidden not multiple of heads": (lambda d: (d.update(num_attention_heads=3), d.pop("head_dim"),
                                                d.update(num_key_value_heads=1)), "not a multiple of num_attention_heads"),
    "head_dim 2^40": (_set(head_dim=1 << 40), "head_dim"),
    "head_dim float": (_set(head_dim=64.5), "head_dim must be an integer"),
    "max_position_embeddings string": (_set(max_position_embeddings="2048"), "must be an integer"),
    "rope_theta NaN": (_rope(rope_theta=float("nan")), "rope_theta is nan"),
    "rope_theta Infinity": (_rope(rope_theta=float("inf")), "rope_theta is inf"),
    "rope_theta string": (_rope(rope_theta="10000"), "rope_theta must be a number"),
    "top rope_theta NaN": (lambda d: (d.pop("rope_parameters"), d.update(rope_theta=float("nan"))), "rope_theta is nan"),
    "rms_norm_eps -Infinity": (_set(rms_norm_eps=float("-inf")), "rms_norm_eps is -inf"),
    "rms_norm_eps bool": (_set(rms_norm_eps=True), "rms_norm_eps must be a number"),
    "yarn without original_max_position_embeddings": (_rope(rope_type="yarn", factor=4.0),
                                                       "needs original_max_position_embeddings"),
    "yarn factor NaN": (_rope(rope_type="yarn", factor=float("nan"), original_max_position_embeddings=2048),
                        "factor is nan"),
    "rope type a number": (_rope(rope_type=3), "rope_type must be a name"),
    "rope_parameters a string": (_set(rope_parameters="default"), "rope_parameters must be an object"),
    "rope_scaling a list": (_set(rope_scaling=[1]), "rope_scaling must be an object"),
    # (longrope converts as llama.cpp's converter does: LONGROPE scaling, Phi-3's factor tensors)
    "unknown rope type": (_rope(rope_type="mystery"), "not supported"),
    "tie_word_embeddings string": (_set(tie_word_embeddings="false"), "must be true or false"),
    "attention_bias number": (_set(attention_bias=1), "must be true or false"),
    "architectures a number": (_set(architectures=5), "architectures must be a list"),
    "architectures list of lists": (_set(architectures=[["LlamaForCausalLM"]]), "architectures must be a list"),
    "text_config a string": (_set(text_config="x"), "text_config must be an object"),
    "text_config overrides layers": (_set(text_config={"num_hidden_layers": 99}), "files hold 8 layers"),
    "no architectures": (lambda d: d.pop("architectures"), "unsupported architecture"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_hostile_config(case, tmp_path):
    m = model_copy(tmp_path / "m")
    edit_json(m / "config.json", CASES[case][0])
    out = tmp_path / "o"
    out.mkdir()
    check_case(["convert", m, "-o", out / "x.gguf", "-t", "Q8_0"], [out, m], CASES[case][1])


RAW = {
    "not JSON": ("{", "not valid JSON"),
    "a list": ("[1]", "must hold a JSON object"),
    "a string": ('"x"', "must hold a JSON object"),
    "empty": ("", "not valid JSON"),
    "duplicate key": ('{"num_hidden_layers": 8, "num_hidden_layers": 1000000000}', "duplicate key"),
    "nested 100000 deep": ('{"a":' + "[" * 100000 + "]" * 100000 + "}", "nested too deeply"),
    "NaN literal in sizes": ('{"architectures":["LlamaForCausalLM"],"hidden_size":NaN}', "hidden_size must be an integer"),
    "UTF-16": ('{"a":1}'.encode("utf-16"), "not valid JSON"),
}


@pytest.mark.parametrize("case", list(RAW))
def test_config_file_unreadable(case, tmp_path):
    m = model_copy(tmp_path / "m")
    replace(m / "config.json", RAW[case][0])
    out = tmp_path / "o"
    out.mkdir()
    check_case(["convert", m, "-o", out / "x.gguf"], [out, m], RAW[case][1])


def test_plan_checks_the_config_too(tmp_path):
    m = model_copy(tmp_path / "m")
    edit_json(m / "config.json", _set(num_hidden_layers=1000000000))
    check_case(["plan", m, "-t", "Q4_K_M"], [m], "num_hidden_layers")
