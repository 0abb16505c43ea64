"""Ollama Modelfiles: family recognition by rendering, golden Modelfiles, the Go templates
rendered (by tests/gotmpl.py) against the Jinja templates, Ollama's loadability checks."""
from __future__ import annotations

import functools
import os
from pathlib import Path

import gguf
import pytest

from ggufq import ollama
from tests import gotmpl
from tests.modelfile_parser import parse as parse_modelfile

ROOT = Path(__file__).resolve().parent.parent
TEMPLATES = ROOT / "fixtures" / "templates"
GOLDEN = Path(__file__).resolve().parent / "golden"
SMOL_GGUF = Path(os.environ.get("GGUFQ_SMOLLM2_GGUF", Path.home() / ".cache/ggufq/SmolLM2-135M-Instruct.Q4_1.gguf"))
UPDATE = os.environ.get("GGUFQ_UPDATE_GOLDEN") == "1"

# fixture -> (bos text, eos text, add_bos, family, default system prompt)
MODELS = {
    "smollm2-135m-instruct": ("<|im_start|>", "<|im_end|>", False, "chatml",
                              "You are a helpful AI assistant named SmolLM, trained by Hugging Face"),
    "qwen2.5-7b-instruct": ("", "<|im_end|>", False, "chatml",
                            "You are Qwen, created by Alibaba Cloud. You are a helpful assistant."),
    "meta-llama-3-8b-instruct": ("<|begin_of_text|>", "<|eot_id|>", True, "llama3", None),
    "llama-2-7b-chat": ("<s>", "</s>", True, "llama2", None),
    "mistral-7b-instruct-v0.2": ("<s>", "</s>", True, "mistral", None),
    "mistral-large-instruct-2411": ("<s>", "</s>", True, None, None),     # [SYSTEM_PROMPT]: not ours
    "qwen3-0.6b": ("", "<|im_end|>", False, "qwen3", None),
    "gemma-3-4b-it": ("<bos>", "<end_of_turn>", True, "gemma", None),
    "gemma-2-2b-it": ("<bos>", "<end_of_turn>", True, "gemma", None),
    "phi-3.5-mini-instruct": ("<s>", "<|endoftext|>", True, "phi3", None),
    "phi-4-mini-instruct": ("<|endoftext|>", "<|endoftext|>", False, "phi3", None),
    "smollm3-3b": ("", "<|im_end|>", False, None, None),             # metadata header, /think switches
    "granite-3.3-2b-instruct": ("", "<|end_of_text|>", False, None, None),   # today's date in its system
}
# Jinja templates that refuse a system message
NO_SYSTEM = {"mistral-7b-instruct-v0.2", "gemma-2-2b-it"}

SYSTEM_TWO_TURNS = [
    {"role": "system", "content": "You answer in one short sentence."},
    {"role": "user", "content": "What is the capital of France?"},
    {"role": "assistant", "content": "Paris is the capital of France."},
    {"role": "user", "content": "And of Italy?\nSay it \"briefly\"."},
]


def template(name: str) -> str:
    return (TEMPLATES / f"{name}.jinja").read_text()


def ollama_values(messages: list[dict], modelfile_system: str | None, think: bool | None = None) -> dict:
    """What Ollama hands a messages template: the Modelfile SYSTEM prepended when the chat has
    no system message (server/routes.go), then template.Execute's collate(): consecutive
    same-role messages merged, all system contents joined into .System; ``think`` as the API's
    ``think`` (None: not set). An assistant's ``<think>...</think>`` goes to ``.Thinking``, as a
    client sends back the ``thinking`` field Ollama gave it."""
    msgs = []
    for m in messages:
        m = dict(m)
        m["thinking"], m["content"] = ollama.split_thinking(m["content"]) if m["role"] == "assistant" \
            else ("", m["content"])
        msgs.append(m)
    if modelfile_system and (not msgs or msgs[0]["role"] != "system"):
        msgs.insert(0, {"role": "system", "content": modelfile_system, "thinking": ""})
    system = "\n\n".join(m["content"] for m in msgs if m["role"] == "system")
    collated = []
    for m in msgs:
        if collated and collated[-1]["role"] == m["role"] and m["role"] != "tool":
            collated[-1]["content"] += "\n\n" + m["content"]
        else:
            collated.append(m)
    return {"System": system, "IsThinkSet": think is not None, "Think": bool(think),
            "Messages": [{"Role": m["role"], "Content": m["content"], "Thinking": m["thinking"]} for m in collated]}


