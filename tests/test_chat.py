"""The converted SmolLM2 chats: llama-cpp-python with the GGUF's own chat template answers a
short question, and the prompt our Ollama TEMPLATE renders gives the very same answer."""
from __future__ import annotations

import pytest

from conftest import run_cli
from ggufq import ollama
from tests import gotmpl
from tests.modelfile_parser import parse as parse_modelfile

QUESTION = "What is the capital of France?"


@pytest.fixture(scope="module")
def smol_q8(tmp_path_factory, smollm2):
    out = tmp_path_factory.mktemp("chat") / "smollm2-135m-dither-Q8_0.gguf"
    r = run_cli("convert", smollm2, "-o", out, "--type", "Q8_0", "-q")
    assert r.returncode == 0, r.stderr
    return out


@pytest.fixture(scope="module")
def llm(smol_q8):
    llama_cpp = pytest.importorskip("llama_cpp")
    m = llama_cpp.Llama(str(smol_q8), n_ctx=512, n_threads=2, seed=0, verbose=False)
    yield m
    m.close()


def test_chat_completion_answers(llm, smol_q8):
    assert "<|im_start|>" in llm.metadata["tokenizer.chat_template"]
    r = llm.create_chat_completion([{"role": "user", "content": QUESTION}], temperature=0.0, max_tokens=48)
    answer = r["choices"][0]["message"]["content"]
    assert "Paris" in answer, answer
    assert r["choices"][0]["finish_reason"] == "stop", answer      # ended on <|im_end|>, not max_tokens


def test_ollama_template_prompt_gives_the_same_answer(llm, smol_q8, smollm2):
    notes = ollama.write_modelfile(smol_q8, smollm2)
    mf = smol_q8.with_suffix(".Modelfile")
    assert notes[0] == f"wrote {mf}" and not any(n.startswith("Ollama:") for n in notes), notes
    cmds: dict[str, list[str]] = {}
    for name, value in parse_modelfile(mf.read_text()):
        cmds.setdefault(name, []).append(value)
    assert cmds["model"] == [f"./{smol_q8.name}"]
    # Ollama: Modelfile SYSTEM prepended to a chat without one, then the Go template
    data = {"System": cmds["system"][0],
            "Messages": [{"Role": "system", "Content": cmds["system"][0]}, {"Role": "user", "Content": QUESTION}]}
    prompt = gotmpl.render(cmds["template"][0], data)
    chat = llm.create_chat_completion([{"role": "user", "content": QUESTION}], temperature=0.0, max_tokens=48)
    comp = llm.create_completion(prompt, temperature=0.0, max_tokens=48, stop=cmds["stop"])
    assert comp["choices"][0]["text"] == chat["choices"][0]["message"]["content"]
    assert "Paris" in comp["choices"][0]["text"]
