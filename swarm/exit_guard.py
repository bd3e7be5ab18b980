"""A last resort for leaving: end the process if shutting down takes too long.

py-libp2p runs some connection clean-up shielded from cancellation (a cancelled ``new_stream``
resets its stream shielded, for one); a clean-up write to a peer that stopped reading can then
wait forever, and with it a process that was told to stop. Legion aborts connections whose writes
stall (``averaging.wire.abort_connection``); this guard covers whatever is left.
"""

from __future__ import annotations

import logging
import os
import sys
import threading

log = logging.getLogger(__name__)


def exit_if_stuck(seconds: float, code: int = 0) -> None:
    """Exit with ``code`` ``seconds`` from now unless the process has ended by then."""

    def expire() -> None:
        log.warning("still shutting down after %.0f s; exiting anyway", seconds)
        for stream in (sys.stdout, sys.stderr):
            try:
                stream.flush()
            except Exception:  # a closed pipe must not stop the exit
                pass
        os._exit(code)

    timer = threading.Timer(seconds, expire)
    timer.daemon = True  # does not keep a process that ends normally alive
    timer.start()
