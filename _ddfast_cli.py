"""Entry point of the ``ddfast`` console command.

It lives outside the package so that it runs before torch is imported: an interrupt (Ctrl-C,
SIGINT) that arrives while ddfast and torch import is held until the import ends, then ends the
command like any other interrupt, with one line and status 130. Delivered mid-import, it can
abort the interpreter from inside a compiled extension (status 134, a long C++ trace).
"""
import signal
import sys


def _import_cli():
    """Import :mod:`ddfast.paper.cli` (and the training module its ``main`` imports first) with
    SIGINT held; return ``(module, interrupted)``. A process that ignores SIGINT (a background job
    of a script) is left as it is: a held signal would otherwise end it."""
    hold = hasattr(signal, "pthread_sigmask") and signal.getsignal(signal.SIGINT) is signal.default_int_handler
    if hold:
        before = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT})
    try:
        from ddfast.paper import cli, train  # noqa: F401  (train: what cli.main imports first)
        try:                                 # triton (nanobind) loads lazily later otherwise; an
            import triton  # noqa: F401     # interrupt inside its import aborts the process (134)
        except ImportError:
            pass
    finally:
        interrupted = hold and signal.SIGINT not in before and signal.SIGINT in signal.sigpending()
        if interrupted:
            signal.sigwait({signal.SIGINT})    # take the held signal, so that it is not delivered
        if hold:
            signal.pthread_sigmask(signal.SIG_SETMASK, before)
    return cli, interrupted


def main() -> int:
    cli, interrupted = _import_cli()
    if interrupted:
        print(cli.INTERRUPTED, file=sys.stderr)
        return 130
    return cli.main()


if __name__ == "__main__":
    sys.exit(main())
