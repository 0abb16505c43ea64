"""Verification of a rebuilt SmolLM2 folder (``python -m tools.build_smollm2`` runs it before it
places the folder; also a command on its own for a folder built earlier):

* the ``tokenizers`` library on the rebuilt ``tokenizer.json`` gives the same ids as llama.cpp
  (llama-cpp-python) on the original GGUF, and llama.cpp's pre-tokenizer hash names it ``smollm``;
* every written tensor, re-permuted, equals the GGUF's dequantized values (+ the seeded dither),
  exactly in f32, up to bf16 round-to-nearest-even otherwise;
* optionally, transformers on the folder against llama.cpp on the original Q4_1 GGUF (logits).

    python -m tools.smollm2_verify ~/.cache/ggufq/smollm2-135m-dither     # what build_smollm2 wrote
"""
from __future__ import annotations

import argparse
import hashlib
import json
import sys
import time
from pathlib import Path

from tools.build_smollm2 import (DEFAULT_OUT, DEFAULT_WIKITEXT, TensorPlan, block_scales, dither_for, field,
                                 log, original_gguf, permute, plan_tensors)  # first: llama_cpp before numpy

import gguf
import numpy as np

from ggufq.quant.floats import f32_to_bf16_bits
from ggufq_ref.forward import read_safetensors, to_float

CHKTXT = ('\n \n\n \n\n\n \t \t\t \t\n  \n   \n    \n     \n🚀 (normal) 😶\u200d🌫️ (multiple emojis concatenated) ✅ '
          '🦙🦙 3 33 333 3333 33333 333333 3333333 33333333 3.3 3..3 3...3 កាន់តែពិសេសអាច😁 ?我想在apple工作1314151天～ '
          '------======= нещо на Български \'\'\'\'\'\'```````""""......!!!!!!?????? I\'ve been \'told he\'s there, '
          '\'RE you sure? \'M not sure I\'ll make it, \'D you like some tea? We\'Ve a\'lL')
SMOLLM_CHKHSH = "855059429035d75a914d1eda9f10a876752e281a054a7a3d421ef0533e5b6249"

# A mixed sample: unicode, CJK, emoji, digit runs, whitespace runs, tabs/newlines, code, contractions.
SAMPLES = [
    "Hello world", " Hello world", "Hello, y'all! How are you 😁 ?我想在apple工作1314151天～",
    "1234567 and 3.14159, 1,000,000 — 0x7fff 2024-11-27 12:30:45",
    "   leading spaces,   runs   of   spaces    and trailing   ",
    "tabs\tand\t\ttabs\n\nnewlines\r\nCRLF\n\n\n\t \t end",
    "def f(x):\n    return x**2  # square\n\nfor i in range(10):\n\tprint(f(i))\n",
    "I'm sure you'll see they've done it, I'd say it's 'RE' not 'Re'. DON'T WON'T can't",
    "Ünïcödé façade naïve café Straße Ελληνικά русский язык עברית العربية हिन्दी",
    "日本語のテキストと中文文本，还有한국어 텍스트。",
    "emoji 🦙🦙 🚀 😶\u200d🌫️ 👩\u200d👩\u200d👧 ✅ 🇫🇷",
    "<|im_start|>user\nWhat is 2+2?<|im_end|>\n<|im_start|>assistant\n",
    "<|endoftext|><repo_name>x<file_sep>y.py\n<jupyter_code>print(1)<empty_output>",
    "JSON: {\"a\": [1, 2, 3], \"b\": null}  <html><body class=\"x\">&amp;</body></html>",
    "\u00a0non-breaking\u2009thin\u3000ideographic space\u200bzero-width",
    CHKTXT,
]


