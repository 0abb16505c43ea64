"""Hostile chat templates for --ollama: rendered in a forked child with time, memory and output
limits (ggufq.ollama.RENDER_*). A template beyond them gets no TEMPLATE line and one note; the
conversion itself succeeds, quickly, and leaves no process behind."""
from __future__ import annotations

import os
import time

import pytest

from hostile import edit_json, model_copy, no_process_left, run_forked

LIMITED = {
    "huge power": "{{ 10 ** 100000000 }}",
    "huge string repetition": "{{ 'ab' * 1000000000 }}",
    "huge list repetition": "{% set x = [1] * 1000000000 %}{{ x|length }}",
    "nested loops forever": "{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}x",
    "megabytes of output": "{% for i in range(100000) %}{% for j in range(100) %}0123456789{% endfor %}{% endfor %}",
    "power of a power": "{% set x = 2 ** 60 %}{{ x ** x }}",
    "power tower in a namespace": "{% set ns = namespace(x=10) %}{% for i in range(30) %}"
                                  "{% set ns.x = ns.x ** 64 %}{% endfor %}{{ ns.x }}",
}
UNRENDERABLE = {
    "infinite macro recursion": "{% macro f(n) %}{{ f(n + 1) }}{% endmacro %}{{ f(0) }}",
    "sandbox escape attempt": "{{ ''.__class__.__mro__[1].__subclasses__() }}",
    "range beyond the sandbox": "{{ range(10 ** 9)|list|length }}",
    "syntax error": "{% for %}",
    "undefined filter": "{{ messages|frobnicate }}",
}


def _convert(tmp_path, template: str):
    m = model_copy(tmp_path / "m")
    edit_json(m / "tokenizer_config.json", lambda d: d.update(chat_template=template))
    out = tmp_path / "o"
    out.mkdir()
    t0 = time.monotonic()
    r = run_forked("convert", m, "-o", out / "x.gguf", "-t", "Q8_0", "--ollama", timeout=120)
    assert "Traceback" not in r.err, r.err
    assert r.rc == 0, r.err
    assert sorted(os.listdir(out)) == ["x.Modelfile", "x.gguf"]
    text = (out / "x.Modelfile").read_text()
    assert "TEMPLATE" not in text
    no_process_left()
    return r, time.monotonic() - t0


@pytest.mark.parametrize("case", list(LIMITED))
def test_template_beyond_the_limits(case, tmp_path):
    r, secs = _convert(tmp_path, LIMITED[case])
    notes = [ln for ln in r.lines if "chat template" in ln or "rendered prompt" in ln]
    assert len(notes) == 1 and "no TEMPLATE written" in notes[0] and "limits" in notes[0], r.err
    assert secs < 60


@pytest.mark.parametrize("case", list(UNRENDERABLE))
def test_template_that_does_not_render(case, tmp_path):
    r, secs = _convert(tmp_path, UNRENDERABLE[case])
    notes = [ln for ln in r.lines if "chat template" in ln]
    assert len(notes) == 1 and "not recognised" in notes[0], r.err
