"""Ollama Modelfile next to a converted GGUF, and checks against what Ollama can load.

``modelfile(...)`` writes ``FROM``, ``TEMPLATE`` (Ollama's Go-template syntax), ``SYSTEM``,
``PARAMETER stop`` and ``LICENSE``; ``write_modelfile(gguf_path, model_dir)`` reads what it
needs from the written GGUF itself (what Ollama will see) and writes ``<stem>.Modelfile``.

The chat family is recognised by *rendering* the model's Jinja ``chat_template`` with jinja2
(as transformers does) on probe conversations and comparing the output with a reference
rendering of each known family -- not by matching the template's source text. A template
that renders like none of them gets no ``TEMPLATE`` line: Ollama then autodetects one of its
own templates from ``tokenizer.chat_template`` or renders the GGUF's Jinja template itself.

Reference (read, not copied): Ollama v0.32.15 (commit b7871fc0d1d82fe109536efa3e0e8e411c766c75,
2026-08-19; the files used are unchanged in v0.33.0-rc2, fb30760996871fa9460115c753afd2c60d4ab0f7):

* ``template/chatml.gotmpl`` and ``template/llama3-instruct.gotmpl`` are used verbatim, their
  ``.json`` stop lists as the family stops; the ``[INST]`` templates are ours, written in the
  same conventions (``range .Messages``, ``.Role``/``.Content``, ``$.System``, a ``$first``
  variable as ``template/llama2-chat.gotmpl`` uses) so that they reproduce the Hugging Face
  Jinja output exactly; so are the Gemma, Phi-3 and Qwen3 templates, modelled on the Ollama
  library's gemma3, phi3 and qwen3 templates (a last assistant message left open, Qwen3's
  ``.Thinking``, ``$.IsThinkSet`` and ``$.Think``);
* Ollama prepends the Modelfile ``SYSTEM`` as a system message when a chat has none
  (``server/routes.go``), which is how a template's default system prompt is reproduced;
* since commit 9db4bdbad (2026-05-29, "Remove CGO engines, use llama-server exclusively")
  Ollama has no Go model engine (``model/models/*`` is gone): every GGUF runs in llama.cpp's
  ``llama-server``, pinned in ``LLAMA_CPP_VERSION`` (b10488 for v0.32.15), with
  ``llama/compat/`` translating some Ollama-published architectures. Before that, Ollama's
  own Go GGUF reader (``fs/ggml``) decodes the file and refuses a tensor whose type it has no
  block size for (``Tensor.size()`` fails -> "tensor ... size overflow").
"""
from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Optional, Sequence

OLLAMA_VERSION = "v0.32.15"
OLLAMA_COMMIT = "b7871fc0d1d82fe109536efa3e0e8e411c766c75"
OLLAMA_LLAMA_CPP = "b10488"

# --------------------------------------------------------------------------- what Ollama loads

# ggml tensor types Ollama's GGUF reader (fs/ggml/ggml.go TensorType.TypeSize/BlockSize,
# Ollama v0.32.15) knows a size for; any other type makes Ollama refuse the file.
OLLAMA_TENSOR_TYPES = frozenset("""
F32 F16 Q4_0 Q4_1 Q5_0 Q5_1 Q8_0 Q8_1 Q2_K Q3_K Q4_K Q5_K Q6_K Q8_K
IQ2_XXS IQ2_XS IQ3_XXS IQ1_S IQ4_NL IQ3_S IQ2_S IQ4_XS I8 I16 I32 I64 F64 IQ1_M BF16
MXFP4 NVFP4 Q1_0
""".split())

# Architectures llama.cpp's loader knows (LLM_ARCH_NAMES in src/llama-arch.cpp). Taken from the
# llama.cpp vendored in llama-cpp-python 0.3.36 (llama.cpp commit 0c1e57098), the nearest copy
# of llama.cpp at hand; Ollama v0.32.15 runs llama.cpp b10488 (2026-08), an ancestor or near
# neighbour of it.
LLAMA_CPP_ARCHS = frozenset("""
clip llama llama4 deci falcon grok gpt2 gptj gptneox mpt baichuan starcoder refact bert
modern-bert nomic-bert nomic-bert-moe neo-bert jina-bert-v2 jina-bert-v3 eurobert bloom stablelm
qwen qwen2 qwen2moe qwen2vl qwen3 qwen3moe qwen3next qwen3vl qwen3vlmoe qwen35 qwen35moe
qwen4exp phi2 phi3 phimoe plamo plamo2 plamo3 codeshell orion internlm2 minicpm minicpm3 gemma
gemma2 gemma3 gemma3n gemma4 gemma4-assistant gemma-embedding starcoder2 mamba mamba2 maple
jamba falcon-h1 xverse command-r cohere2 cohere2moe dbrx olmo olmo2 olmoe muse-glimmer openelm
arctic deepseek deepseek2 deepseek2-ocr deepseek32 deepseek4 chatglm glm4 glm4moe glm-dsa bitnet
t5 t5encoder jais jais2 nemotron nemotron_h nemotron_h_moe exaone exaone4 exaone-moe rwkv6
rwkv6qwen2 rwkv7 arwkv7 granite granitemoe granitehybrid graniteswitch granite_swa chameleon
wavtokenizer-dec plm bailingmoe bailingmoe2 bailingmoe3 dots1 dots3note arcee afmoe laguna
ernie4_5 ernie4_5-moe hunyuan-moe hunyuan-dense hunyuan_vl hy_v3 hy_v4 smollm3 gpt-oss lfm2
lfm2moe dream smallthinker llada llada-moe seed_oss grovemoe apertus minimax-01 hrm_text
minimax-m2 minimax-m3 cogvlm rnd1 pangu-embedded mistral3 eagle3 dflash mistral4 paddleocr mimo2
step35 spark2_5 llama-embed maincoder kimi-linear kimi-k3 glm5-next talkie mellum nanbeige
qwen3tts pockettts
""".split())

