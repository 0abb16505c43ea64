"""Hugging Face model folders: config, safetensors headers and lazy row reads.

Nothing here loads a whole tensor: :meth:`SourceTensor.rows` reads a row range
with ``os.pread`` straight from the shard, so memory holds one chunk at a time.
Only BF16, F16 and F32 weights are read; anything else is a clear error.

A model folder comes from strangers, so everything here is strict (one
:class:`GgufqError` line for anything wrong, checked before anything is sized
from it):

* every file the folder names (index entries) or that ggufq reads from it
  (:data:`FOLDER_FILES`) must resolve to a regular file inside the folder -- no
  absolute paths, no ``..``, no symlink leading out (except the Hugging Face
  cache's own ``snapshots/<rev>/x -> ../../blobs/<hash>`` layout), no FIFOs,
  devices or directories;
* safetensors headers: no duplicate JSON keys, integer shapes and offsets, data
  regions that tile the data area exactly (no overlap, no gap, as the format
  requires), no tensor name in two shards;
* JSON files: no duplicate keys, bounded nesting;
* config.json (:func:`check_config`): integer fields are integers, sizes and
  counts positive and no larger than the tensors present, float
  hyperparameters finite.
"""
from __future__ import annotations

import json
import math
import os
import re
import stat
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Optional

import numpy as np

from . import GgufqError

# safetensors dtype -> (bytes per element, numpy dtype of the stored bits)
DTYPES: dict[str, tuple[int, np.dtype]] = {
    "BF16": (2, np.dtype("<u2")),
    "F16": (2, np.dtype("<f2")),
    "F32": (4, np.dtype("<f4")),
}
MAX_HEADER = 100 * 1024 * 1024  # the safetensors format's own limit
MAX_JSON = 256 * 1024 * 1024    # no tokenizer or config file of a real model is larger
# files of a model folder that ggufq (or gguf-py's SpecialVocab/Metadata on its behalf) reads
FOLDER_FILES = ("config.json", "generation_config.json", "tokenizer.json", "tokenizer.model",
                "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json", "chat_template.json",
                "chat_template.jinja", "vocab.json", "merges.txt", "README.md", "model.safetensors.index.json",
                "LICENSE", "LICENSE.txt", "LICENSE.md", "LICENCE", "LICENCE.txt", "LICENCE.md")


def bf16_to_f32(bits: np.ndarray) -> np.ndarray:
    return (bits.astype(np.uint32) << np.uint32(16)).view(np.float32)


@dataclass
class SourceTensor:
    name: str
    shape: tuple[int, ...]
    dtype: str
    path: Path
    offset: int            # absolute byte offset of the data in the file
    nbytes: int
    _fd: Optional[int] = field(default=None, repr=False, compare=False)

    @property
    def n_elements(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64)) if self.shape else 1

    @property
    def row_len(self) -> int:
        return self.shape[-1] if self.shape else 1

    @property
    def n_rows(self) -> int:
        return self.n_elements // self.row_len if self.row_len else 0

    def _check_dtype(self) -> tuple[int, np.dtype]:
        try:
            return DTYPES[self.dtype]
        except KeyError:
            raise GgufqError(
                f"{self.path.name}: tensor {self.name} has dtype {self.dtype}; "
                f"ggufq reads {', '.join(DTYPES)} weights") from None

    def rows(self, lo: int, hi: int) -> np.ndarray:
        """Rows ``[lo, hi)`` of the tensor viewed as ``[n_rows, row_len]``, as float32."""
        esize, bits = self._check_dtype()
        lo, hi = max(0, lo), min(hi, self.n_rows)
        n = (hi - lo) * self.row_len
        buf = self.pread(self.offset + lo * self.row_len * esize, n * esize)
        raw = np.frombuffer(buf, dtype=bits)
        out = bf16_to_f32(raw) if self.dtype == "BF16" else raw.astype(np.float32)
        return out.reshape(hi - lo, self.row_len)

    def pread(self, start: int, n: int) -> bytearray:
        """``n`` bytes of the shard from offset ``start`` (the shard's open fd, else opened for the call);
        a short file is one line naming the tensor."""
        fd = self._fd if self._fd is not None else os.open(self.path, os.O_RDONLY)
        try:
            buf = bytearray(n)
            view = memoryview(buf)
            got = 0
            while got < n:
                k = os.preadv(fd, [view[got:]], start + got)
                if k <= 0:
                    raise GgufqError(f"{self.path.name}: file ends inside tensor {self.name} (truncated shard?)")
                got += k
            return buf
        finally:
            if self._fd is None:
                os.close(fd)

    def read_all(self) -> np.ndarray:
        """The whole tensor as float32 in its own shape (for small tensors and tests)."""
        return self.rows(0, self.n_rows).reshape(self.shape)


