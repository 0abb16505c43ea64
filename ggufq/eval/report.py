"""Text report of an :class:`~ggufq.eval.EvalResult`, in llama-perplexity's terms."""
from __future__ import annotations

import os

from ..progress import fmt_bytes, fmt_secs


def format_result(r) -> str:
    lines = []

    def row(key: str, val: str) -> None:
        lines.append(f"{key:<16}{val}")

    row("model", f"{os.path.basename(r.model)}  ({r.model_desc}, {fmt_bytes(r.model_size)}, "
                 f"{r.bits_per_weight:.2f} bits/weight)")
    if r.ref:
        row("reference", os.path.basename(r.ref))
    src = os.path.basename(r.text) if r.text else "text"
    row("text", f"{src}: {r.n_text_tokens} tokens, {r.n_chunks}/{r.n_chunks_max} chunks of {r.n_ctx}, "
                f"{r.n_scored} scored tokens")
    dev = r.device if r.gpu_layers else f"CPU, {r.threads} threads"
    row("device", f"{dev}; {r.tokens_per_s:.0f} tokens/s, {fmt_secs(r.seconds)} in all")
    row("PPL", f"{r.ppl:.4f} ± {r.ppl_err:.5f}")
    k = r.kld
    if k:
        row("PPL(ref)", f"{k['ppl_base']:.4f} ± {k['ppl_base_err']:.5f}")
        row("ΔPPL", f"{k['ppl_diff']:+.4f} ± {k['ppl_diff_err']:.4f}  ({k['ppl_diff_pct']:+.3f} %)")
        row("PPL(Q)/PPL(ref)", f"{k['ppl_ratio']:.6f} ± {k['ppl_ratio_err']:.6f}")
        row("Cor(ln PPL)", f"{100 * k['cor_ln_ppl']:.2f} %")
        row("KLD mean", f"{k['kld_mean']:.6f} ± {k['kld_err']:.6f}")
        row("KLD median", f"{k['kld_median']:.6f}")
        row("KLD p90/99/99.9", f"{k['kld_p90']:.6f} / {k['kld_p99']:.6f} / {k['kld_p99.9']:.6f}")
        row("KLD max", f"{k['kld_max']:.6f}")
        row("same top", f"{100 * k['same_top']:.3f} ± {100 * k['same_top_err']:.3f} %")
        row("RMS Δp", f"{100 * k['rms_dp']:.3f} ± {100 * k['rms_dp_err']:.3f} %")
        row("mean Δp", f"{100 * k['dp_mean']:.3f} ± {100 * k['dp_err']:.3f} %")
    return "\n".join(lines)