@functools.lru_cache(maxsize=None)
def _build(name: str) -> tuple[str, tuple[str, ...]]:
    text, notes = _build_uncached(name)
    return text, tuple(notes)


def build(name: str) -> tuple[str, list[str]]:
    """(Modelfile text, notes) of a fixture (recognition renders the Jinja a dozen times: once per name)."""
    text, notes = _build(name)
    return text, list(notes)


def _build_uncached(name: str) -> tuple[str, list[str]]:
    bos, eos, add_bos, _, _ = MODELS[name]
    return ollama.modelfile(f"{name}-Q8_0.gguf", template(name), bos=bos, eos=eos, add_bos=add_bos,
                            eos_texts=[eos], license_text=f"Licence of {name} (test text)\n",
                            header=f"golden Modelfile for {name}")


def commands(text: str) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for name, value in parse_modelfile(text):
        out.setdefault(name, []).append(value)
    return out


# ---------------------------------------------------------------- recognition

@pytest.mark.parametrize("name", MODELS)
def test_recognise_by_rendering(name):
    bos, eos, add_bos, family, default_system = MODELS[name]
    m = ollama.recognise(template(name), bos, eos, add_bos)
    if family is None:
        assert m is None
        return
    assert m is not None and m.family.name == family
    assert m.default_system == default_system


def test_recognition_is_by_output_not_source():
    # the same ChatML written differently (namespace-free loop, other quoting, whitespace control)
    src = ("{%- for m in messages -%}\n  {{- \"<|im_start|>\" ~ m.role ~ \"\\n\" ~ m.content ~ \"<|im_end|>\\n\" -}}\n"
           "{%- endfor -%}\n{%- if add_generation_prompt -%}{{ \"<|im_start|>assistant\\n\" }}{%- endif -%}")
    m = ollama.recognise(src, "", "<|im_end|>", False)
    assert m is not None and m.family.name == "chatml" and m.default_system is None
    # ChatML-looking source that renders differently (no newline after the role) is not ChatML
    assert ollama.recognise(src.replace("m.role ~ \"\\n\"", "m.role"), "", "<|im_end|>", False) is None
    assert ollama.recognise("{{ 'not a chat template' }}", "", "", False) is None
    assert ollama.recognise("{% for %}", "", "", False) is None      # jinja cannot parse it
    assert ollama.recognise(None) is None


# ---------------------------------------------------------------- golden Modelfiles

@pytest.mark.parametrize("name", MODELS)
def test_golden_modelfile(name):
    text, notes = build(name)
    path = GOLDEN / f"ollama-{name}.Modelfile"
    if UPDATE:
        path.parent.mkdir(exist_ok=True)
        path.write_text(text)
    assert text == path.read_text(), f"{path} differs (GGUFQ_UPDATE_GOLDEN=1 rewrites it)"
    cmds = commands(text)
    assert cmds["model"] == [f"./{name}-Q8_0.gguf"]
    assert cmds["license"] == [f"Licence of {name} (test text)"]
    bos, eos, add_bos, family, default_system = MODELS[name]
    assert eos in cmds["stop"] and len(set(cmds["stop"])) == len(cmds["stop"])
    if family is None:
        assert "template" not in cmds and any("not recognised" in n for n in notes)
        return
    m = ollama.recognise(template(name), bos, eos, add_bos)
    assert cmds["template"] == [m.go_template]              # survives Ollama's parser byte for byte
    assert cmds.get("system") == ([default_system] if default_system else None)
    assert set(m.family.stops) <= set(cmds["stop"])


# ---------------------------------------------------------------- Go template == Jinja

def _go_prompt(name: str, messages: list[dict], think: bool | None = None) -> str:
    cmds = commands(build(name)[0])
    system = cmds.get("system", [None])[0]
    return gotmpl.render(cmds["template"][0], ollama_values(messages, system, think))


@pytest.mark.parametrize("name", [n for n, v in MODELS.items() if v[3] is not None])
def test_go_template_matches_jinja_two_turns(name):
    bos, eos, add_bos, *_ = MODELS[name]
    msgs = SYSTEM_TWO_TURNS
    if name in NO_SYSTEM:
        msgs = msgs[1:]                       # its Jinja refuses system messages
    want = ollama.prompt_after_bos(template(name), msgs, bos, eos, add_bos)
    assert _go_prompt(name, msgs) == want