def _display(name: str) -> str:
    return repr(name) if not name.isprintable() or len(name) > 200 else name


def contained(folder: Path, name: str, what: str) -> Path:
    """``folder / name`` if it is a regular file inside ``folder`` (symlinks resolved), else one line.

    ``folder`` must already be resolved. A link into the Hugging Face cache's ``blobs`` folder
    (``.../snapshots/<rev>/name -> ../../blobs/<hash>``) counts as inside.
    """
    if not isinstance(name, str) or not name or "\0" in name:
        raise GgufqError(f"{what}: bad file name {name!r}")
    rel = Path(name)
    if rel.is_absolute() or ".." in rel.parts or re.match(r"^[A-Za-z]:", name):
        raise GgufqError(f"{what}: file name {_display(name)} points outside the model folder; "
                         "only names inside the folder are read")
    p = folder / rel
    try:
        real = p.resolve(strict=True)
    except FileNotFoundError:
        raise
    except (OSError, RuntimeError) as e:      # symlink loops
        raise GgufqError(f"{what}: cannot resolve {_display(name)} ({getattr(e, 'strerror', None) or e})") from None
    roots = [folder]
    if folder.parent.name == "snapshots":
        roots.append(folder.parent.parent / "blobs")
    if not any(real == r or r in real.parents for r in roots):
        raise GgufqError(f"{what}: {_display(name)} is a link that leads outside the model folder; "
                         "copy the file into the folder instead")
    check_regular(real, f"{what}: {_display(name)}")
    return p


def check_regular(path: Path, what: Optional[str] = None) -> os.stat_result:
    """The stat of ``path`` if it is a regular file (FIFOs, devices, directories hang or mislead)."""
    st = os.stat(path)
    if not stat.S_ISREG(st.st_mode):
        kind = ("a directory" if stat.S_ISDIR(st.st_mode) else "a FIFO" if stat.S_ISFIFO(st.st_mode)
                else "a device" if stat.S_ISCHR(st.st_mode) or stat.S_ISBLK(st.st_mode) else "a socket"
                if stat.S_ISSOCK(st.st_mode) else "not a regular file")
        raise GgufqError(f"{what or path}: is {kind}, not a regular file")
    return st


def open_regular(path: Path, what: Optional[str] = None) -> int:
    """An fd of ``path`` for reading, only if it is a regular file (never blocks on a FIFO)."""
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            check_regular(path, what)
            raise GgufqError(f"{what or path}: not a regular file")
        if hasattr(os, "set_blocking"):
            os.set_blocking(fd, True)
        return fd
    except BaseException:
        os.close(fd)
        raise


def _no_duplicates(where: str):
    def hook(pairs):
        d = {}
        for k, v in pairs:
            if k in d:
                raise GgufqError(f"{where}: duplicate key {_display(k)} (which one counts is ambiguous)")
            d[k] = v
        return d
    return hook


def loads_strict(text: str, where: str):
    """``json.loads`` that refuses duplicate keys and reports too deep nesting as one line."""
    try:
        return json.loads(text, object_pairs_hook=_no_duplicates(where))
    except RecursionError:
        raise GgufqError(f"{where}: JSON nested too deeply") from None


