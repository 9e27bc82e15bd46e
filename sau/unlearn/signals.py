"""Stop a long loop cleanly on SIGINT / SIGTERM: a flag checked at step boundaries."""

from __future__ import annotations

import contextlib
import signal
import threading

__all__ = ["stop_on_signals"]


class _StopFlag:
    requested = False


@contextlib.contextmanager
def stop_on_signals(signals=(signal.SIGINT, signal.SIGTERM)):
    """Context manager yielding a flag whose ``.requested`` turns True on SIGINT/SIGTERM.

    The first signal only sets the flag (the loop stops at the next step boundary, after
    a checkpoint); a second SIGINT raises KeyboardInterrupt at once. Outside the main
    thread signal handlers cannot be installed and the flag simply never flips.
    """
    flag = _StopFlag()
    if threading.current_thread() is not threading.main_thread():
        yield flag
        return

    def handler(signum, frame):
        if flag.requested and signum == signal.SIGINT:
            raise KeyboardInterrupt
        flag.requested = True

    old = {s: signal.signal(s, handler) for s in signals}
    try:
        yield flag
    finally:
        for s, h in old.items():
            signal.signal(s, h)
