"""Hostile model.safetensors.index.json and folder layout: no path leaves the model folder,
only regular files are read; one line, exit 1, nothing written, no process left."""
from __future__ import annotations

import os
from pathlib import Path

import pytest

from hostile import check_case, edit_json, model_copy, no_process_left, replace, run_forked

IDX = "model.safetensors.index.json"
S3 = "model-00003-of-00003.safetensors"


def _point(name_fn):
    def mutate(m: Path, tmp: Path):
        edit_json(m / IDX, lambda d: d["weight_map"].__setitem__("lm_head.weight", name_fn(m, tmp)))
    return mutate


def _other_model(m, tmp):
    other = tmp / "other"
    other.mkdir(exist_ok=True)
    os.link(m / S3, other / "model.safetensors")
    return "../other/model.safetensors"


def _link_out(m, tmp):
    secret = tmp / "secret.safetensors"
    os.link(m / S3, secret)
    os.unlink(m / S3)
    os.symlink(secret, m / S3)
    return S3


def _link_etc(m, tmp):
    os.symlink("/etc/passwd", m / "passwd.safetensors")
    return "passwd.safetensors"


def _fifo(m, tmp):
    os.mkfifo(m / "pipe.safetensors")
    return "pipe.safetensors"


def _loop(m, tmp):
    os.symlink("b.safetensors", m / "a.safetensors")
    os.symlink("a.safetensors", m / "b.safetensors")
    return "a.safetensors"


def _devnull(m, tmp):
    os.symlink("/dev/zero", m / "zero.safetensors")
    return "zero.safetensors"


CASES = {
    "../ to another model": (_point(_other_model), "points outside the model folder"),
    "absolute /etc/passwd": (_point(lambda m, t: "/etc/passwd"), "points outside the model folder"),
    "absolute path of a real shard": (_point(lambda m, t: str(m / S3)), "points outside the model folder"),
    "dir/../../ escape": (_point(lambda m, t: "sub/../../x.safetensors"), "points outside the model folder"),
    "symlink leading out": (_point(_link_out), "leads outside the model folder"),
    "symlink to /etc/passwd": (_point(_link_etc), "leads outside the model folder"),
    "symlink to /dev/zero": (_point(_devnull), "leads outside the model folder"),
    "symlink loop": (_point(_loop), "cannot resolve"),
    "FIFO shard": (_point(_fifo), "FIFO"),
    "directory shard": (_point(lambda m, t: (m / "d").mkdir() or "d"), "directory"),
    "the folder itself": (_point(lambda m, t: "."), "directory"),
    "empty name": (_point(lambda m, t: ""), "bad file name"),
    "NUL in name": (_point(lambda m, t: "a\0b"), "bad file name"),
    "shard name a number": (_point(lambda m, t: 3), "must be a file name"),
    "shard name a list": (_point(lambda m, t: [S3]), "must be a file name"),
    "missing shard": (_point(lambda m, t: "nope.safetensors"), "is missing"),
    "tensor not in its shard": (lambda m, t: edit_json(m / IDX, lambda d: d["weight_map"].__setitem__(
        "lm_head.weight", "model-00001-of-00003.safetensors")), "is not in the shard"),
    "two names, one file": (lambda m, t: (os.symlink(S3, m / "alias.safetensors"), edit_json(
        m / IDX, lambda d: d["weight_map"].__setitem__("model.norm.weight", "alias.safetensors"))),
        "same file"),
    "weight_map missing": (lambda m, t: edit_json(m / IDX, lambda d: d.pop("weight_map")), "no weight_map"),
    "weight_map a list": (lambda m, t: edit_json(m / IDX, lambda d: d.__setitem__("weight_map", [1])),
                          "no weight_map"),
    "index a list": (lambda m, t: replace(m / IDX, "[]"), "must hold a JSON object"),
    "index not JSON": (lambda m, t: replace(m / IDX, "{weight_map:"), "not valid JSON"),
    "index not UTF-8": (lambda m, t: replace(m / IDX, b'{"\xff": 1}'), "not valid JSON"),
    "index duplicate key": (lambda m, t: replace(m / IDX, (m / IDX).read_text().replace(
        '"weight_map": {', f'"weight_map": {{"lm_head.weight": "{S3}", ', 1)), "duplicate key"),
    "index nested deeply": (lambda m, t: replace(m / IDX, '{"a":' + "[" * 200000 + "]" * 200000 + "}"),
                            "nested too deeply"),
    "index FIFO": (lambda m, t: (os.unlink(m / IDX), os.mkfifo(m / IDX)), "FIFO"),
    "index a directory": (lambda m, t: (os.unlink(m / IDX), (m / IDX).mkdir()), "directory"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_hostile_index(case, tmp_path):
    m = model_copy(tmp_path / "m")
    mutate, want = CASES[case]
    mutate(m, tmp_path)
    out = tmp_path / "o"
    out.mkdir()
    check_case(["convert", m, "-o", out / "x.gguf", "-t", "Q8_0"], [out, m], want)


@pytest.mark.parametrize("name", ["config.json", "tokenizer.model", "tokenizer_config.json", "README.md",
                                  "generation_config.json", "special_tokens_map.json", "chat_template.jinja",
                                  "LICENSE"])
@pytest.mark.parametrize("kind", ["link out", "FIFO"])
def test_folder_files_inside_and_regular(name, kind, tmp_path):
    """Every file ggufq (or gguf-py on its behalf) reads from the folder is checked before reading."""
    m = model_copy(tmp_path / "m")
    if os.path.lexists(m / name):
        os.unlink(m / name)
    if kind == "FIFO":
        os.mkfifo(m / name)
    else:
        (tmp_path / "outside").write_text("{}")
        os.symlink(tmp_path / "outside", m / name)
    out = tmp_path / "o"
    out.mkdir()
    check_case(["convert", m, "-o", out / "x.gguf", "-t", "Q8_0"], [out, m],
               "FIFO" if kind == "FIFO" else "outside the model folder")


def test_links_inside_the_folder_and_hf_cache_layout_convert(tmp_path):
    """A symlink to a file in the folder, and the Hugging Face cache's snapshots -> blobs links, are fine."""
    repo = tmp_path / "models--x--tiny"
    snap = repo / "snapshots" / "abc123"
    blobs = repo / "blobs"
    snap.mkdir(parents=True)
    blobs.mkdir()
    src = model_copy(tmp_path / "src")
    for f in src.iterdir():
        os.link(f, blobs / f.name)
        os.symlink(Path("..") / ".." / "blobs" / f.name, snap / f.name)
    out = tmp_path / "o"
    out.mkdir()
    r = run_forked("convert", snap, "-o", out / "x.gguf", "-t", "Q8_0", "-q")
    assert r.rc == 0, r.err
    no_process_left()
