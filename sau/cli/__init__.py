"""The `sau` command line: `sau demo | unlearn | sweep | data | prune` (also `python -m sau`)."""

from sau.cli.main import entry, main

__all__ = ["entry", "main"]
