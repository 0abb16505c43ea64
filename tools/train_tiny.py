"""Train a synthetic checkpoint of tools/synthetic_archs.py for a few hundred steps, in place (torch + transformers,
tool time only): random weights become a small model with real next-token statistics, so that quantization
figures (KL divergence, calibrated against k-quant) mean something for that architecture.

    python -m tools.train_tiny DIR --text FILE --skip-bytes 200000 --steps 300

The text is tokenized with the folder's own tokenizer (``tokenizer.json`` through ``tokenizers``, else
``tokenizer.model`` through sentencepiece); ``--skip-bytes`` leaves the head of the file out of training so
that an evaluation on its first chunks sees unseen text. The model is the folder's ``config.json`` through
``transformers.AutoModelForCausalLM`` (float32 weights, bf16 autocast on a GPU), AdamW with a cosine schedule
on random windows of ``--seq`` tokens. The trained weights are written back as BF16 into the same
safetensors shards under the same names (the index is unchanged), so every other tool reads the folder as
before.
"""
from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path


def tokenize(d: Path, text: str) -> list[int]:
    if (d / "tokenizer.json").is_file():
        from tokenizers import Tokenizer
        return Tokenizer.from_file(str(d / "tokenizer.json")).encode(text, add_special_tokens=False).ids
    import sentencepiece as spm
    return spm.SentencePieceProcessor(model_file=str(d / "tokenizer.model")).encode(text)


def shards(d: Path) -> dict[str, list[str]]:
    """shard file -> HF tensor names, from the index (or the one model.safetensors)."""
    idx = d / "model.safetensors.index.json"
    if idx.is_file():
        out: dict[str, list[str]] = {}
        for name, fn in json.loads(idx.read_text())["weight_map"].items():
            out.setdefault(fn, []).append(name)
        return out
    from safetensors import safe_open
    with safe_open(d / "model.safetensors", "pt") as f:
        return {"model.safetensors": list(f.keys())}


def train(d: Path, text: str, steps: int, seq: int, batch: int, lr: float, seed: int = 0, log=print) -> dict:
    import torch
    from safetensors.torch import save_file
    from transformers import AutoConfig, AutoModelForCausalLM

    torch.manual_seed(seed)
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    ids = torch.tensor(tokenize(d, text), dtype=torch.long)
    if len(ids) < seq + 2:
        raise SystemExit(f"{len(ids)} tokens of text: not enough for --seq {seq}")
    cfg = AutoConfig.from_pretrained(d)
    model = AutoModelForCausalLM.from_pretrained(d, config=cfg, dtype=torch.float32).to(dev)
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.95), weight_decay=0.0)
    warm = max(1, steps // 20)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / warm) * 0.5 * (1 + math.cos(math.pi * min(1.0, s / steps))))
    gen = torch.Generator().manual_seed(seed)
    t0, first, loss_v = time.time(), None, float("nan")
    for step in range(steps):
        starts = torch.randint(0, len(ids) - seq - 1, (batch,), generator=gen)
        x = torch.stack([ids[s:s + seq] for s in starts]).to(dev)
        with torch.autocast(dev, dtype=torch.bfloat16, enabled=dev == "cuda"):
            loss = model(input_ids=x, labels=x).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        loss_v = float(loss)
        first = loss_v if first is None else first
        if step % max(1, steps // 5) == 0 or step == steps - 1:
            log(f"{d.name}: step {step} loss {loss_v:.3f} ({time.time() - t0:.0f} s)")
    sd = {k: v.detach() for k, v in model.state_dict().items()}
    for fn, names in shards(d).items():
        missing = [n for n in names if n not in sd]
        if missing:
            raise SystemExit(f"{d.name}: the trained model has no {missing[0]} (transformers renamed it?)")
        save_file({n: sd[n].to(torch.bfloat16).contiguous().cpu() for n in names}, str(d / fn),
                  metadata={"format": "pt"})
    return {"tokens": len(ids), "loss_first": first, "loss_last": loss_v, "seconds": time.time() - t0, "device": dev}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("model_dir", type=Path)
    ap.add_argument("--text", type=Path, required=True)
    ap.add_argument("--skip-bytes", type=int, default=0, help="leave the first bytes of the text out of training")
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--lr", type=float, default=2e-3)
    a = ap.parse_args(argv)
    text = a.text.read_bytes()[a.skip_bytes:].decode("utf-8", "replace")
    r = train(a.model_dir, text, a.steps, a.seq, a.batch, a.lr, log=lambda m: print(m, file=sys.stderr))
    print(json.dumps(r))
    return 0


if __name__ == "__main__":
    sys.exit(main())
