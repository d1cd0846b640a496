"""Noticing file edits without a thread: stamps, and a check run at most every so often.

``AgentCatalog`` (config.yaml, prompt files) and ``PolicyWatcher`` (policy.yaml)
both re-read their files when they change, from whatever thread asks for the
current snapshot. Asking must stay cheap (it happens once per task or tool
call), so the stat runs at most once per interval, and a thread that finds
another one already checking takes the snapshot as it is instead of waiting.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable
from pathlib import Path

#: What a file looked like at a check: (mtime_ns, ctime_ns, size, inode), or None when
#: absent. An editor that saves moves at least one of them.
Stamp = tuple[int, int, int, int] | None


def stamp(path: Path) -> Stamp:
    try:
        st = os.stat(path)
    except OSError:
        return None
    return (st.st_mtime_ns, st.st_ctime_ns, st.st_size, st.st_ino)


class ThrottledCheck:
    """Call ``check`` at most once per ``interval`` seconds, never two at once, never waiting."""

    def __init__(
        self,
        check: Callable[[], None],
        interval: float,
        *,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._check = check
        self._interval = interval
        self._clock = clock
        self._lock = threading.Lock()
        self._last = clock()

    def __call__(self) -> None:
        if self._clock() - self._last < self._interval:
            return
        if not self._lock.acquire(blocking=False):
            return  # another thread is checking: go on with what is there
        try:
            now = self._clock()
            if now - self._last >= self._interval:
                self._last = now
                self._check()
        finally:
            self._lock.release()
