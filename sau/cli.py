"""The `sau` command line (also `python -m sau`).

Sub-commands live in `sau.commands.<name>`; each owns its arguments. A `SAUError` raised
anywhere becomes one line on stderr and exit status 2; Ctrl-C exits 130.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from sau.errors import SAUError

# Order is the order shown in --help.
COMMANDS = ("demo", "unlearn", "data", "prune")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="sau",
        description="Sparsity-Aware Unlearning for pruned language models.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMANDS:
        try:
            module = importlib.import_module(f"sau.commands.{name}")
        except ModuleNotFoundError as err:
            if err.name != f"sau.commands.{name}":
                raise
            continue  # not built yet
        module.add_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "command", None):
        parser.print_help()
        return 0
    try:
        return int(args.run(args) or 0)
    except SAUError as err:
        print(f"sau {args.command}: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"sau {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
