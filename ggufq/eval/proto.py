"""Frames between the evaluation process and its llama-cpp-python worker.

A frame is an 8-byte little-endian length, a pickled ``(message, array_spec)``
header and, when ``array_spec`` is ``(dtype, shape)``, the array's raw bytes,
read straight into a preallocated array (logits of a chunk are tens of MB, so
no pickling of the payload). Imports NumPy only: the parent never imports
``llama_cpp`` through this module.
"""
from __future__ import annotations

import pickle
import struct
from typing import Any, BinaryIO, Optional

import numpy as np


class ProtocolEOF(EOFError):
    """The other side closed the pipe (the worker died or exited)."""


def send(f: BinaryIO, msg: Any, arr: Optional[np.ndarray] = None) -> None:
    spec = None
    if arr is not None:
        arr = np.ascontiguousarray(arr)
        spec = (arr.dtype.str, arr.shape)
    head = pickle.dumps((msg, spec), protocol=pickle.HIGHEST_PROTOCOL)
    f.write(struct.pack("<Q", len(head)))
    f.write(head)
    if arr is not None and arr.size:
        f.write(memoryview(arr).cast("B"))
    f.flush()


POLL = 0.2    # seconds between returns to the interpreter while waiting for the other side


def _wait_readable(f: BinaryIO) -> None:
    """Block until ``f`` has data, in short slices. A signal sent to the process may be delivered
    to another thread (OpenBLAS's, a progress bar's); a ``read`` blocked in the main thread is then
    not interrupted, and Python runs the handler (which ends the run) only when the main thread
    gets back to the interpreter -- after the worker's next message, which may be minutes away."""
    import io
    import select
    if not isinstance(f, io.RawIOBase):
        # a buffered reader may already hold the bytes asked for: select on its fd would wait for
        # more that never come (the workers read their stdin this way; they ignore signals anyway)
        return
    try:
        fd = f.fileno()
    except (AttributeError, OSError, ValueError):
        return
    while not select.select([fd], [], [], POLL)[0]:
        pass


def _read_into(f: BinaryIO, buf: memoryview) -> None:
    got = 0
    while got < len(buf):
        _wait_readable(f)
        n = f.readinto(buf[got:])
        if not n:
            raise ProtocolEOF("pipe closed")
        got += n


def recv(f: BinaryIO) -> tuple[Any, Optional[np.ndarray]]:
    hdr = bytearray(8)
    _read_into(f, memoryview(hdr))
    (n,) = struct.unpack("<Q", hdr)
    head = bytearray(n)
    _read_into(f, memoryview(head))
    msg, spec = pickle.loads(head)
    arr = None
    if spec is not None:
        dtype, shape = spec
        arr = np.empty(shape, dtype=np.dtype(dtype))
        if arr.size:
            _read_into(f, memoryview(arr).cast("B"))
    return msg, arr
