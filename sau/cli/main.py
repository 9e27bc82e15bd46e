"""The `sau` command line (also `python -m sau`).

Sub-commands live in `sau.cli.<name>`; each owns its arguments. A `SAUError` raised
anywhere becomes one line on stderr and exit status 2 (1 for a `RunFailedError`);
Ctrl-C exits 130, SIGTERM 143.
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


class Terminated(KeyboardInterrupt):
    """SIGTERM outside the unlearning loop (which handles it itself: checkpoint, stop).

    A KeyboardInterrupt, so every cleanup that runs on Ctrl-C runs on SIGTERM too.
    """


def _raise_terminated(signum, frame):
    raise Terminated


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
        print(f"sau {args.command}: error: {err}", file=sys.stderr)
        return getattr(err, "exit_code", 2)
    except OSError as err:  # disk full, permissions changed mid-run: one line, no traceback
        print(f"sau {args.command}: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as stop:
        term = isinstance(stop, Terminated)
        print(f"sau {args.command}: {'terminated' if term else 'interrupted'}", file=sys.stderr)
        return 143 if term else 130
    finally:
        if in_main:
            signal.signal(signal.SIGTERM, old)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