def _int(v, what: str, where: str) -> int:
    if isinstance(v, bool) or not isinstance(v, int):
        raise GgufqError(f"{where}: {what} must be an integer, got {_short(v)}")
    return v


def _short(v) -> str:
    s = repr(v)
    return s if len(s) <= 60 else s[:57] + "..."


def read_safetensors_header(path: Path) -> dict[str, SourceTensor]:
    """Parse one safetensors file's header; validate every tensor's extent against the file.

    Strict as the safetensors library is: the data regions must tile the data area exactly.

    Long because each check of the header (one per field and extent) is its own one-line error."""
    try:
        fd = open_regular(path, path.name)
    except FileNotFoundError:
        raise GgufqError(f"{path}: file not found") from None
    with os.fdopen(fd, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        head = f.read(8)
        if len(head) < 8:
            raise GgufqError(f"{path.name}: not a safetensors file (only {size} bytes)")
        (n,) = struct.unpack("<Q", head)
        if n > MAX_HEADER or 8 + n > size:
            raise GgufqError(f"{path.name}: corrupt safetensors header (header length {n} does not fit the file)")
        raw = f.read(n)
    where = f"{path.name}: safetensors header"
    try:
        header = loads_strict(raw.decode("utf-8"), where)
        if not isinstance(header, dict):
            raise ValueError("header is not an object")
    except (UnicodeDecodeError, ValueError) as e:
        raise GgufqError(f"{path.name}: corrupt safetensors header ({e})") from None
    base = 8 + n
    out: dict[str, SourceTensor] = {}
    spans = []
    for name, info in header.items():
        if name == "__metadata__":
            continue
        if not isinstance(info, dict) or not {"dtype", "shape", "data_offsets"} <= set(info):
            raise GgufqError(f"{path.name}: corrupt safetensors header entry for {_display(name)}")
        ent = f"{path.name}: tensor {_display(name)}"
        dtype = info["dtype"]
        if not isinstance(dtype, str):
            raise GgufqError(f"{ent}: dtype must be a string, got {_short(dtype)}")
        shp, offs = info["shape"], info["data_offsets"]
        if not isinstance(shp, list) or len(shp) > 8:
            raise GgufqError(f"{ent}: shape must be a list of at most 8 integers, got {_short(shp)}")
        shape = tuple(_int(d, "every dimension", ent) for d in shp)
        if any(d < 0 for d in shape):
            raise GgufqError(f"{ent}: negative dimension in shape {list(shape)}")
        if not isinstance(offs, list) or len(offs) != 2:
            raise GgufqError(f"{ent}: data_offsets must be [begin, end], got {_short(offs)}")
        begin, end = (_int(x, "data_offsets", ent) for x in offs)
        if begin < 0 or end < begin or base + end > size:
            raise GgufqError(f"{path.name}: tensor {_display(name)} lies outside the file (truncated shard?)")
        if dtype in DTYPES:
            want = math.prod(shape) * DTYPES[dtype][0]
            if want != end - begin:
                raise GgufqError(f"{path.name}: tensor {_display(name)} has {end - begin} bytes, shape {list(shape)} "
                                 f"of {dtype} needs {want}")
        spans.append((begin, end, name))
        out[name] = SourceTensor(name, shape, dtype, path, base + begin, end - begin)
    spans.sort()
    pos = 0
    for begin, end, name in spans:
        if begin < pos:
            raise GgufqError(f"{path.name}: tensor {_display(name)} overlaps another tensor's data (offset {begin})")
        if begin > pos:
            raise GgufqError(f"{path.name}: gap of {begin - pos} bytes before tensor {_display(name)}'s data "
                             "(the format has no holes)")
        pos = end
    if base + pos != size:
        raise GgufqError(f"{path.name}: {size - base - pos} bytes after the last tensor's data "
                         "(not a safetensors file as written by the library)")
    return out


class Model:
    """A Hugging Face model folder: ``config`` plus lazily readable ``tensors``."""

    def __init__(self, path: Path, config: dict, tensors: dict[str, SourceTensor]):
        self.path = path
        self.config = config
        self.tensors = tensors
        self._fds: dict[Path, int] = {}

    def __enter__(self) -> "Model":
        try:
            for t in self.tensors.values():
                if t.path not in self._fds:
                    self._fds[t.path] = open_regular(t.path, t.path.name)
                t._fd = self._fds[t.path]
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        for t in self.tensors.values():
            t._fd = None
        for fd in self._fds.values():
            os.close(fd)
        self._fds.clear()

    def __contains__(self, name: str) -> bool:
        return name in self.tensors

    def __getitem__(self, name: str) -> SourceTensor:
        try:
            return self.tensors[name]
        except KeyError:
            raise GgufqError(f"{self.path.name}: tensor {name} is missing from the safetensors files") from None

    def json(self, name: str) -> Optional[dict]:
        """A JSON file of the folder (tokenizer_config.json, ...) or None when absent."""
        return read_json(self.path / name, required=False)

    def input_files(self) -> list[Path]:
        """Every file of the folder (outputs must never replace one of them)."""
        try:
            return [self.path / e.name for e in os.scandir(self.path)] + sorted({t.path for t in self.tensors.values()})
        except OSError:
            return sorted({t.path for t in self.tensors.values()})

    def __iter__(self) -> Iterator[SourceTensor]:
        return iter(self.tensors.values())


def read_json(path: Path, required: bool = True) -> Optional[dict]:
    """A JSON object from ``path`` (None when absent and not ``required``); strict, one line when bad."""
    if not os.path.lexists(path):
        if required:
            raise GgufqError(f"{path.parent}: no {path.name} (is this a Hugging Face model folder?)")
        return None
    st = check_regular(path, path.name)
    if st.st_size > MAX_JSON:
        raise GgufqError(f"{path.name}: {st.st_size} bytes is too large for a JSON file of a model folder")
    try:
        with open(path, "rb") as f:
            text = f.read().decode("utf-8")
        doc = loads_strict(text, path.name)
    except (UnicodeDecodeError, ValueError) as e:
        raise GgufqError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(doc, dict):
        raise GgufqError(f"{path.name}: must hold a JSON object, not {type(doc).__name__}")
    return doc


def check_folder_files(path: Path) -> None:
    """Every file ggufq may read from the folder is a regular file inside it, and every JSON one
    is strict JSON holding an object (gguf-py's SpecialVocab would otherwise take the last of
    duplicate keys, or skip a file it cannot parse)."""
    for name in FOLDER_FILES:
        if os.path.lexists(path / name):
            try:
                contained(path, name, path.name)
            except FileNotFoundError:
                raise GgufqError(f"{path.name}: {name} is a broken link") from None
            if name.endswith(".json") and name not in ("config.json", "model.safetensors.index.json"):
                read_json(path / name)


def open_model(path: os.PathLike | str) -> Model:
    """Read config.json and every safetensors header of a folder (no weights are read)."""
    path = Path(path)
    if not path.is_dir():
        raise GgufqError(f"{path}: not a directory")
    given, path = path, path.resolve()     # names in messages and the default output name: as given
    check_folder_files(path)
    config = read_json(path / "config.json")
    # multimodal wrappers keep the language model's hyperparameters under text_config
    tc = config.get("text_config")
    if tc is not None and not isinstance(tc, dict):
        raise GgufqError(f"config.json: text_config must be an object, got {_short(tc)}")
    if tc:
        config = {**config, **tc}

    index_path = path / "model.safetensors.index.json"
    tensors: dict[str, SourceTensor] = {}
    if os.path.lexists(index_path):
        index = read_json(index_path)
        weight_map = index.get("weight_map")
        if not isinstance(weight_map, dict) or not weight_map:
            raise GgufqError(f"{index_path.name}: no weight_map")
        for name, shard in weight_map.items():
            if not isinstance(shard, str):
                raise GgufqError(f"{index_path.name}: the shard of {_display(name)} must be a file name, "
                                 f"got {_short(shard)}")
        shards = sorted(set(weight_map.values()))
        files = {}
        for shard in shards:
            try:
                files[shard] = contained(path, shard, index_path.name)
            except FileNotFoundError:
                raise GgufqError(f"{path}: shard {_display(shard)} named in {index_path.name} is missing") from None
        if len({f.resolve() for f in files.values()}) != len(files):
            raise GgufqError(f"{index_path.name}: two shard names lead to the same file")
        headers = {shard: read_safetensors_header(files[shard]) for shard in shards}
        _no_shared_names(headers)
        for name, shard in weight_map.items():
            if name not in headers[shard]:
                raise GgufqError(f"{_display(shard)}: tensor {_display(name)} named in {index_path.name} "
                                 "is not in the shard")
            tensors[name] = headers[shard][name]
    else:
        files = sorted(p for p in path.glob("*.safetensors"))
        if not files:
            raise GgufqError(f"{path}: no model.safetensors or model.safetensors.index.json")
        headers = {}
        for f in files:
            try:
                contained(path, f.name, path.name)
            except FileNotFoundError:
                raise GgufqError(f"{path.name}: {f.name} is a broken link") from None
            headers[f.name] = read_safetensors_header(f)
        _no_shared_names(headers)
        for h in headers.values():
            tensors.update(h)
    from .source_fp8 import dequantizing   # FP8 weights x block scales; other quant_methods: one error line
    tensors = dequantizing(config, tensors)
    check_config(config, tensors)
    return Model(given, config, tensors)


def _no_shared_names(headers: dict[str, dict[str, SourceTensor]]) -> None:
    seen: dict[str, str] = {}
    for shard, h in headers.items():
        for name in h:
            if name in seen:
                raise GgufqError(f"tensor {_display(name)} is in both {_display(seen[name])} and {_display(shard)}")
            seen[name] = shard


# config.json fields: integers that size things (must be >= 1 and no larger than any tensor dimension),
# other integers, and float hyperparameters (finite numbers)
SIZE_FIELDS = ("hidden_size", "intermediate_size", "vocab_size", "head_dim")
COUNT_FIELDS = ("num_hidden_layers", "num_attention_heads", "num_key_value_heads", "num_local_experts",
                "num_experts_per_tok")
INT_FIELDS = ("max_position_embeddings", "original_max_position_embeddings", "n_ctx", "n_positions",
              "max_length", "max_sequence_length", "model_max_length", "sliding_window", "max_window_layers")
FLOAT_FIELDS = ("rope_theta", "rms_norm_eps", "layer_norm_eps", "layer_norm_epsilon", "partial_rotary_factor")
ROPE_INT_FIELDS = ("original_max_position_embeddings",)
ROPE_FLOAT_FIELDS = ("rope_theta", "factor", "low_freq_factor", "high_freq_factor", "attention_factor",
                     "attn_factor", "beta_fast", "beta_slow", "extrapolation_factor", "partial_rotary_factor",
                     "mscale", "mscale_all_dim")
BOOL_FIELDS = ("tie_word_embeddings", "attention_bias", "mlp_bias", "use_sliding_window")
_LAYER_RE = re.compile(r"(?:^|\.)layers\.(\d+)\.")


def _config_int(config: dict, key: str, where: str) -> Optional[int]:
    v = config.get(key)
    if v is None:
        return None
    if isinstance(v, float) and math.isfinite(v) and v.is_integer():
        v = config[key] = int(v)         # 4096.0: an integer, as transformers reads it
    if isinstance(v, bool) or not isinstance(v, int):
        raise GgufqError(f"{where}: {key} must be an integer, got {_short(v)}")
    if v < 0:
        raise GgufqError(f"{where}: {key} must not be negative, got {v}")
    return v


def _config_float(d: dict, key: str, where: str) -> None:
    v = d.get(key)
    if v is None:
        return
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        raise GgufqError(f"{where}: {key} must be a number, got {_short(v)}")
    if not math.isfinite(v):
        raise GgufqError(f"{where}: {key} is {v}; a hyperparameter must be a finite number")


def check_config(config: dict, tensors: dict[str, SourceTensor], where: str = "config.json") -> None:
    """Types and bounds of config.json against the tensors present, before anything is sized from it."""
    arch = config.get("architectures")
    if arch is not None and not (isinstance(arch, str) or (isinstance(arch, list) and
                                                           all(isinstance(a, str) for a in arch))):
        raise GgufqError(f"{where}: architectures must be a list of names, got {_short(arch)}")
    max_dim = max((d for t in tensors.values() for d in t.shape), default=0)
    for key in SIZE_FIELDS + COUNT_FIELDS + INT_FIELDS:
        v = _config_int(config, key, where)
        if v is None:
            continue
        if key in SIZE_FIELDS + COUNT_FIELDS[:3] and v < 1:
            raise GgufqError(f"{where}: {key} must be at least 1, got {v}")
        if key in SIZE_FIELDS and v > max_dim:
            raise GgufqError(f"{where}: {key} = {v} but no tensor has a dimension that large (largest {max_dim})")
    layers = {int(m.group(1)) for name in tensors if (m := _LAYER_RE.search(name))}
    n_layer = config.get("num_hidden_layers")
    if n_layer is not None and n_layer > len(layers):
        raise GgufqError(f"{where}: num_hidden_layers = {n_layer} but the safetensors files hold "
                         f"{len(layers)} layers")
    hidden = config.get("hidden_size")
    for key in ("num_attention_heads", "num_key_value_heads"):
        v = config.get(key)
        if v is not None and hidden is not None and v > hidden:
            raise GgufqError(f"{where}: {key} = {v} is more than hidden_size = {hidden}")
    heads, kv = config.get("num_attention_heads"), config.get("num_key_value_heads")
    if heads and kv and heads % kv:
        raise GgufqError(f"{where}: num_attention_heads = {heads} is not a multiple of num_key_value_heads = {kv}")
    if heads and hidden and config.get("head_dim") is None and hidden % heads:
        raise GgufqError(f"{where}: hidden_size = {hidden} is not a multiple of num_attention_heads = {heads} "
                         "(and no head_dim is given)")
    for key in FLOAT_FIELDS:
        _config_float(config, key, where)
    for key in BOOL_FIELDS:
        v = config.get(key)
        if v is not None and not isinstance(v, bool):
            raise GgufqError(f"{where}: {key} must be true or false, got {_short(v)}")
    for rkey in ("rope_scaling", "rope_parameters"):
        rope = config.get(rkey)
        if rope is None:
            continue
        if not isinstance(rope, dict):
            raise GgufqError(f"{where}: {rkey} must be an object, got {_short(rope)}")
        for sub in [rope] + [v for v in rope.values() if isinstance(v, dict)]:
            for key in ROPE_INT_FIELDS:
                _config_int(sub, key, f"{where}: {rkey}")
            for key in ROPE_FLOAT_FIELDS:
                _config_float(sub, key, f"{where}: {rkey}")
            rtype = sub.get("rope_type", sub.get("type"))
            if rtype is not None and not isinstance(rtype, str):
                raise GgufqError(f"{where}: {rkey}.rope_type must be a name, got {_short(rtype)}")
            if rtype == "yarn" and sub.get("factor") is not None and not (
                    sub.get("original_max_position_embeddings") or config.get("original_max_position_embeddings")):
                raise GgufqError(f"{where}: yarn rope scaling needs original_max_position_embeddings "
                                 f"(in {rkey} or at the top level)")