# Ollama-published architecture names its compat layer (llama/compat/llama-ollama-compat.cpp,
# v0.32.15) translates onto a llama.cpp architecture at load time.
OLLAMA_COMPAT_ARCHS = frozenset("gptoss glm4moelite glmocr deepseekocr nemotron_h_omni qwen25vl olmo3".split())


# What llama.cpp's converter (and ggufq) writes for an architecture or tensor type that the targeted
# release loads but older Ollama releases refused: (GGUF arch or None, tensor type or None, first
# release that loads it, what the older ones do). Checked in Ollama's repository:
# * gpt-oss: llama.cpp names the arch "gpt-oss", Ollama's own engine registered only "gptoss"
#   (model/models/gptoss/model.go, v0.11.0-v0.11.4); commit 1a19df1f3 ("update vendored llama.cpp and
#   ggml", #11823, first in v0.11.5) registers "gpt-oss" too. Reports: ollama/ollama#11816 ("unknown
#   model architecture: 'gpt-oss'"), #11891 (fixed in v0.11.5-rc2).
# * MXFP4: Ollama's first gpt-oss (#11672, v0.11.0) put MXFP4 in ggml's unused type 4 (Q4_2's slot);
#   ggml's MXFP4 is 39, which v0.11.0-v0.11.4's vendored ggml and GGUF reader did not know
#   (fs/ggml/ggml.go: "case TensorTypeMXFP4:" -> "case TensorTypeMXFP4, 39:" in 1a19df1f3). Report:
#   ollama/ollama#11714 ("tensor 'blk.0.ffn_down_exps.weight' has invalid ggml type 39 (NONE)").
# qwen3moe, qwen2moe, olmoe and Mixtral (arch "llama" with experts) ran through the llama.cpp
# Ollama vendored long before any release this table could matter for: nothing to say.
OLDER_OLLAMA = (
    ("gpt-oss", None, "v0.11.5", "v0.11.0-v0.11.4 know the architecture only as Ollama's own 'gptoss'"),
    (None, "MXFP4", "v0.11.5", "v0.11.0-v0.11.4 read MXFP4 only as Ollama's type 4, not ggml's type 39"),
)


def older_notes(arch: str, tensor_types: Iterable) -> list[str]:
    """Notes on what older Ollama releases (than OLLAMA_VERSION, which loads the file) refuse."""
    types = {_type_name(t) for t in tensor_types}
    return [f"{what}: Ollama loads it from {first} on ({OLLAMA_VERSION} does); {why}"
            for a, t, first, why in OLDER_OLLAMA
            for what in ([f"architecture {a!r}"] if a == arch else [f"tensor type {t}"] if t in types else [])]


def _type_name(t) -> str:
    name = getattr(t, "name", None)
    if name is not None:
        return name
    if isinstance(t, int):
        import gguf
        try:
            return gguf.GGMLQuantizationType(t).name
        except ValueError:
            return f"type {t}"
    return str(t).upper()


def check(arch: str, tensor_types: Iterable) -> list[str]:
    """Warnings for what Ollama's current release cannot load (empty list: nothing known).

    ``tensor_types``: ggml type names ("Q4_K"), ``gguf.GGMLQuantizationType`` or ids.
    """
    warnings = []
    if arch not in LLAMA_CPP_ARCHS and arch not in OLLAMA_COMPAT_ARCHS:
        warnings.append(f"architecture {arch!r} is not one llama.cpp {OLLAMA_LLAMA_CPP} (Ollama "
                        f"{OLLAMA_VERSION}'s runner) knows; Ollama will fail to load the model")
    bad = sorted({n for n in map(_type_name, tensor_types) if n not in OLLAMA_TENSOR_TYPES})
    if bad:
        warnings.append(f"tensor type{'s' if len(bad) > 1 else ''} {', '.join(bad)}: Ollama "
                        f"{OLLAMA_VERSION}'s GGUF reader has no size for {'them' if len(bad) > 1 else 'it'} "
                        "and refuses the file")
    return warnings


# --------------------------------------------------------------------------- rendering Jinja

# Limits for rendering a chat template written by strangers (it runs in a forked child,
# ggufq.procs.run_limited): wall time, memory beyond the parent's, output size.
RENDER_SECONDS = 2.0
RENDER_MEMORY = 256 << 20
RENDER_OUTPUT = 1 << 20
_MAX_POW = 4096          # the largest exponent/operand size the sandbox's ** and * accept


