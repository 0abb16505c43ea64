"""The ``ggufq`` command. Each subcommand lives in its own module here and only
wires a stage of the package together; errors the user can act on
(:class:`ggufq.GgufqError`, OSError) become one line on stderr and exit 1."""
from __future__ import annotations

import importlib
import os
import sys

import click

from .. import GgufqError, __version__

# subcommand modules; each defines `command` (a click.Command)
_COMMANDS = ("convert", "plan", "inspect", "eval")


class _Group(click.Group):
    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except GgufqError as e:
            click.echo(f"ggufq: error: {e}", err=True)
            sys.exit(1)
        except BrokenPipeError:
            # output piped into `head` and the like: stop quietly
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, sys.stdout.fileno())
            sys.exit(0)
        except OSError as e:
            where = f" ({e.filename})" if getattr(e, "filename", None) else ""
            click.echo(f"ggufq: error: {e.strerror or e}{where}", err=True)
            sys.exit(1)
        except KeyboardInterrupt:
            click.echo("ggufq: interrupted", err=True)
            sys.exit(130)


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="ggufq")
def main() -> None:
    """Convert Hugging Face model folders to quantized GGUF files for llama.cpp and Ollama."""


for _name in _COMMANDS:
    main.add_command(importlib.import_module(f"{__name__}.{_name}").command)