@pytest.mark.parametrize("name", [n for n, v in MODELS.items() if v[3] is not None])
def test_go_template_matches_jinja_without_system(name):
    """No system message: the Jinja default system prompt must come back through SYSTEM."""
    bos, eos, add_bos, *_ = MODELS[name]
    msgs = SYSTEM_TWO_TURNS[1:] + [{"role": "assistant", "content": "Rome."},
                                   {"role": "user", "content": "Thanks!"}]
    for n in (1, 3, len(msgs)):
        want = ollama.prompt_after_bos(template(name), msgs[:n], bos, eos, add_bos)
        assert _go_prompt(name, msgs[:n]) == want


def test_mistral_system_goes_before_first_user_message():
    text, notes = build("mistral-7b-instruct-v0.2")
    assert any("refuses system messages" in n for n in notes)
    got = _go_prompt("mistral-7b-instruct-v0.2", SYSTEM_TWO_TURNS)
    s, u1, a1, u2 = (m["content"] for m in SYSTEM_TWO_TURNS)
    assert got == f"[INST] {s}\n\n{u1} [/INST]{a1}</s>[INST] {u2} [/INST]"


def test_gemma_system_goes_into_first_user_turn():
    """Gemma 3's Jinja puts the system prompt in front of the first user message; Gemma 2's refuses
    one, and its TEMPLATE does as Gemma 3's (Ollama's gemma templates do the same)."""
    s, u1, a1, u2 = (m["content"] for m in SYSTEM_TWO_TURNS)
    want = (f"<start_of_turn>user\n{s}\n\n{u1}<end_of_turn>\n<start_of_turn>model\n{a1}<end_of_turn>\n"
            f"<start_of_turn>user\n{u2}<end_of_turn>\n<start_of_turn>model\n")
    assert _go_prompt("gemma-3-4b-it", SYSTEM_TWO_TURNS) == want
    assert _go_prompt("gemma-2-2b-it", SYSTEM_TWO_TURNS) == want
    assert any("refuses system messages" in n for n in build("gemma-2-2b-it")[1])
    assert not any("refuses system messages" in n for n in build("gemma-3-4b-it")[1])


THINKING = [{"role": "system", "content": "You answer in one short sentence."},
            {"role": "user", "content": "What is 2+2?"},
            {"role": "assistant", "content": "<think>\nTwo and two.\n</think>\n\nIt is 4."},
            {"role": "user", "content": "And 3+3?"}]


@pytest.mark.parametrize("think", [None, False, True])
def test_qwen3_thinking_matches_jinja(think):
    """Ollama's think option against the Jinja's enable_thinking: earlier reasoning is dropped, think=false
    gives the empty <think> block; the TEMPLATE names .Thinking so that Ollama infers the tags."""
    bos, eos, add_bos, *_ = MODELS["qwen3-0.6b"]
    text, notes = build("qwen3-0.6b")
    assert "{{ .Thinking }}" in commands(text)["template"][0] and any("reasoning" in n for n in notes)
    for msgs in (THINKING, THINKING[1:], THINKING[1:2]):
        want = ollama.prompt_after_bos(template("qwen3-0.6b"), msgs, bos, eos, add_bos, think)
        assert _go_prompt("qwen3-0.6b", msgs, think) == want
    assert ("<think>\n\n</think>\n\n" in _go_prompt("qwen3-0.6b", THINKING, think)) == (think is False)
    assert "Two and two" not in _go_prompt("qwen3-0.6b", THINKING, think)


@pytest.mark.parametrize("name, msgs", [("gemma-3-4b-it", SYSTEM_TWO_TURNS[1:3]),
                                        ("phi-3.5-mini-instruct", SYSTEM_TWO_TURNS[:3]),
                                        ("qwen3-0.6b", THINKING[:3])])