class TemplateLimitError(Exception):
    """The chat template exceeded the rendering limits (time, memory or output size)."""


def _sandbox():
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    class Limited(ImmutableSandboxedEnvironment):
        """jinja2's immutable sandbox, refusing ``**`` and sequence ``*`` results that cannot be small."""
        intercepted_binops = frozenset(["*", "**"])

        def call_binop(self, context, operator, left, right):
            if operator == "**":
                if isinstance(right, (int, float)) and abs(right) > 64 and \
                        isinstance(left, (int, float)) and abs(left) > 1:
                    raise TemplateLimitError("the chat template computes a power too large to render")
            elif operator == "*":
                for seq, n in ((left, right), (right, left)):
                    if isinstance(seq, (str, list, tuple)) and isinstance(n, int) and \
                            len(seq) * n > RENDER_OUTPUT:
                        raise TemplateLimitError("the chat template repeats a string or list beyond the output limit")
            return super().call_binop(context, operator, left, right)

    return Limited


def _render_unlimited(chat_template: str, messages: list[dict], bos: str, eos: str,
                      add_generation_prompt: bool, extra: dict) -> str:
    from datetime import datetime

    from jinja2.exceptions import TemplateError

    def raise_exception(msg):
        raise TemplateError(msg)

    def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    env = _sandbox()(trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"])
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    out, size = [], 0
    for piece in env.from_string(chat_template).generate(messages=messages, bos_token=bos, eos_token=eos,
                                                         add_generation_prompt=add_generation_prompt, **extra):
        out.append(piece)
        size += len(piece)
        if size > RENDER_OUTPUT:
            raise TemplateLimitError(f"the rendered prompt is longer than {RENDER_OUTPUT} characters")
    return "".join(out)


def _render_child(chat_template, messages, bos, eos, add_generation_prompt, extra) -> bytes:
    from jinja2.exceptions import TemplateError
    try:
        return b"o" + _render_unlimited(chat_template, messages, bos, eos, add_generation_prompt,
                                        extra).encode("utf-8", "surrogatepass")
    except TemplateLimitError as e:
        return b"l" + str(e).encode("utf-8", "replace")
    except TemplateError as e:
        return b"t" + str(e).encode("utf-8", "replace")
    except Exception as e:
        return b"e" + f"{type(e).__name__}: {e}".encode("utf-8", "replace")[:1000]


def render_jinja(chat_template: str, messages: list[dict], *, bos: str = "", eos: str = "",
                 add_generation_prompt: bool = True, **extra) -> str:
    """Render a Hugging Face chat template as transformers does (sandboxed jinja2,
    trim_blocks/lstrip_blocks, raise_exception, tojson, strftime_now) -- in a forked child
    with :data:`RENDER_SECONDS`, :data:`RENDER_MEMORY` and :data:`RENDER_OUTPUT` limits
    (:class:`TemplateLimitError` beyond them): the template comes from the model folder."""
    from jinja2.exceptions import TemplateError

    from .procs import LimitExceeded, run_limited
    try:
        res = run_limited(_render_child, (chat_template, messages, bos, eos, add_generation_prompt, extra),
                          timeout=RENDER_SECONDS, max_memory=RENDER_MEMORY, max_output=4 * RENDER_OUTPUT + 16)
    except LimitExceeded as e:
        raise TemplateLimitError(f"rendering the chat template {e}") from None
    kind, body = res[:1], res[1:].decode("utf-8", "surrogatepass" if res[:1] == b"o" else "replace")
    if kind == b"o":
        return body
    if kind == b"l":
        raise TemplateLimitError(body)
    if kind == b"t":
        raise TemplateError(body)
    raise ValueError(body)


# --------------------------------------------------------------------------- families

_CHATML_GO = """{{- range .Messages }}<|im_start|>{{ .Role }}
{{ .Content }}<|im_end|>
{{ end }}<|im_start|>assistant
"""

_LLAMA3_GO = """{{- range .Messages }}<|start_header_id|>{{ .Role }}<|end_header_id|>

{{ .Content }}<|eot_id|>
{{- end }}<|start_header_id|>assistant<|end_header_id|>

"""

# Llama 2 chat: <<SYS>> block inside the first [INST]; every later turn starts with BOS.
_LLAMA2_GO = """{{- $first := true }}
{{- range .Messages }}
{{- if eq .Role "user" }}{{ if not $first }}{BOS}{{ end }}[INST] {{ if and $first $.System }}<<SYS>>
{{ $.System }}
<</SYS>>

{{ end }}{{ .Content }} [/INST]{{ $first = false }}
{{- else if eq .Role "assistant" }} {{ .Content }} {EOS}
{{- end }}
{{- end }}"""

# Mistral [INST] (v0.1/v0.2 and the 'v1' template with a system prompt): the system prompt
# goes in front of the first user message, separated by a blank line.
_MISTRAL_GO = """{{- $first := true }}
{{- range .Messages }}
{{- if eq .Role "user" }}{LEAD}[INST] {{ if and $first $.System }}{{ $.System }}

{{ end }}{{ .Content }} [/INST]{{ $first = false }}
{{- else if eq .Role "assistant" }}{APRE}{{ .Content }}{EOS}{POST}
{{- end }}
{{- end }}"""


# The templates below follow the Ollama library's own (gemma3, phi3, qwen3 on ollama.com): a
# ``$last`` message that is the assistant's stays open (Ollama continues it: prefill), any other
# last message is followed by the generation prompt. They are written to render exactly what the
# model's Jinja template renders with add_generation_prompt=True.

# Gemma 2/3: "model" for the assistant, the system prompt in front of the first user message.
_GEMMA_GO = """{{- $first := true }}
{{- range $i, $_ := .Messages }}
{{- $last := eq (len (slice $.Messages $i)) 1 }}
{{- if eq .Role "user" }}<start_of_turn>user
{{ if and $first $.System }}{{ $.System }}

{{ end }}{{ .Content }}<end_of_turn>
{{ if $last }}<start_of_turn>model
{{ end }}{{ $first = false }}
{{- else if eq .Role "assistant" }}<start_of_turn>model
{{ .Content }}{{ if not $last }}<end_of_turn>
{{ end }}{{ $first = false }}
{{- end }}
{{- end }}"""

# Phi-3 / Phi-3.5 (NL = newline) and Phi-4-mini (NL = ""): <|role|> ... <|end|>; an empty system
# message is left out as Phi-3.5's template does, other roles are not rendered.
_PHI3_GO = """{{- range $i, $_ := .Messages }}
{{- $last := eq (len (slice $.Messages $i)) 1 }}
{{- if or (eq .Role "user") (eq .Role "assistant") (and (eq .Role "system") .Content) }}<|{{ .Role }}|>{NL}{{ .Content }}
{{- if or (ne .Role "assistant") (not $last) }}<|end|>{NL}{{ end }}
{{- end }}
{{- if and $last (ne .Role "assistant") }}<|assistant|>{NL}{{ end }}
{{- end }}"""

# Qwen3: ChatML; reasoning of an assistant turn after the last user message is shown as
# <think>...</think> (earlier turns lose it, as in Qwen3's Jinja); with think=false (Ollama's
# IsThinkSet and not Think, the Jinja's enable_thinking=false) the generation prompt carries an
# empty <think> block. Ollama infers the <think>/</think> tags from the .Thinking action.
_QWEN3_GO = """{{- $lastUser := -1 }}
{{- range $i, $m := .Messages }}{{ if eq $m.Role "user" }}{{ $lastUser = $i }}{{ end }}{{ end }}
{{- range $i, $_ := .Messages }}
{{- $last := eq (len (slice $.Messages $i)) 1 }}
{{- if eq .Role "assistant" }}<|im_start|>assistant
{{ if and .Thinking (or $last (gt $i $lastUser)) }}<think>
{{ .Thinking }}
</think>

{{ end }}{{ .Content }}{{ if not $last }}<|im_end|>
{{ end }}
{{- else }}<|im_start|>{{ .Role }}
{{ .Content }}<|im_end|>
{{ end }}
{{- if and $last (ne .Role "assistant") }}<|im_start|>assistant
{{ if and $.IsThinkSet (not $.Think) }}<think>

</think>

{{ end }}
{{- end }}
{{- end }}"""


@dataclass
class Family:
    name: str
    go: str                                   # Go template; {BOS}/{EOS}/{NL}/... filled in per model
    stops: tuple[str, ...]                    # PARAMETER stop besides the EOS token texts
    reference: Callable                       # (messages, system_default, bos, eos, think=None, **params) -> prompt
    system_pattern: Optional[str] = None      # regex whose group 1 is a default system prompt
    variants: tuple[dict, ...] = ({},)        # parameter sets to try
    thinking: bool = False                    # the template shows reasoning (Ollama's .Thinking, think=false)


def _sys_and_rest(messages):
    if messages and messages[0]["role"] == "system":
        return messages[0]["content"], messages[1:]
    return None, messages


def _ref_chatml(messages, default_system, bos, eos, think=None):
    out = []
    if default_system is not None and (not messages or messages[0]["role"] != "system"):
        out.append(f"<|im_start|>system\n{default_system}<|im_end|>\n")
    out += [f"<|im_start|>{m['role']}\n{m['content']}<|im_end|>\n" for m in messages]
    return "".join(out) + "<|im_start|>assistant\n"


def _ref_llama3(messages, default_system, bos, eos, think=None):
    msgs = list(messages)
    if default_system is not None and (not msgs or msgs[0]["role"] != "system"):
        msgs.insert(0, {"role": "system", "content": default_system})
    return "".join(f"<|start_header_id|>{m['role']}<|end_header_id|>\n\n{m['content']}<|eot_id|>"
                   for m in msgs) + "<|start_header_id|>assistant<|end_header_id|>\n\n"


def _ref_llama2(messages, default_system, bos, eos, think=None):
    system, rest = _sys_and_rest(messages)
    if system is None:
        system = default_system
    out, first = [], True
    for m in rest:
        if m["role"] == "user":
            sys_block = f"<<SYS>>\n{system}\n<</SYS>>\n\n" if first and system else ""
            out.append(("" if first else bos) + f"[INST] {sys_block}{m['content']} [/INST]")
            first = False
        elif m["role"] == "assistant":
            out.append(f" {m['content']} {eos}")
    return "".join(out)


def _ref_mistral(messages, default_system, bos, eos, lead="", apre="", post="", think=None):
    system, rest = _sys_and_rest(messages)
    if system is None:
        system = default_system
    out, first = [], True
    for m in rest:
        if m["role"] == "user":
            sys_part = f"{system}\n\n" if first and system else ""
            out.append(f"{lead}[INST] {sys_part}{m['content']} [/INST]")
            first = False
        elif m["role"] == "assistant":
            out.append(f"{apre}{m['content']}{eos}{post}")
    return "".join(out)


def _with_default_system(messages, default_system):
    if default_system is not None and (not messages or messages[0]["role"] != "system"):
        return [{"role": "system", "content": default_system}] + list(messages)
    return list(messages)


def _ref_gemma(messages, default_system, bos, eos, think=None):
    system, rest = _sys_and_rest(messages)
    if system is None:
        system = default_system
    out = []
    for i, m in enumerate(rest):
        role = "model" if m["role"] == "assistant" else m["role"]
        prefix = f"{system}\n\n" if i == 0 and system else ""
        out.append(f"<start_of_turn>{role}\n{prefix}{m['content']}<end_of_turn>\n")
    return "".join(out) + "<start_of_turn>model\n"


def _ref_phi3(messages, default_system, bos, eos, nl="\n", think=None):
    out = [f"<|{m['role']}|>{nl}{m['content']}<|end|>{nl}" for m in _with_default_system(messages, default_system)
           if m["role"] in ("user", "assistant") or (m["role"] == "system" and m["content"])]
    return "".join(out) + f"<|assistant|>{nl}"


def split_thinking(content: str) -> tuple[str, str]:
    """(reasoning, answer) of an assistant text holding ``<think>...</think>``, as Qwen3's Jinja
    splits it; ("", content) without one."""
    if "</think>" not in content:
        return "", content
    head, _, tail = content.rpartition("</think>")
    return head.rstrip("\n").split("<think>")[-1].lstrip("\n"), tail.lstrip("\n")


def _ref_qwen3(messages, default_system, bos, eos, think=None):
    msgs = _with_default_system(messages, default_system)
    last_user = max((i for i, m in enumerate(msgs) if m["role"] == "user"), default=-1)
    out = []
    for i, m in enumerate(msgs):
        if m["role"] == "assistant":
            reasoning, content = split_thinking(m["content"])
            if i > last_user and (i == len(msgs) - 1 or reasoning):
                content = f"<think>\n{reasoning}\n</think>\n\n{content}"
            out.append(f"<|im_start|>assistant\n{content}<|im_end|>\n")
        else:
            out.append(f"<|im_start|>{m['role']}\n{m['content']}<|im_end|>\n")
    out.append("<|im_start|>assistant\n")
    if think is False:
        out.append("<think>\n\n</think>\n\n")
    return "".join(out)


_CHATML_SYSTEM = r"^<\|im_start\|>system\n(.*?)<\|im_end\|>\n"

FAMILIES = (
    # before chatml: Qwen3's template renders as ChatML unless reasoning is involved
    Family("qwen3", _QWEN3_GO, ("<|im_start|>", "<|im_end|>"), _ref_qwen3, _CHATML_SYSTEM, thinking=True),
    Family("gemma", _GEMMA_GO, ("<start_of_turn>", "<end_of_turn>"), _ref_gemma),
    Family("phi3", _PHI3_GO, ("<|end|>", "<|user|>", "<|assistant|>"), _ref_phi3,
           r"^<\|system\|>\n?(.*?)<\|end\|>", ({"nl": "\n"}, {"nl": ""})),
    Family("chatml", _CHATML_GO, ("<|im_start|>", "<|im_end|>"), _ref_chatml, _CHATML_SYSTEM),
    Family("llama3", _LLAMA3_GO, ("<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"), _ref_llama3,
           r"^<\|start_header_id\|>system<\|end_header_id\|>\n\n(.*?)<\|eot_id\|>"),
    Family("llama2", _LLAMA2_GO, ("[INST]", "[/INST]", "<<SYS>>", "<</SYS>>"), _ref_llama2,
           r"^\[INST\] <<SYS>>\n(.*?)\n<</SYS>>\n\n"),
    Family("mistral", _MISTRAL_GO, ("[INST]", "[/INST]"), _ref_mistral, None,
           tuple({"lead": a, "apre": b, "post": c} for a in ("", " ") for b in ("", " ") for c in ("", " "))),
)

# probe conversations; the contents are words no template contains
_S, _U1, _A1, _U2 = "Zq system words.", "Zq first question?", "Zq first answer.", "Zq second question?"
PROBES = (
    [{"role": "user", "content": _U1}],
    [{"role": "user", "content": _U1}, {"role": "assistant", "content": _A1}, {"role": "user", "content": _U2}],
    [{"role": "system", "content": _S}, {"role": "user", "content": _U1}],
    [{"role": "system", "content": _S}, {"role": "user", "content": _U1},
     {"role": "assistant", "content": _A1}, {"role": "user", "content": _U2}],
)
# reasoning probes: (messages, enable_thinking); a family without ``thinking`` renders them as any
# conversation (the <think> text is content), a thinking one drops earlier reasoning and answers
# enable_thinking=false with an empty <think> block
_R1 = "<think>\nZq some reasoning.\n</think>\n\n" + _A1
THINK_PROBES = (
    ([{"role": "user", "content": _U1}, {"role": "assistant", "content": _R1}, {"role": "user", "content": _U2}], None),
    ([{"role": "user", "content": _U1}], False),
    ([{"role": "user", "content": _U1}], True),
)


@dataclass
class Match:
    family: Family
    params: dict
    default_system: Optional[str]
    system_supported: bool        # False: the Jinja template refuses system messages
    bos: str
    eos: str
    trims_content: bool = False   # the Jinja template strips message contents; Go templates can't

    @property
    def go_template(self) -> str:
        p = {"BOS": self.bos, "EOS": self.eos, "LEAD": "", "APRE": "", "POST": "", "NL": ""}
        p.update({k.upper(): v for k, v in self.params.items()})
        return re.sub(r"\{(BOS|EOS|LEAD|APRE|POST|NL)\}", lambda m: p[m.group(1)], self.family.go)

    def reference(self, messages, think: Optional[bool] = None) -> str:
        return self.family.reference(messages, self.default_system, self.bos, self.eos, think=think, **self.params)


def _strip_bos(text: str, bos: str) -> str:
    return text[len(bos):] if bos and text.startswith(bos) else text


def prompt_after_bos(chat_template: str, messages, bos: str, eos: str, add_bos: bool = True,
                     think: Optional[bool] = None) -> str:
    """The Jinja prompt with add_generation_prompt=True, less a leading BOS when llama.cpp
    adds that token itself (the GGUF's add_bos_token). ``think``: ``enable_thinking`` (None: unset)."""
    extra = {} if think is None else {"enable_thinking": think}
    text = render_jinja(chat_template, messages, bos=bos, eos=eos, **extra)
    return _strip_bos(text, bos) if add_bos else text


def recognise(chat_template: Optional[str], bos: str = "", eos: str = "", add_bos: bool = True,
              prefer: Optional[str] = None) -> Optional[Match]:
    """The family whose reference rendering equals the template's on every probe, or None.
    ``prefer``: a family tried first (the architecture's ``template_family``)."""
    from jinja2.exceptions import TemplateError

    if not chat_template:
        return None
    probes = [(p, None) for p in PROBES] + list(THINK_PROBES)
    rendered = []
    for probe, think in probes:
        try:
            rendered.append(prompt_after_bos(chat_template, probe, bos, eos, add_bos, think))
        except TemplateError:
            rendered.append(None)                  # e.g. "Only user and assistant roles are supported!"
        except TemplateLimitError:
            raise
        except Exception:
            return None                            # a template jinja2 cannot render at all
    if rendered[0] is None or rendered[1] is None:
        return None
    system_supported = rendered[2] is not None and rendered[3] is not None
    for fam in sorted(FAMILIES, key=lambda f: f.name != prefer):
        systems = [None]
        if fam.system_pattern:
            m = re.match(fam.system_pattern, rendered[0], re.S)
            if m:
                systems.insert(0, m.group(1))
        for params in fam.variants:
            for default_system in systems:
                ok = all(r is None or r == fam.reference(p, default_system, bos, eos, think=think, **params)
                         for (p, think), r in zip(probes, rendered))
                if ok:
                    padded = [{"role": "user", "content": f"  {_U1}  "}]
                    try:
                        trims = f"  {_U1}  " not in prompt_after_bos(chat_template, padded, bos, eos, add_bos)
                    except Exception:
                        trims = False
                    return Match(fam, params, default_system, system_supported, bos, eos, trims)
    return None


# --------------------------------------------------------------------------- the Modelfile

def _quote_block(text: str) -> Optional[str]:
    """Ollama's triple-quoted value; None if the text cannot be written as one."""
    if '"""' in text or text.endswith('"'):
        return None
    return f'"""{text}"""'


def _quote_param(text: str) -> Optional[str]:
    if '"' not in text and "\n" not in text:
        return f'"{text}"'
    return _quote_block(text)


def modelfile(gguf_name, chat_template: Optional[str], *, bos: str = "", eos: str = "",
              add_bos: bool = True, eos_texts: Sequence[str] = (), license_text: Optional[str] = None,
              header: Optional[str] = None, family_hint: Optional[str] = None) -> tuple[str, list[str]]:
    """(Modelfile text, notes). ``gguf_name``: the file name relative to the Modelfile, or the
    list of a split's shards (one FROM line each: ``ollama create`` sends every FROM file and
    joins llama.cpp split shards itself, server/create.go). ``eos_texts``: texts of every
    end-of-generation token (``eos`` and the generation_config's eos ids). ``family_hint``: the
    architecture's template family, tried first.

    Long because it is a table: one Modelfile line per template/stop/parameter rule, in ollama's order."""
    notes: list[str] = []
    lines = []
    if header:
        lines += [f"# {h}" if h else "#" for h in header.splitlines()]
    names = [gguf_name] if isinstance(gguf_name, (str, Path)) else list(gguf_name)
    for n in names:
        n = str(n)
        lines.append(f"FROM {n if Path(n).is_absolute() else './' + n}")
    try:
        match, limited = recognise(chat_template, bos, eos, add_bos, prefer=family_hint), None
    except TemplateLimitError as e:
        match, limited = None, str(e)
    stops = []
    if match is None:
        if limited:
            notes.append(f"{limited} (limits: {RENDER_SECONDS:g} s, {RENDER_OUTPUT >> 20} MiB of text): "
                         "no TEMPLATE written")
        elif chat_template:
            notes.append("chat template not recognised as ChatML, Qwen3, Gemma, Phi-3, Llama 3, Llama 2 or Mistral "
                         "[INST]: no TEMPLATE "
                         "written; Ollama autodetects one from the GGUF's tokenizer.chat_template or renders "
                         "that Jinja template itself")
        else:
            notes.append("the model has no chat template: no TEMPLATE written (Ollama falls back to the bare prompt)")
    else:
        q = _quote_block(match.go_template)
        if q is None:
            notes.append("the Go template cannot be quoted in a Modelfile: no TEMPLATE written")
        else:
            lines.append(f"TEMPLATE {q}")
            notes.append(f"chat template: {match.family.name}" +
                         (" with a default system prompt" if match.default_system else ""))
        if match.default_system:
            q = _quote_block(match.default_system)
            if q is None:
                notes.append("the default system prompt cannot be quoted in a Modelfile: no SYSTEM written")
            else:
                lines.append(f"SYSTEM {q}")
        if match.family.thinking:
            notes.append("reasoning: the TEMPLATE shows .Thinking between <think> and </think> as the Jinja "
                         "template does, and think=false gives the empty <think> block of enable_thinking=false")
        if match.trims_content:
            notes.append("the Jinja chat template strips whitespace around message contents; the Ollama "
                         "TEMPLATE keeps it (as Ollama's own templates do)")
        if not match.system_supported:
            notes.append("the Jinja chat template refuses system messages; the Ollama TEMPLATE puts a "
                         "system prompt in front of the first user message")
        stops += list(match.family.stops)
    stops += [t for t in eos_texts if t]
    seen = set()
    for s in stops:
        if s in seen:
            continue
        seen.add(s)
        q = _quote_param(s)
        if q is None:
            notes.append(f"stop {s!r} cannot be quoted in a Modelfile: left out")
        else:
            lines.append(f"PARAMETER stop {q}")
    if license_text:
        lic = license_text.strip("\n")
        q = _quote_block(lic + "\n" if lic.endswith('"') else lic)   # a closing quote would merge with """
        if q is None:
            notes.append("the licence text cannot be quoted in a Modelfile: no LICENSE written")
        else:
            lines.append(f"LICENSE {q}")
    else:
        notes.append("no licence file or README licence found: no LICENSE written")
    return "\n".join(lines) + "\n", notes


LICENSE_FILES = ("LICENSE", "LICENSE.txt", "LICENSE.md", "LICENCE", "LICENCE.txt", "LICENCE.md")


def license_text(model_dir: Path) -> Optional[str]:
    """The model folder's licence: a LICENSE file, else the README front-matter ``license:``."""
    model_dir = Path(model_dir)
    for name in LICENSE_FILES:
        p = model_dir / name
        if p.is_file():
            return p.read_text(encoding="utf-8", errors="replace")
    readme = model_dir / "README.md"
    if readme.is_file():
        text = readme.read_text(encoding="utf-8", errors="replace")
        m = re.match(r"---\s*\n(.*?)\n---\s*(\n|$)", text, re.S)
        if m:
            front = m.group(1)
            lic = re.search(r"^license:\s*[\"']?([^\"'\n#]+?)[\"']?\s*$", front, re.M)
            if lic:
                value = lic.group(1).strip()
                if value == "other":
                    name = re.search(r"^license_name:\s*[\"']?([^\"'\n]+?)[\"']?\s*$", front, re.M)
                    link = re.search(r"^license_link:\s*[\"']?([^\"'\n]+?)[\"']?\s*$", front, re.M)
                    value = " ".join(x.group(1) for x in (name, link) if x) or value
                return value
    return None


# --------------------------------------------------------------------------- integration

@dataclass
class GgufInfo:
    arch: str
    tensor_types: set = field(default_factory=set)
    chat_template: Optional[str] = None
    bos: str = ""
    eos: str = ""
    add_bos: bool = False
    eos_ids: list = field(default_factory=list)
    tokens: list = field(default_factory=list)


_ADD_BOS_PRE = ("llama3", "llama-v3", "llama-bpe", "falcon3", "falcon-h1", "pixtral", "midm-2.0", "lfm2")


def _read_header(path: Path, keep: Iterable[str]) -> tuple[dict, list[int]]:
    """The GGUF key/values named in ``keep`` and the tensor type ids, reading only the header
    (gguf.GGUFReader builds Python objects for every array element: seconds for a 50k vocabulary)."""
    from .plan.gguf_header import read_header

    keep = set(keep)
    kv, tensors = read_header(path, arrays=keep)
    return {k: v for k, v in kv.items() if k in keep}, [int(t[2]) for t in tensors]


_KEYS = ("general.architecture", "tokenizer.chat_template", "tokenizer.ggml.tokens", "tokenizer.ggml.model",
         "tokenizer.ggml.pre", "tokenizer.ggml.add_bos_token", "tokenizer.ggml.bos_token_id",
         "tokenizer.ggml.eos_token_id", "tokenizer.ggml.eot_token_id", "tokenizer.ggml.eom_token_id")


def read_gguf(paths: Sequence[Path]) -> GgufInfo:
    """Architecture, tensor types and chat metadata from a GGUF (all shards of a split)."""
    kv, types = _read_header(paths[0], _KEYS)
    for p in paths[1:]:
        types += _read_header(p, ())[1]
    tokens = kv.get("tokenizer.ggml.tokens") or []
    info = GgufInfo(arch=kv.get("general.architecture", ""), chat_template=kv.get("tokenizer.chat_template"),
                    tokens=tokens, tensor_types={_type_name(t) for t in set(types)})
    add_bos = kv.get("tokenizer.ggml.add_bos_token")
    if add_bos is None:      # llama.cpp's default (llama-vocab.cpp): SentencePiece and Llama-3-style BPE add BOS
        add_bos = kv.get("tokenizer.ggml.model") == "llama" or kv.get("tokenizer.ggml.pre") in _ADD_BOS_PRE
    info.add_bos = bool(add_bos)
    text = lambda i: tokens[i] if i is not None and 0 <= i < len(tokens) else ""
    info.bos = text(kv.get("tokenizer.ggml.bos_token_id"))
    info.eos = text(kv.get("tokenizer.ggml.eos_token_id"))
    info.eos_ids = [kv[k] for k in ("tokenizer.ggml.eos_token_id", "tokenizer.ggml.eot_token_id",
                                    "tokenizer.ggml.eom_token_id") if kv.get(k) is not None]
    return info


def _generation_eos_ids(model_dir: Path) -> list[int]:
    p = Path(model_dir) / "generation_config.json"
    try:
        ids = json.loads(p.read_text()).get("eos_token_id")
    except (OSError, ValueError):
        return []
    if ids is None:
        return []
    return [ids] if isinstance(ids, int) else [i for i in ids if isinstance(i, int)]


def _template_family(gguf_arch: str) -> Optional[str]:
    """The ``template_family`` of the ggufq architecture record writing ``gguf_arch``."""
    from . import arch
    arch._load()
    for rec in arch._REGISTRY.values():
        if rec.name == gguf_arch and rec.template_family:
            return rec.template_family
    return None


def modelfile_path_for(gguf_path: Path) -> Path:
    """``<dir>/<stem>.Modelfile`` (a split's first shard name without ``-00001-of-0000N``)."""
    gguf_path = Path(gguf_path)
    stem = re.sub(r"-\d{5}-of-\d{5}$", "", gguf_path.stem)
    return gguf_path.with_name(stem + ".Modelfile")


def write_modelfile(out_gguf_path, model_dir: Path, modelfile_path: Optional[Path] = None) -> list[str]:
    """Write an Ollama Modelfile for a converted GGUF; returns notes and warnings for the user.

    ``out_gguf_path``: the written file, or the list of a split's shards (one FROM line each).
    Chat template, BOS/EOS texts, architecture and tensor types are read back from the GGUF,
    the licence and generation_config.json eos ids from ``model_dir``.
    """
    from . import __version__

    paths = [Path(p) for p in (out_gguf_path if isinstance(out_gguf_path, (list, tuple)) else [out_gguf_path])]
    info = read_gguf(paths)
    eos_ids = info.eos_ids + _generation_eos_ids(model_dir)
    eos_texts = [info.tokens[i] for i in eos_ids if 0 <= i < len(info.tokens)]
    target = Path(modelfile_path) if modelfile_path else modelfile_path_for(paths[0])
    here = target.parent.resolve()
    names = [p.name if p.parent.resolve() == here else str(p.resolve()) for p in paths]
    header = (f"Ollama Modelfile written by ggufq {__version__} for {paths[0].name}\n"
              f"ollama create NAME -f {target.name}")
    text, notes = modelfile(names, info.chat_template, bos=info.bos, eos=info.eos, add_bos=info.add_bos,
                            eos_texts=eos_texts, license_text=license_text(model_dir), header=header,
                            family_hint=_template_family(info.arch))
    tmp = target.with_name(f".{target.name}.{os.getpid()}.tmp")
    try:
        tmp.write_text(text, encoding="utf-8")
        tmp.replace(target)
    finally:
        if tmp.exists():
            tmp.unlink()
    warnings = [f"Ollama: {w}" for w in check(info.arch, info.tensor_types)]
    warnings += [f"Ollama: {n}" for n in older_notes(info.arch, info.tensor_types)]
    return [f"wrote {target}"] + [f"Modelfile: {n}" for n in notes] + warnings
