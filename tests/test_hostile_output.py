"""The output: nothing replaced without --force, never an input even with --force, and everything
that is part of the output (GGUF, shards, Modelfile, --validate) done before anything is placed."""
from __future__ import annotations

import os

import pytest

from hostile import check_case, model_copy, no_process_left, replace, run_forked

S3 = "model-00003-of-00003.safetensors"


@pytest.fixture
def m(tmp_path):
    return model_copy(tmp_path / "m")


@pytest.fixture
def out(tmp_path):
    d = tmp_path / "o"
    d.mkdir()
    return d


def test_existing_output_needs_force(m, out):
    (out / "x.gguf").write_bytes(b"keep")
    check_case(["convert", m, "-o", out / "x.gguf"], [out, m], "exists; pass --force")
    assert (out / "x.gguf").read_bytes() == b"keep"


def test_output_in_the_model_folder_is_an_input_even_with_force(m, out):
    replace(m / "old.gguf", b"an old conversion the folder came with")
    check_case(["convert", m, "-o", m / "old.gguf", "--force"], [out, m], "is one of the conversion's inputs")


def test_output_hard_linked_to_a_shard_is_refused_even_with_force(m, out):
    os.link(m / S3, out / "x.gguf")
    check_case(["convert", m, "-o", out / "x.gguf", "--force"], [out, m], "is one of the conversion's inputs")


def test_output_symlinked_to_a_shard_is_refused_even_with_force(m, out):
    os.symlink(m / S3, out / "x.gguf")
    check_case(["convert", m, "-o", out / "x.gguf", "--force"], [out, m], "is one of the conversion's inputs")


def test_output_is_the_imatrix_is_refused_even_with_force(m, out, tmp_path):
    im = out / "imatrix.gguf"
    r = run_forked("convert", m, "-o", im, "-t", "F32", "-q")
    assert r.rc == 0
    check_case(["convert", m, "-o", im, "--force", "-t", "Q4_K_M", "--imatrix", im], [out, m], "inputs")


def test_output_directory_missing(m, out):
    check_case(["convert", m, "-o", out / "nope" / "x.gguf"], [out, m], "no such directory")


def test_output_not_gguf(m, out):
    check_case(["convert", m, "-o", out / "x.bin"], [out, m], "must end in .gguf")


def test_output_is_a_directory_named_gguf_with_force(m, out):
    (out / "d.gguf").mkdir()
    (out / "d.gguf" / "keep").write_text("x")
    # a directory as -o means "write into it": the default name inside it
    r = run_forked("convert", m, "-o", out / "d.gguf", "-t", "Q8_0", "-q")
    assert r.rc == 0, r.err
    assert (out / "d.gguf" / "keep").read_text() == "x"
    no_process_left()


def test_existing_modelfile_refused_before_any_work(m, out):
    (out / "x.Modelfile").write_text("mine")
    check_case(["convert", m, "-o", out / "x.gguf", "--ollama"], [out, m], "x.Modelfile exists; pass --force")
    assert (out / "x.Modelfile").read_text() == "mine"


def test_modelfile_that_is_a_directory_leaves_no_gguf(m, out):
    (out / "x.Modelfile").mkdir()
    check_case(["convert", m, "-o", out / "x.gguf", "--ollama", "--force"], [out, m], "is a directory")


def test_existing_shard_refused_and_nothing_placed(m, out):
    replace(out / "x-00002-of-00002.gguf", b"keep")
    check_case(["convert", m, "-o", out / "x.gguf", "--split-max-tensors", "40", "-t", "Q8_0"], [out, m],
               "x-00002-of-00002.gguf exists")


def test_ollama_writes_gguf_and_modelfile_together(m, out):
    r = run_forked("convert", m, "-o", out / "x.gguf", "-t", "Q8_0", "--ollama")
    assert r.rc == 0, r.err
    assert sorted(os.listdir(out)) == ["x.Modelfile", "x.gguf"]
    assert "FROM ./x.gguf" in (out / "x.Modelfile").read_text()
    assert f"wrote {out / 'x.Modelfile'}" in r.err
    no_process_left()


def test_validate_failure_leaves_nothing(m, out, tmp_path):
    """--validate runs on the finished file before it is placed: its failure leaves no GGUF, no Modelfile."""
    pytest.importorskip("llama_cpp")
    text = tmp_path / "short.txt"
    text.write_text("too short")
    check_case(["convert", m, "-o", out / "x.gguf", "-t", "Q8_0", "--ollama", "--validate", "--text", text],
               [out, m], "", timeout=300)


def test_default_name_from_a_hostile_model_card(m, out):
    """The default output name comes from the model card: slashes, dots and control characters are defused."""
    replace(m / "README.md", "---\nbase_model: x\n---\n")
    r = run_forked("convert", m, "-t", "Q8_0", "-q", "--name", "../../evil\nname", cwd=out)
    assert r.rc == 0, r.err
    names = os.listdir(out)
    assert len(names) == 1 and names[0].startswith("-..-evil-name") and names[0].endswith(".gguf"), names
    assert not (out.parent.parent / "evil").exists()
    no_process_left()
