"""Doorbells: wake idle workers when work becomes claimable, without polling.

A commit that makes work claimable rings; idle worker threads wait on their
process's listener. SQLite has no notification channel, so each worker
process binds a Unix datagram socket in a directory derived from the
database file, and a ring is one datagram to each socket there, sent after
the commit. PostgreSQL has LISTEN/NOTIFY, and ``pg_notify`` inside the
transaction is delivered exactly at commit.

A ring is a hint, not a message: losing one costs latency, never a task,
because waiting threads also wake at the next due time or the idle poll.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import socket
import tempfile
import threading
import uuid
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from goclaw.store.database import Database

log = logging.getLogger(__name__)

CHANNEL = "goclaw_tasks"
ANY_QUEUE = "*"
#: Not a queue: rung after a commit that wrote events a follower may be waiting for
#: (agent events, state changes of session-bound tasks), so the gateway's event pump
#: wakes at once instead of at its next poll.
EVENTS = "goclaw.events"


class Doorbell:
    """The ringing side, shared by everything that makes work claimable."""

    @staticmethod
    def for_database(db: Database) -> Doorbell:
        if db.is_sqlite:
            return SocketDoorbell(socket_dir_for(db))
        return NotifyDoorbell()

    def ring(self, db: Database, queue: str) -> None:  # pragma: no cover - interface
        raise NotImplementedError

    def listen(self, db: Database, queue: str, capacity: int) -> Listener:  # pragma: no cover
        raise NotImplementedError

    def close(self) -> None:
        """Release the ringing side's resources (a socket, on SQLite)."""


class Listener:
    """The waiting side, one per worker process.

    Rings become permits (at most ``capacity``, one per thread that could
    use one). A thread that claimed work passes a permit on, so a burst of N
    tasks wakes threads one after another instead of all at once for one task.
    """

    def __init__(self, queue: str, capacity: int) -> None:
        self.queue = queue
        self._capacity = max(capacity, 1)
        self._permits = 0
        self._cond = threading.Condition()
        self._closed = threading.Event()

    def wait(self, timeout: float) -> bool:
        """Block until rung or ``timeout``; True if a ring (permit) was taken."""
        with self._cond:
            if self._permits == 0 and not self._closed.is_set():
                self._cond.wait(max(timeout, 0.0))
            if self._permits > 0:
                self._permits -= 1
                return True
            return False

    def pass_on(self) -> None:
        self._release()

    def close(self) -> None:
        self._closed.set()
        with self._cond:
            self._cond.notify_all()

    def _on_ring(self, queue: str) -> None:
        if queue in (self.queue, ANY_QUEUE):
            self._release()

    def _release(self) -> None:
        with self._cond:
            if self._permits < self._capacity:
                self._permits += 1
                self._cond.notify()


# -- SQLite: Unix datagram sockets ---------------------------------------------


def socket_dir_for(db: Database) -> Path:
    """A short, private directory per database file (socket paths max out at 108 bytes)."""
    assert db.path is not None
    digest = hashlib.sha1(str(db.path.resolve()).encode()).hexdigest()[:16]
    base = os.environ.get("XDG_RUNTIME_DIR") or tempfile.gettempdir()
    return Path(base) / f"goclaw-{os.getuid()}" / digest


class SocketDoorbell(Doorbell):
    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self._sender: socket.socket | None = None
        self._lock = threading.Lock()

    def ring(self, db: Database, queue: str) -> None:
        db.after_commit(lambda: self.ring_now(queue))

    def ring_now(self, queue: str) -> None:
        try:
            names = os.listdir(self.directory)
        except FileNotFoundError:
            return
        data = queue.encode()
        sender = self._get_sender()
        for name in names:
            if not name.endswith(".sock"):
                continue
            path = str(self.directory / name)
            try:
                sender.sendto(data, path)
            except (ConnectionRefusedError, FileNotFoundError):
                # A worker that died without cleaning up: its socket is stale.
                with contextlib.suppress(OSError):
                    os.unlink(path)
            except (BlockingIOError, OSError):
                pass  # its buffer is full: it has been rung already

    def listen(self, db: Database, queue: str, capacity: int) -> Listener:
        return SocketListener(self.directory, queue, capacity)

    def close(self) -> None:
        with self._lock:
            if self._sender is not None:
                self._sender.close()
                self._sender = None

    def _get_sender(self) -> socket.socket:
        with self._lock:
            if self._sender is None or self._sender.fileno() < 0:
                self._sender = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
                self._sender.setblocking(False)
            return self._sender


class SocketListener(Listener):
    def __init__(self, directory: Path, queue: str, capacity: int) -> None:
        super().__init__(queue, capacity)
        directory.mkdir(mode=0o700, parents=True, exist_ok=True)
        self.path = directory / f"{uuid.uuid4().hex[:12]}.sock"
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self._sock.bind(str(self.path))
        self._sock.settimeout(0.5)
        self._thread = threading.Thread(target=self._run, name="goclaw-doorbell", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._closed.is_set():
            try:
                data = self._sock.recv(256)
            except TimeoutError:
                continue
            except OSError:
                return
            self._on_ring(data.decode(errors="replace"))

    def close(self) -> None:
        super().close()
        with contextlib.suppress(OSError):
            os.unlink(self.path)
        with contextlib.suppress(OSError):
            self.path.parent.rmdir()  # only succeeds for the last listener out
        self._sock.close()


# -- PostgreSQL: LISTEN/NOTIFY --------------------------------------------------


class NotifyDoorbell(Doorbell):
    def ring(self, db: Database, queue: str) -> None:
        db.execute("SELECT pg_notify(?, ?)", (CHANNEL, queue))

    def listen(self, db: Database, queue: str, capacity: int) -> Listener:
        return NotifyListener(db.url, queue, capacity)


class NotifyListener(Listener):
    def __init__(self, url: str, queue: str, capacity: int) -> None:
        super().__init__(queue, capacity)
        import psycopg

        self._conn = psycopg.connect(url, autocommit=True, connect_timeout=5)
        self._conn.execute(f"LISTEN {CHANNEL}")
        self._thread = threading.Thread(target=self._run, name="goclaw-listen", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._closed.is_set():
            try:
                for note in self._conn.notifies(timeout=0.5):
                    self._on_ring(note.payload)
            except Exception:
                if self._closed.is_set():
                    return
                log.warning("LISTEN connection failed; idle workers fall back to polling")
                self._closed.wait(1.0)

    def close(self) -> None:
        super().close()
        self._thread.join(timeout=2)
        with contextlib.suppress(Exception):
            self._conn.close()
