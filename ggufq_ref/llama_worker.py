"""Run llama-cpp-python in a fresh process (llama_cpp imported before numpy) and bring back results.

    python ggufq_ref/llama_worker.py logits MODEL.gguf IDS.json OUT.npy     # F32 KV cache, all positions
    python ggufq_ref/llama_worker.py tokenize MODEL.gguf TEXTS.json OUT.json
    python ggufq_ref/llama_worker.py generate MODEL.gguf [PROMPT_IDS, N].json OUT.json   # greedy ids

From Python: :func:`llama_logits` and :func:`llama_tokenize` (they raise with the worker's stderr).
"""
from __future__ import annotations

import sys

if __name__ == "__main__":
    import llama_cpp  # noqa: F401  (first, before numpy)


def _main(argv) -> int:
    import json

    import llama_cpp
    import numpy as np

    cmd, path, inp, out = argv
    if cmd == "logits":
        ids = json.load(open(inp))
        llm = llama_cpp.Llama(path, n_ctx=max(512, len(ids)), n_batch=512, logits_all=True, n_threads=2,
                              type_k=0, type_v=0, verbose=False)   # GGML_TYPE_F32 = 0
        llm.eval(ids)
        np.save(out, np.array(llm.scores[: len(ids)], dtype=np.float32))
    elif cmd == "generate":
        prompt, n = json.load(open(inp))
        llm = llama_cpp.Llama(path, n_ctx=256, n_threads=2, verbose=False)
        out_ids = []
        for tok in llm.generate(prompt, temp=0.0, top_k=1):
            out_ids.append(int(tok))
            if len(out_ids) >= n:
                break
        json.dump(out_ids, open(out, "w"))
    elif cmd == "tokenize":
        texts = json.load(open(inp))
        llm = llama_cpp.Llama(path, vocab_only=True, verbose=False)
        res = [llm.tokenize(t.encode("utf-8"), add_bos=False, special=False) for t in texts]
        json.dump(res, open(out, "w"))
    else:
        raise SystemExit(f"unknown command {cmd}")
    return 0


def _run(cmd: str, gguf_path, payload, suffix: str):
    import json
    import os
    import subprocess
    import tempfile
    from pathlib import Path

    with tempfile.TemporaryDirectory() as td:
        inp, out = Path(td) / "in.json", Path(td) / ("out" + suffix)
        inp.write_text(json.dumps(payload))
        r = subprocess.run([sys.executable, __file__, cmd, str(gguf_path), str(inp), str(out)],
                           capture_output=True, text=True, timeout=600, env=dict(os.environ))
        if r.returncode != 0:
            raise RuntimeError(f"llama worker {cmd} failed ({r.returncode}): {r.stderr[-2000:]}")
        if suffix == ".npy":
            import numpy as np
            return np.load(out)
        return json.loads(out.read_text())


def llama_logits(gguf_path, ids) -> "np.ndarray":  # noqa: F821
    """float32 [len(ids), n_vocab]: llama.cpp's logits for every position, F32 KV cache."""
    return _run("logits", gguf_path, [int(i) for i in ids], ".npy")


def llama_generate(gguf_path, prompt: list[int], n: int) -> list[int]:
    """``n`` greedy tokens after ``prompt`` (llama-cpp-python's generate, top-1)."""
    return _run("generate", gguf_path, [[int(i) for i in prompt], int(n)], ".json")


def llama_tokenize(gguf_path, texts: list[str]) -> list[list[int]]:
    """llama.cpp's token ids for each text (no BOS, special tokens not parsed)."""
    return _run("tokenize", gguf_path, list(texts), ".json")


if __name__ == "__main__":
    sys.exit(_main(sys.argv[1:]))