def verify_tokenizer(folder: Path, gguf_path: Path, wikitext: Path | None, report: list[str]) -> bool:
    from tokenizers import Tokenizer
    try:
        import llama_cpp
    except ImportError:
        sys.exit("error: llama-cpp-python is needed for the tokenizer check (pip install llama-cpp-python)")
    hf = Tokenizer.from_file(str(folder / "tokenizer.json"))
    ll = llama_cpp.Llama(str(gguf_path), vocab_only=True, verbose=False)
    ok = True

    chk = hashlib.sha256(str(hf.encode(CHKTXT).ids).encode()).hexdigest()
    line = f"pre-tokenizer hash (llama.cpp chktxt) {chk[:16]}... -> {'smollm' if chk == SMOLLM_CHKHSH else 'UNKNOWN'}"
    ok &= chk == SMOLLM_CHKHSH
    report.append(line)
    log("  " + line)

    n_match = n_tok = 0
    for text in SAMPLES:
        has_special = any(s in text for s in ("<|", "<repo_name>", "<jupyter", "<empty_output>", "<file_sep>"))
        want = hf.encode(text).ids  # add_special_tokens=True: post-processor adds nothing, like add_bos=False
        got = ll.tokenize(text.encode(), add_bos=True, special=True)
        same = want == got
        if not has_special:  # without special-token parsing too
            same &= hf.encode(text).ids == ll.tokenize(text.encode(), add_bos=False, special=False)
        same &= hf.decode(want, skip_special_tokens=False) == text
        n_match += same
        n_tok += len(want)
        if not same:
            ok = False
            log(f"  MISMATCH on {text[:40]!r}: tokenizers {want[:20]} llama.cpp {got[:20]}")
    line = f"mixed sample: {n_match}/{len(SAMPLES)} texts ({n_tok} tokens) identical ids tokenizers vs llama.cpp"
    report.append(line)
    log("  " + line)

    if wikitext is not None and wikitext.is_file():
        text = wikitext.read_text(encoding="utf-8")[:300_000]
        t0 = time.time()
        want = hf.encode(text).ids
        got = ll.tokenize(text.encode(), add_bos=True, special=True)
        same = want == got
        ok &= same
        line = (f"wikitext-2 test, first {len(text):,} chars: {len(want):,} tokens, "
                f"{'identical' if same else 'DIFFERENT'} ids ({time.time() - t0:.1f} s)")
        report.append(line)
        log("  " + line)
    del ll
    return ok


def verify_weights(folder: Path, plans: list[TensorPlan], dither: float, seed: int, dtype: str,
                   report: list[str]) -> bool:
    index = json.loads((folder / "model.safetensors.index.json").read_text())
    by_name = {p.hf_name: p for p in plans}
    if set(index["weight_map"]) != set(by_name):
        log("  weight_map names differ from the tensors")
        return False
    ok, n, max_dither_rel = True, 0, 0.0
    for shard in sorted(set(index["weight_map"].values())):
        for name, raw in read_safetensors(folder / shard).items():
            got = to_float(raw)
            p = by_name[name]
            base = gguf.quants.dequantize(p.t.data, p.t.tensor_type).astype(np.float32).reshape(p.shape)
            want = base + dither_for(p.t, p.index, seed, dither) if (dither and p.quantized) else base
            back = permute(got, p.n_head_perm) if p.n_head_perm else got   # re-permute to the GGUF layout
            want_stored = _bf16_round(want) if dtype == "bf16" else want
            same = back.shape == want_stored.shape and np.array_equal(back, want_stored)
            if dither and p.quantized:  # the dither stays within half a step of the block's scale
                d = np.repeat(block_scales(p.t), gguf.GGML_QUANT_SIZES[p.t.tensor_type][0], axis=1)
                dev = np.abs(want - base)
                same &= bool(np.all(dev <= 0.5 * dither * d * (1 + 1e-6) + 1e-12))
                max_dither_rel = max(max_dither_rel, float(np.max(dev / np.maximum(d, 1e-30))))
            if not same:
                ok = False
                log(f"  MISMATCH {name}")
            n += 1
    cmp = "exactly" if dtype == "f32" else "exactly after bf16 round-to-nearest-even"
    what = "dequantized GGUF + dither" if dither else "dequantized GGUF"
    line = f"weights: {n}/{len(plans)} tensors, re-permuted, equal {what} {cmp}: {'yes' if ok else 'NO'}"
    if dither:
        line += f" (max |dither|/d = {max_dither_rel:.4f} <= {0.5 * dither:g})"
    report.append(line)
    log("  " + line)
    return ok


