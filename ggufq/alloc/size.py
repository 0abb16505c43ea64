"""Size budgets: ``4.2G``, ``4200M``, ``3.9GiB``, ``123456`` (bytes) or bits per weight, checked
against the feasible range of a model (smallest possible file .. its F32 file)."""
from __future__ import annotations

import math
import re
from typing import Optional

from .. import GgufqError
from ..progress import fmt_bytes

_UNITS = {"": 1, "K": 1000, "M": 1000 ** 2, "G": 1000 ** 3, "T": 1000 ** 4,
          "KI": 1 << 10, "MI": 1 << 20, "GI": 1 << 30, "TI": 1 << 40}
_SIZE = re.compile(r"^\s*([0-9]+(?:\.[0-9]*)?|\.[0-9]+)\s*([KMGT]I?)?B?\s*$", re.IGNORECASE)


def parse(text: str) -> Optional[int]:
    """Bytes of a size string (K/M/G/T: powers of 1000, KiB/MiB/GiB/TiB: of 1024), or None when
    it is not one."""
    m = _SIZE.match(str(text))
    if not m:
        return None
    n = float(m.group(1)) * _UNITS[(m.group(2) or "").upper()]
    if not math.isfinite(n) or n >= 2 ** 63:
        return None
    return int(n)


def budget(size: Optional[object], bpw: Optional[float], lo: int, hi: int, n_elements: int,
           header: int) -> int:
    """The file-size budget in bytes from ``size`` (a string or int) or ``bpw`` (bits per weight of
    the tensor data, as the convert summary counts); GgufqError naming the range ``lo .. hi``."""
    rng = (f"feasible for this model: {fmt_bytes(lo)} ({lo} bytes, {(lo - header) * 8 / n_elements:.2f} bpw) "
           f".. {fmt_bytes(hi)} ({hi} bytes, F32)")
    if (size is None) == (bpw is None):
        raise GgufqError(f"give one of --target-size and --bpw ({rng})")
    if bpw is not None:
        if not (isinstance(bpw, (int, float)) and math.isfinite(bpw) and bpw > 0):
            raise GgufqError(f"--bpw {bpw!r} is not a positive number ({rng})")
        b = int(header + bpw * n_elements / 8)
        what = f"--bpw {bpw}"
    else:
        b = size if isinstance(size, int) else parse(size)
        if b is None:
            raise GgufqError(f"--target-size {size!r} is not a size like 4.2G, 4200M, 3.9GiB or a byte count ({rng})")
        what = f"--target-size {size}"
    if not lo <= b <= hi:
        raise GgufqError(f"{what} = {b} bytes is outside the range {rng}")
    return b
