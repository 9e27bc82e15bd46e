"""User-facing errors.

`SAUError` is what the command line turns into a one-line message and a non-zero exit
(no traceback). Library code raises it, or a subclass, for problems a user can fix:
a missing file, a malformed line, a model directory without weights.
"""

from __future__ import annotations


class SAUError(Exception):
    """A problem with the user's input, reported on one line by the CLI."""


class DataFormatError(SAUError, ValueError):
    """A data file that cannot be read: names the file and, where known, the line."""


class ModelLoadError(SAUError, OSError):
    """A model directory that cannot be loaded: names the directory and what is missing."""


class RunFailedError(SAUError):
    """A run that went through but produced nothing usable (e.g. every loss NaN): exit 1."""

    exit_code = 1
