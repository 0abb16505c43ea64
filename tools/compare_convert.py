"""Convert one HF folder with llama.cpp's convert_hf_to_gguf.py and with ggufq; list every difference.

    python -m tools.compare_convert fixtures/tinyllama-spm-10m            # F16 (default)
    python -m tools.compare_convert MODEL_DIR --type Q8_0 --keep /tmp/cmp

Compares metadata key by key (value and GGUF type), the tensor list (names, order, types,
shapes) and tensor data byte by byte. Prints a markdown table of the differences, each
marked ``allowed`` (with the reason) or ``DIFF``; exit code 0 when every difference is on
the allow-list, 1 otherwise, 2 when a converter fails. llama.cpp's converter needs torch.
"""
from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from tools.common import LLAMA_CONVERT, OUTTYPE, child_env


# differences that are explained, not bugs: key -> reason
ALLOWED_KEYS = {
    "general.name": "wording from the folder name: llama.cpp title-cases and splits on '-', ggufq keeps config/README names",
    "general.basename": "derived from the folder name, wording differs",
    "general.size_label": "llama.cpp derives it from the folder name when that has a size-like suffix, "
                          "ggufq from the parameter count",
    "general.finetune": "derived from the folder name, wording differs",
    "general.version": "derived from the folder name, wording differs",
}
ALLOWED_ABSENT_IN_LLAMA = {}
ALLOWED_ABSENT_IN_GGUFQ = {}
HEADER_KEYS = {"GGUF.kv_count": "follows from the key differences listed"}
ORDER_REASON = ("llama.cpp writes tensors in the shards' order (HF's, alphabetical within a layer), ggufq in "
                "its arch table's order; llama.cpp finds tensors by name, so what it loads is the same")
# tensors whose values may differ by rounding only: name -> (max relative difference, reason)
# (none left: llama3's rope_freqs follows torch's float32 operations and pow, ggufq.arch.torchpow)
ALLOWED_ROUNDING: dict[str, tuple[float, str]] = {}


def run(cmd: list[str], env=None) -> tuple[float, subprocess.CompletedProcess]:
    t0 = time.perf_counter()
    r = subprocess.run(cmd, capture_output=True, text=True, env=env)
    return time.perf_counter() - t0, r


def fields(path: Path) -> dict[str, tuple[str, object]]:
    import gguf
    r = gguf.GGUFReader(path)
    out = {}
    for k, f in r.fields.items():
        t = "/".join(gguf.GGUFValueType(x).name for x in f.types)
        v = f.contents()
        out[k] = (t, v)
    return out


def _short(v) -> str:
    if isinstance(v, list):
        head = ", ".join(repr(x) for x in v[:3])
        return f"[{len(v)}: {head}{', ...' if len(v) > 3 else ''}]"
    s = repr(v)
    return s if len(s) <= 60 else s[:57] + "..."


def _first_list_diff(a: list, b: list) -> str:
    if len(a) != len(b):
        return f"length {len(a)} vs {len(b)}"
    for i, (x, y) in enumerate(zip(a, b)):
        if x != y:
            n = sum(1 for p, q in zip(a, b) if p != q)
            return f"{n} entries differ, first at {i}: {x!r} vs {y!r}"
    return ""


