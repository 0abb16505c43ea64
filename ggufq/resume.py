"""A conversion that can be interrupted and continued: ``ggufq convert --resume``.

With ``resume`` the writer's temporary folder is not a random one removed on failure but
``.NAME.partial`` beside the output, kept when the run stops (Ctrl-C, an error, a lost cluster) and
removed once the output is in place. It holds the partial GGUF (header, then whole tensors in file
order) and ``journal.jsonl``: a first line with the sha256 of the header (metadata, vocabulary and
every tensor's name, shape, type and offset: the plan) and the tensor count, then one line per tensor
completed: index, name, offset, byte count and the sha256 of its bytes, appended after the tensor's
last byte was written.

A later run with ``--resume`` writes its own header and trusts nothing of the old file: it is used
only if its header bytes equal the new header, the journal's header digest matches them, and then
for each journal line in order the tensor (index, name, offset, size as this plan places it) is read
back from the file and hashed; the first tensor that does not verify and everything after it are cut
off (the file is truncated there) and encoded again. The result is byte-identical to an
uninterrupted run: same header, same tensor bytes, same zero padding.
"""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import IO, Optional, Sequence

JOURNAL = "journal.jsonl"
VERSION = 1
READ = 1 << 24


def partial_dir(path: Path) -> Path:
    """Where a resumable run of ``path`` keeps its partial file."""
    return path.parent / f".{path.name}.partial"


def _sha_file(f: IO[bytes], offset: int, n: int) -> Optional[str]:
    h = hashlib.sha256()
    f.seek(offset)
    left = n
    while left:
        b = f.read(min(READ, left))
        if not b:
            return None
        h.update(b)
        left -= len(b)
    return h.hexdigest()


class Journal:
    """The partial file's journal (see the module docstring): written as tensors complete."""

    def __init__(self, folder: Path):
        self.path = folder / JOURNAL
        self.f: Optional[IO[str]] = None

    def begin(self, header_sha: str, n_tensors: int, kept: Sequence[dict] = ()) -> None:
        """Start the journal afresh (atomically) with the header line and the ``kept`` tensor lines."""
        tmp = self.path.with_suffix(".tmp")
        with open(tmp, "w") as f:
            f.write(json.dumps({"version": VERSION, "header": header_sha, "tensors": n_tensors}) + "\n")
            for e in kept:
                f.write(json.dumps(e) + "\n")
        os.replace(tmp, self.path)
        self.f = open(self.path, "a")

    def done(self, i: int, name: str, offset: int, nbytes: int, sha: str) -> None:
        assert self.f is not None
        self.f.write(json.dumps({"i": i, "name": name, "offset": offset, "nbytes": nbytes, "sha256": sha}) + "\n")
        self.f.flush()

    def close(self) -> None:
        if self.f is not None:
            self.f.close()
            self.f = None

    def read(self) -> tuple[Optional[dict], list[dict]]:
        """(header line, tensor lines) as far as they parse; a torn last line is dropped."""
        try:
            lines = self.path.read_text().splitlines()
        except (OSError, UnicodeDecodeError):
            return None, []
        out = []
        for line in lines:
            try:
                out.append(json.loads(line))
            except ValueError:
                break
        if not out or not isinstance(out[0], dict) or out[0].get("version") != VERSION:
            return None, []
        return out[0], [e for e in out[1:] if isinstance(e, dict)]


def verified(old: Path, journal: Journal, header: bytes, names: Sequence[str], offsets: Sequence[int],
             sizes: Sequence[int]) -> list[dict]:
    """The journal lines of ``old`` that hold: the same header bytes, then each tensor in order at
    this plan's offset with its recorded sha256; stops at the first that does not."""
    head, lines = journal.read()
    if head is None or head.get("header") != hashlib.sha256(header).hexdigest() or head.get("tensors") != len(names):
        return []
    keep: list[dict] = []
    try:
        with open(old, "rb") as f:
            if f.read(len(header)) != header:
                return []
            for k, e in enumerate(lines):
                if k >= len(names) or e.get("i") != k or e.get("name") != names[k] or e.get("offset") != offsets[k] \
                        or e.get("nbytes") != sizes[k] or _sha_file(f, offsets[k], sizes[k]) != e.get("sha256"):
                    break
                keep.append(e)
    except OSError:
        return []
    return keep
