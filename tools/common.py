"""What the tools share: where llama.cpp's tools, sources and the test material are, running a
command, an F16 GGUF of a folder, bf16 bits, Markdown table rows.

Every location has an environment variable and a default under ``~/.cache/ggufq`` (what
``tools/build_llama_tools.sh`` and ``python -m tools.build_smollm2`` fill) or next to the checkout.
"""
from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Optional, Sequence

from ggufq.quant.floats import f32_to_bf16_bits  # noqa: F401  -- re-exported: round to nearest even

ROOT = Path(__file__).resolve().parent.parent
CACHE = Path(os.environ.get("GGUFQ_CACHE", Path.home() / ".cache" / "ggufq"))
LLAMA_BIN = Path(os.environ.get("GGUFQ_LLAMA_BIN", CACHE / "llama-bin"))
LLAMA_RPC = Path(os.environ.get("GGUFQ_LLAMA_RPC", CACHE / "llama-rpc"))     # tools/build_rpc.sh
LLAMA_CPP = Path(os.environ.get("GGUFQ_LLAMA_CPP", CACHE / "llama-src" / "llama_cpp_python-0.3.36" / "vendor" / "llama.cpp"))
LLAMA_CONVERT = Path(os.environ.get("GGUFQ_LLAMA_CONVERT", LLAMA_CPP / "convert_hf_to_gguf.py"))
TINY = ROOT / "fixtures" / "tinyllama-spm-10m"
SMOLLM2 = Path(os.environ.get("GGUFQ_SMOLLM2", CACHE / "smollm2-135m-dither"))
# the shared data folder sits next to the checkout, or two up from a git worktree of it
SHARED = Path(os.environ.get("GGUFQ_SHARED") or next(
    (p for p in (ROOT.parent / "shared", ROOT.parent.parent / "shared") if p.is_dir()), ROOT.parent / "shared"))
HELDOUT = SHARED / "data" / "gcide-heldout" / "heldout.txt"
WIKITEXT = SHARED / "data" / "wikitext-2-raw" / "wiki.test.raw"
def scratch(name: str, env_var: str = "GGUFQ_SCRATCH") -> Path:
    """A default work folder: ``$env_var`` when set, else ``name`` in the system's temporary folder."""
    return Path(os.environ.get(env_var) or Path(tempfile.gettempdir()) / name)


# llama.cpp's convert_hf_to_gguf.py --outtype for the types it writes
OUTTYPE = {"F32": "f32", "F16": "f16", "BF16": "bf16", "Q8_0": "q8_0"}


def llama_bin(arg: Optional[os.PathLike | str] = None, need: str = "llama-perplexity") -> Path:
    """The folder of llama.cpp's tools (``--llama-bin`` or ``$GGUFQ_LLAMA_BIN``); exits when ``need`` is not there."""
    d = Path(arg) if arg else LLAMA_BIN
    if not (d / need).exists():
        sys.exit(f"llama.cpp tools not found in {d} (build them with tools/build_llama_tools.sh or pass --llama-bin)")
    return d


def child_env(**extra: str) -> dict:
    """os.environ with the repository first on PYTHONPATH, so ``python -m ggufq`` children run this tree."""
    return dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""), **extra)


def ggufq_cmd(*args) -> list:
    """``python -m ggufq ARGS`` as a command list."""
    return [sys.executable, "-m", "ggufq", *map(str, args)]


def run(cmd: Sequence, env: Optional[dict] = None, log: Optional[Path] = None) -> str:
    """Run a command, return its stdout+stderr (also written to ``log``); exit with its tail when it fails."""
    r = subprocess.run([str(c) for c in cmd], capture_output=True, text=True, env=env)
    text = r.stdout + r.stderr
    if log is not None:
        log.write_text(text)
    if r.returncode != 0:
        sys.exit(f"failed ({r.returncode}): {' '.join(map(str, cmd))}\n{text[-3000:]}")
    return text


def timed(cmd: Sequence, env: Optional[dict] = None) -> float:
    """Wall seconds of a command that must succeed (its output is dropped unless it fails)."""
    t0 = time.perf_counter()
    run(cmd, env=env)
    return time.perf_counter() - t0


def make_f16(model_dir: Path, out: Path) -> str:
    """An F16 GGUF of ``model_dir`` at ``out`` (kept when it exists): ggufq's, else llama.cpp's converter.
    Returns which one wrote it."""
    if out.exists():
        return "existing"
    r = subprocess.run(ggufq_cmd("convert", model_dir, "-o", out, "-t", "F16", "-q"),
                       capture_output=True, text=True, env=child_env())
    if r.returncode == 0:
        return "ggufq convert"
    if not LLAMA_CONVERT.is_file():
        sys.exit(f"ggufq convert failed ({r.stderr.strip()}) and llama.cpp's convert_hf_to_gguf.py was not found")
    print(f"  ggufq convert can't do {model_dir.name} yet ({r.stderr.strip()}); using convert_hf_to_gguf.py",
          file=sys.stderr)
    run([sys.executable, LLAMA_CONVERT, model_dir, "--outtype", "f16", "--outfile", out])
    return "convert_hf_to_gguf.py"


def print_head(headers: Sequence[str]) -> None:
    """The header of a Markdown table whose rows :func:`print_row` prints as they come."""
    print("| " + " | ".join(map(str, headers)) + " |")
    print("|" + "---|" * len(headers), flush=True)


def print_row(cells: Sequence) -> None:
    print("| " + " | ".join(map(str, cells)) + " |", flush=True)