def verify_transformers(folder: Path, gguf_path: Path, wikitext: Path | None, report: list[str]) -> None:
    """Optional end-to-end check: transformers on the folder vs llama.cpp on the original Q4_1 GGUF."""
    try:
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer
    except Exception as e:  # optional
        log(f"  (transformers check skipped: {type(e).__name__}: {e})")
        return
    text = (wikitext.read_text(encoding="utf-8")[:4000] if wikitext is not None and wikitext.is_file()
            else " ".join(SAMPLES))
    tok = AutoTokenizer.from_pretrained(folder)
    ids = tok(text)["input_ids"][:256]
    try:  # transformers >= 4.56 calls it dtype, older ones torch_dtype
        model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    except TypeError:
        model = AutoModelForCausalLM.from_pretrained(folder, torch_dtype=torch.float32)
    model.eval()
    with torch.no_grad():
        logits_hf = model(torch.tensor([ids])).logits[0].float().numpy()
    del model
    import llama_cpp
    ll = llama_cpp.Llama(str(gguf_path), n_ctx=512, logits_all=True, verbose=False, n_threads=2)
    ll.eval(ids)
    logits_ll = np.array(ll.scores[:len(ids)], dtype=np.float32)
    del ll

    def logsoftmax(x):
        x = x - x.max(axis=-1, keepdims=True)
        return x - np.log(np.exp(x).sum(axis=-1, keepdims=True))
    lp_hf, lp_ll = logsoftmax(logits_hf), logsoftmax(logits_ll)
    top1 = float(np.mean(lp_hf.argmax(-1) == lp_ll.argmax(-1)))
    kld = float(np.mean(np.sum(np.exp(lp_ll) * (lp_ll - lp_hf), axis=-1)))
    nxt = np.array(ids[1:])
    ppl_hf = float(np.exp(-lp_hf[np.arange(len(nxt)), nxt].mean()))
    ppl_ll = float(np.exp(-lp_ll[np.arange(len(nxt)), nxt].mean()))
    line = (f"transformers (folder, f32) vs llama.cpp (original Q4_1 GGUF), {len(ids)} tokens: "
            f"top-1 agreement {top1:.1%}, KL(llama.cpp||hf) {kld:.4f}, PPL {ppl_hf:.2f} vs {ppl_ll:.2f}")
    report.append(line)
    log("  " + line)

def _bf16_round(x: np.ndarray) -> np.ndarray:
    """float32 rounded to bf16 (nearest even) and back."""
    return (f32_to_bf16_bits(x).astype(np.uint32) << 16).view(np.float32).reshape(x.shape)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("folder", type=Path, nargs="?", default=DEFAULT_OUT, help=f"rebuilt folder (default {DEFAULT_OUT})")
    ap.add_argument("--gguf", type=Path, help="the Q4_1 GGUF it was rebuilt from (default: the cached wheel member)")
    ap.add_argument("--seed", type=int, default=0, help="the dither seed it was built with (default 0)")
    ap.add_argument("--dither-scale", type=float, default=1.0, help="its dither scale; 0 for --no-dither (default 1)")
    ap.add_argument("--wikitext", type=Path, default=DEFAULT_WIKITEXT, help="text for the long tokenizer check")
    ap.add_argument("--transformers", action="store_true", help="also the transformers-vs-llama.cpp logits check")
    a = ap.parse_args(argv)
    gguf_path = a.gguf or original_gguf()
    reader = gguf.GGUFReader(gguf_path)
    plans = plan_tensors(reader, int(field(reader, "llama.attention.head_count")),
                         int(field(reader, "llama.attention.head_count_kv")))
    dtype = "f32" if json.loads((a.folder / "config.json").read_text()).get("torch_dtype") == "float32" else "bf16"
    report: list[str] = []
    ok = verify_tokenizer(a.folder, gguf_path, a.wikitext, report)
    ok &= verify_weights(a.folder, plans, a.dither_scale, a.seed, dtype, report)
    if a.transformers:
        verify_transformers(a.folder, gguf_path, a.wikitext, report)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