def test_last_assistant_message_is_continued(name, msgs):
    """A chat ending with the assistant's message (Ollama continues it): the Jinja prompt without the
    generation prompt, up to the end of that message."""
    bos, eos, add_bos, *_ = MODELS[name]
    jinja = ollama.render_jinja(template(name), msgs, bos=bos, eos=eos, add_generation_prompt=False)
    jinja = jinja[len(bos):] if add_bos and jinja.startswith(bos) else jinja
    got = _go_prompt(name, msgs)
    assert got.endswith(msgs[-1]["content"].split("</think>")[-1].lstrip("\n"))
    assert jinja.startswith(got) and jinja[len(got):].lstrip().startswith(("<end_of_turn>", "<|end|>", "<|im_end|>"))


@pytest.mark.parametrize("name, trims", [("meta-llama-3-8b-instruct", True), ("llama-2-7b-chat", True),
                                         ("smollm2-135m-instruct", False)])
def test_trimming_templates_are_noted(name, trims):
    notes = build(name)[1]
    assert any("strips whitespace" in n for n in notes) == trims


def test_real_smollm2_gguf_template_is_the_fixture_and_header_reads():
    if not SMOL_GGUF.is_file():
        pytest.skip(f"{SMOL_GGUF} absent")
    r = gguf.GGUFReader(str(SMOL_GGUF))
    assert r.fields["tokenizer.chat_template"].contents() == template("smollm2-135m-instruct")
    # ggufq.ollama's own header reader agrees with gguf-py's
    info = ollama.read_gguf([SMOL_GGUF])
    assert info.chat_template == template("smollm2-135m-instruct")
    assert info.arch == r.fields["general.architecture"].contents()
    assert info.tensor_types == {t.tensor_type.name for t in r.tensors} == {"F32", "Q4_1", "Q8_0"}
    assert info.tokens == r.fields["tokenizer.ggml.tokens"].contents()
    assert (info.bos, info.eos, info.add_bos, info.eos_ids) == ("<|im_start|>", "<|im_end|>", False, [2])


# ---------------------------------------------------------------- what Ollama loads

def test_check_lists():
    assert ollama.check("llama", ["F32", "Q8_0", "Q4_K", "Q6_K", "BF16"]) == []
    assert ollama.check("qwen2", [gguf.GGMLQuantizationType.Q5_K, 8]) == []
    w = ollama.check("llama", ["F32", "TQ1_0", gguf.GGMLQuantizationType.TQ2_0])
    assert len(w) == 1 and "TQ1_0, TQ2_0" in w[0] and ollama.OLLAMA_VERSION in w[0]
    w = ollama.check("MistralForCausalLM", ["F16"])
    assert len(w) == 1 and "'MistralForCausalLM'" in w[0]
    assert ollama.check("gptoss", ["MXFP4"]) == []          # translated by Ollama's compat layer


def test_check_covers_what_ggufq_writes():
    """Every architecture ggufq converts loads in Ollama, and so does every type it encodes but the
    ternary TQ1_0/TQ2_0, which Ollama v0.32.15's reader has no size for: those are warned about."""
    from ggufq import arch, quant
    arch._load()
    names = {gguf.MODEL_ARCH_NAMES[cls.gguf_arch] for cls in arch._REGISTRY.values()}
    types = [t for t in quant.encoders() if t.name not in ("TQ1_0", "TQ2_0")]
    assert names and types
    assert ollama.check("llama", types) == []
    (warning,) = ollama.check("llama", [gguf.GGMLQuantizationType.TQ1_0, gguf.GGMLQuantizationType.TQ2_0])
    assert "TQ1_0, TQ2_0" in warning and "refuses the file" in warning
    for n in names:
        assert ollama.check(n, []) == [], n


# ---------------------------------------------------------------- licence

def test_license_text(tmp_path):
    assert ollama.license_text(tmp_path) is None
    (tmp_path / "README.md").write_text("---\nlanguage: en\nlicense: apache-2.0\ntags: [x]\n---\n# Model\n")
    assert ollama.license_text(tmp_path) == "apache-2.0"
    (tmp_path / "README.md").write_text("---\nlicense: other\nlicense_name: llama3\n"
                                        "license_link: https://example.org/LICENSE\n---\n")
    assert ollama.license_text(tmp_path) == "llama3 https://example.org/LICENSE"
    (tmp_path / "README.md").write_text("# no front matter\nlicense: mit\n")
    assert ollama.license_text(tmp_path) is None
    (tmp_path / "LICENSE.txt").write_text("Full licence text.\n")
    assert ollama.license_text(tmp_path) == "Full licence text.\n"


