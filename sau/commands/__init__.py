"""Sub-commands of the `sau` command line.

Each module here defines `add_parser(subparsers)` and `run(args) -> int`; `sau.cli` lists
them in COMMANDS. Modules import their heavy dependencies inside `run` so that
`sau --help` stays fast.
"""
