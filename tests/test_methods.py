"""quant.methods: the one registry of --method (names, old names, what each needs, the CLI's list)."""
from __future__ import annotations

import click
import pytest

from ggufq import GgufqError
from ggufq.cli.convert import command
from ggufq.quant import hqq, methods


def test_old_names_are_aliases_of_what_runs():
    assert methods.get("hqq") is methods.get("calibrated")
    assert methods.get("hqq-max") is methods.get("calibrated-max")
    assert methods.get("hqq-fast") is methods.get("refine")
    assert methods.get("calibrated").encoder is hqq.encode_hqq
    assert methods.get("refine").encoder is hqq.encode_hqq_fast
    assert methods.get("kquant").encoder is None


def test_needs():
    assert [m.name for m in methods.METHODS.values() if m.moments] == ["calibrated", "calibrated-max"]
    assert {m.name for m in methods.METHODS.values() if m.importance} == {"calibrated", "calibrated-max", "refine"}


def test_the_cli_offers_exactly_the_registry():
    opt = next(p for p in command.params if p.name == "method")
    assert isinstance(opt.type, click.Choice)
    assert list(opt.type.choices) == methods.cli_names()
    assert "refine-kquant" not in opt.type.choices and methods.get("refine-kquant").encoder is hqq.encode_refined
    for m in methods.METHODS.values():
        if m.cli:
            assert m.name in opt.help


def test_unknown_method():
    with pytest.raises(GgufqError, match="unknown --method 'gptq'; choose one of kquant, calibrated"):
        methods.get("gptq")
