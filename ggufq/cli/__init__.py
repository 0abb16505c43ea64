"""The ``ggufq`` command. Each subcommand lives in its own module here and only
wires a stage of the package together.

Every failure is one line on stderr: errors the user can act on
(:class:`ggufq.GgufqError`, OSError) exit 1, usage errors keep click's exit 2, and
anything unexpected is reported as one ``ggufq: error: internal error ...`` line,
exit 1 (``GGUFQ_DEBUG=1`` shows the traceback). SIGINT, SIGTERM and SIGHUP
(:mod:`ggufq.procs`) unwind the command so its temporary output is removed, print
one line and exit 128 + the signal number (130, 143, 129)."""
from __future__ import annotations

import os
import sys

if os.path.basename(sys.argv[0] if sys.argv else "") == "ggufq":     # the console script
    from .._early import early_handlers
    early_handlers()

import importlib  # noqa: E402

import click  # noqa: E402

from .. import GgufqError, __version__
from ..procs import Interrupted, delivered, install_handlers

# subcommand modules; each defines `command` (a click.Command)
_COMMANDS = ("convert", "plan", "inspect", "eval")


def _say(line: str) -> None:
    try:
        click.echo(line, err=True)
    except (OSError, ValueError):
        pass


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0][:300] if text else ""


# where an unexpected exception came from (a module of the traceback) -> the input to blame
_BLAME = (
    (("ggufq/vocab/", "gguf/vocab.py"), "the tokenizer files (tokenizer.json, tokenizer.model, tokenizer_config.json, "
                                        "special_tokens_map.json, added_tokens.json) are malformed"),
    (("gguf/metadata.py",), "the model card (README.md front matter) is malformed"),
    (("ggufq/arch/",), "config.json holds a value of the wrong type or size"),
    (("ggufq/imatrix.py",), "the --imatrix file is malformed"),
    (("ggufq/plan/maps.py",), "the --map file is malformed"),
    (("ggufq/ollama.py",), "the chat template or tokenizer metadata is malformed"),
    (("gguf/gguf_reader.py", "ggufq/plan/gguf_header.py", "ggufq/cli/inspect.py"), "the GGUF file is malformed"),
)


def _blame(e: BaseException) -> str:
    import traceback
    files = [f.filename.replace(os.sep, "/") for f in traceback.extract_tb(e.__traceback__)]
    for f in reversed(files):
        for parts, what in _BLAME:
            if any(p in f for p in parts):
                return what
    return "an input is probably malformed"


class _Group(click.Group):
    def main(self, *args, **kwargs):
        import signal
        import threading

        from .._early import _early
        from ..procs import SIGNALS
        # handlers to put back for an in-process caller (tests); the early ones of a command-line run
        # are not put back: a signal during the exit would print a second line
        old = {s: h for s in SIGNALS if (h := signal.getsignal(s)) is not _early}
        old_hooks = sys.unraisablehook, threading.excepthook
        if not os.environ.get("GGUFQ_DEBUG"):
            # exceptions Python can only print (in __del__, at-fork hooks, a pool's helper threads:
            # "Exception ignored in ...", "Bad file descriptor" while a pool is torn down) would add
            # tracebacks after the one line; a signal swallowed there is raised again (procs.check)
            sys.unraisablehook = lambda *a: None
            threading.excepthook = lambda *a: None
        standalone = kwargs.pop("standalone_mode", True)
        try:
            install_handlers()        # inside the try: a signal may arrive while it installs them
            if not standalone:
                return super().main(*args, standalone_mode=False, **kwargs)
            try:
                rv = super().main(*args, standalone_mode=False, **kwargs)
            except click.exceptions.UsageError as e:
                if type(e).__name__ == "NoArgsIsHelpError" and e.ctx is not None:    # bare `ggufq`
                    click.echo(e.ctx.get_help())
                    sys.exit(e.exit_code)
                # click's usage errors, as one line (exit 2); --help shows the usage
                where = f" (ggufq {e.ctx.info_name} --help)" if e.ctx is not None and e.ctx.parent else \
                    " (ggufq --help)"
                _say(f"ggufq: error: {' '.join(e.format_message().split())}{where}")
                sys.exit(e.exit_code)
            except click.exceptions.ClickException as e:
                _say(f"ggufq: error: {' '.join(e.format_message().split())}")
                sys.exit(e.exit_code)
            except click.exceptions.Abort:
                _say("ggufq: interrupted")
                sys.exit(130)
            sys.exit(rv if isinstance(rv, int) else 0)
        except Interrupted as e:
            delivered()
            _say(f"ggufq: {e.message}")
            sys.exit(e.exit_code)
        finally:
            sys.unraisablehook, threading.excepthook = old_hooks
            for s, h in old.items():
                try:
                    signal.signal(s, h if h is not None else signal.SIG_DFL)
                except (ValueError, TypeError):
                    pass
            # a command-line run is over (output placed, or the one line said): a signal from here on
            # changes nothing. Ignored, not left to Python, whose finalization puts SIG_DFL back for
            # the signals it handled -- a Ctrl-C in the last milliseconds then killed a finished run (-2)
            for s in SIGNALS:
                if s not in old:
                    signal.signal(s, signal.SIG_IGN)

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except GgufqError as e:
            _say(f"ggufq: error: {' '.join(str(e).split(chr(10)))}")
            sys.exit(1)
        except BrokenPipeError:
            # output piped into `head` and the like: stop quietly
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, sys.stdout.fileno())
            sys.exit(0)
        except OSError as e:
            where = f" ({e.filename})" if getattr(e, "filename", None) else ""
            _say(f"ggufq: error: {e.strerror or e}{where}")
            sys.exit(1)
        except KeyboardInterrupt:
            _say("ggufq: interrupted")
            sys.exit(130)
        except (click.exceptions.ClickException, click.exceptions.Exit, click.exceptions.Abort):
            raise
        except MemoryError:
            _say("ggufq: error: out of memory (a malformed input claiming huge sizes, or too small a machine)")
            sys.exit(1)
        except RecursionError:
            _say("ggufq: error: an input is nested too deeply to read")
            sys.exit(1)
        except Exception as e:
            cause = e
            while cause is not None and not isinstance(cause, Interrupted):
                cause = cause.__cause__ or cause.__context__
            if cause is not None:
                # a signal raised inside machinery that wraps exceptions (class creation's
                # __set_name__ during an import gives RuntimeError from it): it is the signal
                raise cause from None
            if os.environ.get("GGUFQ_DEBUG"):
                raise
            _say(f"ggufq: error: {_blame(e)} ({type(e).__name__}: {_first_line(e)}); fix it, or rerun with "
                 "GGUFQ_DEBUG=1 for the traceback and report it if the input is fine")
            sys.exit(1)


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="ggufq")
def main() -> None:
    """Convert Hugging Face model folders to quantized GGUF files for llama.cpp and Ollama."""


for _name in _COMMANDS:
    main.add_command(importlib.import_module(f"{__name__}.{_name}").command)