# ---------------------------------------------------------------- write_modelfile on a real GGUF

def test_write_modelfile_real_gguf(tmp_path):
    if not SMOL_GGUF.is_file():
        pytest.skip(f"{SMOL_GGUF} absent")
    model_dir = tmp_path / "model"
    model_dir.mkdir()
    (model_dir / "README.md").write_text("---\nlicense: apache-2.0\n---\n")
    (model_dir / "generation_config.json").write_text('{"eos_token_id": [2, 0]}')
    out = tmp_path / "out"
    out.mkdir()
    link = out / "smollm2-Q4_1.gguf"
    link.symlink_to(SMOL_GGUF)
    notes = ollama.write_modelfile(link, model_dir)
    mf = out / "smollm2-Q4_1.Modelfile"
    assert notes[0] == f"wrote {mf}"
    assert not any(n.startswith("Ollama:") for n in notes), notes
    cmds = commands(mf.read_text())
    assert cmds["model"] == ["./smollm2-Q4_1.gguf"]
    assert cmds["template"] == [ollama._CHATML_GO]
    assert cmds["system"] == ["You are a helpful AI assistant named SmolLM, trained by Hugging Face"]
    assert cmds["stop"] == ["<|im_start|>", "<|im_end|>", "<|endoftext|>"]   # eos ids 2 and 0
    assert cmds["license"] == ["apache-2.0"]


def test_write_modelfile_split_conversion(tmp_path, tiny):
    """A real split conversion of the tiny model (no chat template): one FROM per shard."""
    from conftest import run_cli
    out = tmp_path / "tiny-F16.gguf"
    r = run_cli("convert", tiny, "-o", out, "--type", "F16", "--split-max-tensors", "30", "-q")
    assert r.returncode == 0, r.stderr
    shards = sorted(tmp_path.glob("tiny-F16-*-of-*.gguf"))
    assert len(shards) >= 2
    notes = ollama.write_modelfile(shards, tiny)
    mf = tmp_path / "tiny-F16.Modelfile"
    assert notes[0] == f"wrote {mf}"
    assert any("no chat template" in n for n in notes)
    assert not any(n.startswith("Ollama:") for n in notes), notes
    cmds = commands(mf.read_text())
    assert cmds["model"] == [f"./{p.name}" for p in shards]
    assert "template" not in cmds and "system" not in cmds
    info = ollama.read_gguf(shards)
    assert info.tensor_types == {"F16", "F32"}
    assert cmds["stop"] == [info.eos] and info.eos == "</s>"


# ---------------------------------------------------------------- the real text/template, where Go is installed

_GO_RENDER = r"""
package main

import (
	"encoding/json"
	"os"
	"strings"
	"text/template"
)

type job struct {
	Template string         `json:"template"`
	Data     map[string]any `json:"data"`
}

func main() {
	var jobs []job
	if err := json.NewDecoder(os.Stdin).Decode(&jobs); err != nil {
		panic(err)
	}
	out := []string{}
	for _, j := range jobs {
		// as Ollama's template.Parse: missingkey=zero
		t := template.Must(template.New("").Option("missingkey=zero").Parse(j.Template))
		var b strings.Builder
		if err := t.Execute(&b, j.Data); err != nil {
			panic(err)
		}
		out = append(out, b.String())
	}
	json.NewEncoder(os.Stdout).Encode(out)
}
"""