def compare(llama_path: Path, ggufq_path: Path):
    """Rows (kind, name, llama.cpp, ggufq, verdict) and counts of what is equal."""
    import gguf
    rows, equal = [], {"keys": 0, "tensors": 0}
    fa, fb = fields(llama_path), fields(ggufq_path)
    for k in list(fa) + [k for k in fb if k not in fa]:
        if k not in fb:
            rows.append(("key", k, _short(fa[k][1]), "(absent)",
                         f"allowed: {ALLOWED_ABSENT_IN_GGUFQ[k]}" if k in ALLOWED_ABSENT_IN_GGUFQ else "DIFF"))
            continue
        if k not in fa:
            rows.append(("key", k, "(absent)", _short(fb[k][1]),
                         f"allowed: {ALLOWED_ABSENT_IN_LLAMA[k]}" if k in ALLOWED_ABSENT_IN_LLAMA else "DIFF"))
            continue
        (ta, va), (tb, vb) = fa[k], fb[k]
        if ta == tb and va == vb:
            equal["keys"] += 1
            continue
        if ta != tb:
            a, b = f"{ta} {_short(va)}", f"{tb} {_short(vb)}"
        elif isinstance(va, list):
            a, b = _short(va), _first_list_diff(va, vb)
        else:
            a, b = _short(va), _short(vb)
        why = ALLOWED_KEYS.get(k) or HEADER_KEYS.get(k)
        rows.append(("key", k, a, b, f"allowed: {why}" if why else "DIFF"))

    ra, rb = gguf.GGUFReader(llama_path), gguf.GGUFReader(ggufq_path)
    ta = {t.name: t for t in ra.tensors}
    tb = {t.name: t for t in rb.tensors}
    order_a = [t.name for t in ra.tensors]
    order_b = [t.name for t in rb.tensors]
    if set(order_a) == set(order_b) and order_a != order_b:
        i = next(i for i, (x, y) in enumerate(zip(order_a, order_b)) if x != y)
        rows.append(("order", f"tensor #{i}", order_a[i], order_b[i], f"allowed: {ORDER_REASON}"))
    for name in order_a + [n for n in order_b if n not in ta]:
        if name not in tb:
            rows.append(("tensor", name, "present", "(absent)", "DIFF"))
            continue
        if name not in ta:
            rows.append(("tensor", name, "(absent)", "present", "DIFF"))
            continue
        a, b = ta[name], tb[name]
        sa = f"{a.tensor_type.name} {[int(x) for x in a.shape]}"
        sb = f"{b.tensor_type.name} {[int(x) for x in b.shape]}"
        if sa != sb:
            rows.append(("tensor", name, sa, sb, "DIFF"))
            continue
        da = np.asarray(a.data).reshape(-1).view(np.uint8)
        db = np.asarray(b.data).reshape(-1).view(np.uint8)
        n_diff, step = 0, 1 << 24
        for lo in range(0, len(da), step):
            n_diff += int(np.count_nonzero(da[lo:lo + step] != db[lo:lo + step]))
        if n_diff:
            extra, verdict = "", "DIFF"
            if a.tensor_type.name in ("F32", "F16"):
                x, y = np.asarray(a.data, dtype=np.float64), np.asarray(b.data, dtype=np.float64)
                rel = float(np.max(np.abs(x - y) / np.maximum(np.abs(x), 1e-30)))
                extra = f", max |diff| {np.max(np.abs(x - y)):.3g}, max rel {rel:.2g}"
                if name in ALLOWED_ROUNDING and rel <= ALLOWED_ROUNDING[name][0]:
                    verdict = f"allowed: {ALLOWED_ROUNDING[name][1]}"
            rows.append(("tensor", name, sa, f"{n_diff} of {len(da)} bytes differ{extra}", verdict))
        else:
            equal["tensors"] += 1
    return rows, equal, (len(fa), len(fb), len(order_a), len(order_b))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    ap.add_argument("model_dir", type=Path)
    ap.add_argument("--type", default="F16", choices=sorted(OUTTYPE), help="output type (default F16)")
    ap.add_argument("--llama-convert", type=Path, default=LLAMA_CONVERT,
                    help="llama.cpp's convert_hf_to_gguf.py (env GGUFQ_LLAMA_CONVERT)")
    ap.add_argument("--keep", type=Path, default=None, help="write both GGUFs here and keep them")
    ap.add_argument("--jobs", type=int, default=2)
    a = ap.parse_args(argv)
    if not a.llama_convert.is_file():
        print(f"compare_convert: llama.cpp's converter not found at {a.llama_convert}", file=sys.stderr)
        return 2
    with tempfile.TemporaryDirectory(prefix="ggufq-cmp-") as td:
        work = a.keep or Path(td)
        work.mkdir(parents=True, exist_ok=True)
        pa, pb = work / f"llama-cpp-{a.type}.gguf", work / f"ggufq-{a.type}.gguf"
        ta, r = run([sys.executable, str(a.llama_convert), str(a.model_dir), "--outtype", OUTTYPE[a.type],
                     "--outfile", str(pa)])
        if r.returncode != 0:
            print(f"llama.cpp convert failed:\n{r.stderr[-3000:]}", file=sys.stderr)
            return 2
        env = child_env()
        tb, r = run([sys.executable, "-m", "ggufq", "convert", str(a.model_dir), "-o", str(pb), "--type", a.type,
                     "-j", str(a.jobs), "-q", "-f"], env=env)
        if r.returncode != 0:
            print(f"ggufq convert failed:\n{r.stderr[-3000:]}", file=sys.stderr)
            return 2
        rows, equal, (ka, kb, na, nb) = compare(pa, pb)
    print(f"## {a.model_dir.name}, {a.type}: llama.cpp convert_hf_to_gguf.py ({ta:.1f} s) vs ggufq ({tb:.1f} s)\n")
    print(f"- metadata: {ka} keys (llama.cpp) / {kb} (ggufq), {equal['keys']} identical in type and value")
    print(f"- tensors: {na} (llama.cpp) / {nb} (ggufq), {equal['tensors']} identical byte for byte\n")
    bad = [x for x in rows if x[4] == "DIFF"]
    if rows:
        print("| what | name | llama.cpp | ggufq | verdict |\n|---|---|---|---|---|")
        for kind, name, x, y, v in rows:
            cell = lambda s: str(s).replace("|", "\\|").replace("\n", "\\n")  # noqa: E731
            print(f"| {kind} | {cell(name)} | {cell(x)} | {cell(y)} | {cell(v)} |")
        print()
    print(f"{len(bad)} unexplained difference(s), {len(rows) - len(bad)} allowed")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
