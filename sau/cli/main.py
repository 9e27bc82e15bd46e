"""The `sau` command line (also `python -m sau`).

Sub-commands live in `sau.cli.<name>`; each owns its arguments. A `SAUError` raised
anywhere becomes one line on stderr and exit status 2 (1 for a `RunFailedError`);
a stop by a signal exits 128 + its number and names it: Ctrl-C (SIGINT) 130, SIGTERM 143,
also when the unlearning loop caught the signal, checkpointed and stopped.
"""

from __future__ import annotations

import os

# Before torch is imported: libgomp's default active wait makes small models crawl when
# the 2-core machines we target are shared (measured 0.92 s vs 0.021 s per training step).
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import argparse  # noqa: E402
import importlib  # noqa: E402
import signal  # noqa: E402
import sys  # noqa: E402
import threading  # noqa: E402

from sau.errors import SAUError  # noqa: E402
from sau.unlearn.signals import Stopped, signal_name, stop_signal_of  # noqa: E402

# Order is the order shown in --help.
COMMANDS = ("demo", "unlearn", "sweep", "data", "prune")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="sau",
        description="Sparsity-Aware Unlearning for pruned language models.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMANDS:
        importlib.import_module(f"sau.cli.{name}").add_parser(sub)
    return parser


class Terminated(Stopped):
    """SIGTERM outside the unlearning loop (which handles it itself: checkpoint, stop).

    A KeyboardInterrupt (`sau.unlearn.signals.Stopped`), so every cleanup that runs on
    Ctrl-C runs on SIGTERM too.
    """

    def __init__(self) -> None:
        super().__init__(signal.SIGTERM)


def _raise_terminated(signum, frame):
    raise Terminated


def error_line(command: str, err: BaseException) -> str:
    """The one line a refused command prints on stderr."""
    return f"sau {command}: error: {err}"


def stop_message(stop: KeyboardInterrupt) -> tuple[str, int]:
    """('interrupted (SIGINT)' or 'terminated (SIGTERM)' ..., exit status 128 + signum)
    for a KeyboardInterrupt that ends a command (`sau.unlearn.signals.stop_signal_of`)."""
    signum = stop_signal_of(stop)
    word = {signal.SIGINT: "interrupted", signal.SIGTERM: "terminated"}.get(signum, "stopped")
    return f"{word} ({signal_name(signum)})", 128 + signum


def main(argv: list[str] | None = None) -> int:
    """Run one sub-command; returns the exit status (2: bad input, one line on stderr;
    1: a run that produced nothing usable; 130 / 143: Ctrl-C / SIGTERM)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "command", None):
        parser.print_help()
        return 0
    in_main = threading.current_thread() is threading.main_thread()
    old = signal.signal(signal.SIGTERM, _raise_terminated) if in_main else None
    try:
        return int(args.run(args) or 0)
    except SAUError as err:
        print(error_line(args.command, err), file=sys.stderr)
        return getattr(err, "exit_code", 2)
    except OSError as err:  # disk full, permissions changed mid-run: one line, no traceback
        print(error_line(args.command, err), file=sys.stderr)
        return 2
    except KeyboardInterrupt as stop:
        what, status = stop_message(stop)
        print(f"sau {args.command}: {what}", file=sys.stderr)
        return status
    finally:
        if in_main:
            signal.signal(signal.SIGTERM, old)


def entry(argv: list[str] | None = None) -> None:
    """The `sau` executable and `python -m sau`: `main`, then exit with its status.

    A rank under torchrun leaves without the interpreter's finalization (os._exit once
    its output is flushed): about one gloo run in fifteen aborted there ("terminate
    called without an active exception", no Python frame left, after every file was
    written and the group destroyed), which torchrun reports as a failed rank and
    answers by terminating the others mid-write. Every file `sau` writes is closed
    (and renamed into place) before `main` returns.
    """
    status = main(argv)
    if "RANK" in os.environ and "WORLD_SIZE" in os.environ:  # launched by torchrun
        import logging

        logging.shutdown()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(status)
    sys.exit(status)


if __name__ == "__main__":  # pragma: no cover
    entry()