def test_go_text_template_agrees(tmp_path):
    """Go's own text/template renders our TEMPLATEs exactly as tests/gotmpl.py and the Jinja do."""
    import json
    import shutil
    import subprocess
    go = shutil.which("go")
    if go is None:
        pytest.skip("no Go toolchain (apt-get install golang-go) to run text/template")
    convs = [SYSTEM_TWO_TURNS, SYSTEM_TWO_TURNS[1:], SYSTEM_TWO_TURNS[1:2],
             SYSTEM_TWO_TURNS + [{"role": "assistant", "content": "Rome."}, {"role": "user", "content": "Thanks"}]]
    jobs, wants = [], []
    for name, (bos, eos, add_bos, family, _) in MODELS.items():
        if family is None:
            continue
        cmds = commands(build(name)[0])
        system = cmds.get("system", [None])[0]
        for msgs in convs:
            if name in NO_SYSTEM and msgs[0]["role"] == "system":
                continue
            for think in ((None, False, True) if family == "qwen3" else (None,)):
                data = ollama_values(msgs, system, think)
                jobs.append({"template": cmds["template"][0], "data": data})
                wants.append((gotmpl.render(cmds["template"][0], data),
                              ollama.prompt_after_bos(template(name), msgs, bos, eos, add_bos, think)))
    src = tmp_path / "render.go"
    src.write_text(_GO_RENDER)
    env = dict(os.environ, GOCACHE=str(tmp_path / "gocache"), GO111MODULE="off", GOFLAGS="")
    r = subprocess.run([go, "run", str(src)], input=json.dumps(jobs), capture_output=True, text=True,
                       env=env, timeout=300)
    assert r.returncode == 0, r.stderr
    got = json.loads(r.stdout)
    assert len(got) == len(wants) > 10
    for g, (mine, jinja) in zip(got, wants):
        assert g == mine == jinja


def test_quoting_round_trips_through_ollamas_parser():
    lic = 'MIT License\n\n  "Software" is "AS IS".\n# not a comment\n\tTabbed "quote"'
    text, notes = ollama.modelfile("a b.gguf", template("smollm2-135m-instruct"), bos="<|im_start|>",
                                   eos="<|im_end|>", add_bos=False, eos_texts=["<|im_end|>", 'say "stop" now', 'ends "q"'],
                                   license_text=lic)
    cmds = commands(text)
    assert cmds["model"] == ["./a b.gguf"]
    assert cmds["license"] == [lic + "\n"]
    assert cmds["stop"] == ["<|im_start|>", "<|im_end|>", 'say "stop" now']
    assert any("""stop 'ends "q"' cannot be quoted""" in n for n in notes)
    text, notes = ollama.modelfile("x.gguf", None, license_text='has """ inside')
    assert "license" not in commands(text) and any("cannot be quoted" in n for n in notes)


def test_moe_archs_and_mxfp4():
    """The MoE architectures ggufq writes (Mixtral is llama.cpp's "llama" with experts) and MXFP4 expert
    tensors load in the targeted Ollama; older releases refused llama.cpp's gpt-oss name and ggml's
    MXFP4 type (before v0.11.5): said as notes, not warnings."""
    types = ["F32", "Q8_0", "Q4_K", "Q6_K", gguf.GGMLQuantizationType.MXFP4]
    for a in ("gpt-oss", "qwen3moe", "qwen2moe", "olmoe", "llama"):
        assert ollama.check(a, types) == [], a
    for a in ("qwen3moe", "qwen2moe", "olmoe", "llama"):
        assert ollama.older_notes(a, ["Q4_K", "F32"]) == [], a
    (arch_note,) = ollama.older_notes("gpt-oss", ["Q8_0", "F32"])
    assert arch_note.startswith("architecture 'gpt-oss': Ollama loads it from v0.11.5 on") and "'gptoss'" in arch_note
    notes = ollama.older_notes("gpt-oss", types)
    assert notes[0] == arch_note and notes[1].startswith("tensor type MXFP4: Ollama loads it from v0.11.5 on")
    assert ollama.older_notes("llama", [39]) == [notes[1]]       # by ggml type id too


def test_gpt_oss_convert_ollama_notes(tmp_path):
    """convert --ollama of a gpt-oss checkpoint with MXFP4 experts: the Modelfile is written, no
    warning for Ollama v0.32.15, the two older-release notes."""
    from conftest import run_cli
    from tools.synthetic_gptoss import make_gpt_oss
    d = make_gpt_oss(tmp_path / "g", hidden=64, ff=64, layers=1, heads=4, kv_heads=2, experts=4, active=2,
                     shards=1, seed=3, tokenizer="spm")
    out = tmp_path / "g.gguf"
    r = run_cli("convert", d, "-o", out, "--type", "MXFP4_MOE", "--ollama")
    assert r.returncode == 0, r.stderr
    assert (tmp_path / "g.Modelfile").is_file()
    lines = [x for x in r.stderr.splitlines() if x.startswith("Ollama: ")]
    assert len(lines) == 2 and all("from v0.11.5 on" in x for x in lines), r.stderr
    assert "refuses" not in r.stderr and "will fail" not in r.stderr
