"""Signal handling for the first moments of a command-line run, before anything heavy is
imported (this module imports only ``os`` and ``signal``): SIGINT, SIGTERM or SIGHUP end the
process at once with one line and exit 128 + signal -- nothing has been written yet.
:func:`ggufq.procs.install_handlers` takes over when the command starts."""
import os
import signal

_NAMES = {getattr(signal, n): n for n in ("SIGINT", "SIGTERM", "SIGHUP") if hasattr(signal, n)}


def _early(signum, frame):
    msg = "interrupted" if signum == signal.SIGINT else f"stopped by {_NAMES.get(signum, signum)}"
    try:
        os.write(2, f"ggufq: {msg}\n".encode())
    finally:
        os._exit(128 + signum)


def early_handlers() -> None:
    for s in _NAMES:
        signal.signal(s, _early)
