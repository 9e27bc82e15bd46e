"""Stop a long loop cleanly on SIGINT / SIGTERM: a flag checked at step boundaries.

The flag remembers which signal came, so whoever stops after the loop can exit as that
signal asks (status 128 + signum: 130 for SIGINT, 143 for SIGTERM) and name it.
"""

from __future__ import annotations

import contextlib
import signal
import threading

__all__ = ["Stopped", "last_stop_signal", "signal_name", "stop_on_signals", "stop_signal_of"]


class Stopped(KeyboardInterrupt):
    """A run stopped by a signal after its checkpoint; ``signum`` says which.

    A KeyboardInterrupt, so every cleanup that runs on Ctrl-C runs on it too. The
    conventional exit status is ``128 + signum``.
    """

    def __init__(self, signum: int = signal.SIGINT) -> None:
        super().__init__(signal_name(signum))
        self.signum = int(signum)


def signal_name(signum: int) -> str:
    """'SIGTERM' for 15; 'signal 99' for a number that names no signal."""
    try:
        return signal.Signals(signum).name
    except ValueError:
        return f"signal {signum}"


class _StopFlag:
    requested = False
    signum: int | None = None  # the first signal that requested the stop


_last: dict[str, int | None] = {"signum": None}


def last_stop_signal() -> int | None:
    """The signal that asked the latest `stop_on_signals` block of this process to stop,
    or None when it ran to its end unasked."""
    return _last["signum"]


def stop_signal_of(stop: KeyboardInterrupt) -> int:
    """The signal behind a KeyboardInterrupt: its own ``signum`` (`Stopped`), else the one
    that stopped the latest loop (a caller that re-raised a plain KeyboardInterrupt after
    the loop returned interrupted), else SIGINT (Ctrl-C outside any loop)."""
    signum = getattr(stop, "signum", None)
    if signum is None:
        signum = last_stop_signal()
    return int(signum) if signum is not None else int(signal.SIGINT)


@contextlib.contextmanager
def stop_on_signals(signals=(signal.SIGINT, signal.SIGTERM)):
    """Context manager yielding a flag whose ``.requested`` turns True on SIGINT/SIGTERM.

    ``.signum`` holds the first such signal (also `last_stop_signal()` afterwards). The
    first signal only sets the flag (the loop stops at the next step boundary, after a
    checkpoint); a second SIGINT raises `Stopped` (a KeyboardInterrupt) at once. Outside
    the main thread signal handlers cannot be installed and the flag simply never flips.
    """
    flag = _StopFlag()
    _last["signum"] = None
    if threading.current_thread() is not threading.main_thread():
        yield flag
        return

    def handler(signum, frame):
        if flag.requested and signum == signal.SIGINT:
            raise Stopped(signum)
        if not flag.requested:
            flag.signum = _last["signum"] = int(signum)
        flag.requested = True

    old = {s: signal.signal(s, handler) for s in signals}
    try:
        yield flag
    finally:
        for s, h in old.items():
            signal.signal(s, h)
