"""Keep a set of named child processes running; stop them in order on request.

``goclaw up`` runs the whole stack (gateway, workers, later the scheduler) in
the foreground through a :class:`Supervisor`. The supervisor is deliberately
small: the children are plain commands (``ChildSpec``), it restarts any child
that exits while it is not stopping, and on SIGINT/SIGTERM/SIGHUP it sends
each child its own stop signal, waits out a grace period and SIGKILLs what is
left. It holds no state that matters: everything durable is in the database,
so a SIGKILL of the supervisor or of any child loses nothing.

Why children cannot outlive it, on Linux:

- Each child runs in its **own process group**. A Ctrl-C in the terminal then
  reaches only the supervisor, which sends every child exactly one signal of
  its choosing (a worker that got the terminal's SIGINT *and* ours would take
  the second as "hurry up"). A process group alone does not help when the
  supervisor itself is SIGKILLed, though: nobody is left to signal the group.
- So each child also asks the kernel for ``PR_SET_PDEATHSIG`` = SIGKILL
  (``prctl`` through ctypes, between fork and exec): when the supervisor dies,
  however it dies, the kernel kills its children. SIGKILL rather than a polite
  signal because nobody would be left to escalate if a child ignored it, and
  goclaw is built to be SIGKILLed anywhere (leases expire, the reaper requeues).
  The kernel sends it when the *thread* that forked the child ends, so children
  are only started from the thread that runs :meth:`Supervisor.run`, and that
  thread stops them all before it returns.

Elsewhere (no ``prctl``) children still get their own process group and a
graceful stop, but a SIGKILL of the supervisor leaves them running.
"""

from __future__ import annotations

import ctypes
import logging
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

log = logging.getLogger(__name__)

#: Signals that make the supervisor stop its children and exit. A second one
#: while stopping cuts the grace period short.
STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)

PR_SET_PDEATHSIG = 1


@dataclass(frozen=True)
class ChildSpec:
    """One supervised command. ``stop_signal`` is the signal that stops it in order."""

    name: str
    argv: tuple[str, ...]
    stop_signal: signal.Signals = signal.SIGTERM


@dataclass(frozen=True)
class Backoff:
    """How long to wait before restarting a child that exited.

    The delay doubles with each exit in a row, from ``initial`` up to
    ``maximum``, so a child that crashes at start-up costs a few processes a
    minute, not a core. A child that ran ``stable_seconds`` or longer before it
    exited starts again from ``initial``: one crash after a day's work is not a
    crash loop.
    """

    initial: float = 0.5
    maximum: float = 10.0
    stable_seconds: float = 30.0

    def delay(self, exits_in_a_row: int) -> float:
        """The wait before restarting a child after its ``exits_in_a_row``-th quick exit."""
        return min(self.maximum, self.initial * 2 ** max(0, exits_in_a_row - 1))


@dataclass
class _Child:
    spec: ChildSpec
    proc: subprocess.Popen | None = None
    started_at: float = 0.0
    restarts: int = 0
    exits_in_a_row: int = 0
    restart_at: float | None = None


@dataclass
class Supervisor:
    """Run ``specs`` until asked to stop; see the module docstring for the guarantees.

    ``run()`` must be called from the main thread (it installs signal handlers).
    ``env`` is the children's environment (default: this process's).
    """

    specs: Sequence[ChildSpec]
    grace_seconds: float = 20.0
    backoff: Backoff = field(default_factory=Backoff)
    env: Mapping[str, str] | None = None
    #: How often the loop looks for exited children and due restarts.
    tick_seconds: float = 0.05
    _children: list[_Child] = field(init=False, repr=False)
    _stop_requests: int = field(default=0, init=False, repr=False)

    def __post_init__(self) -> None:
        names = [spec.name for spec in self.specs]
        if len(set(names)) != len(names):
            raise ValueError(f"child names must be unique: {names}")
        self._children = [_Child(spec) for spec in self.specs]

    @property
    def stopping(self) -> bool:
        """True once a stop was requested: nothing will be started or restarted any more."""
        return self._stop_requests > 0

    def request_stop(self) -> None:
        """Begin an orderly stop (what SIGINT/SIGTERM do); a second request skips the grace."""
        self._stop_requests += 1

    def run(self) -> int:
        """Start every child and keep them running until a stop signal; then stop them.

        Returns 0 when every child exited within the grace period, 1 when some
        had to be SIGKILLed.
        """
        handlers = {sig: signal.signal(sig, self._on_signal) for sig in STOP_SIGNALS}
        try:
            for child in self._children:
                self._start(child)
            while not self._stop_requests:
                self._check(time.monotonic())
                time.sleep(self.tick_seconds)
            return self._stop_all()
        finally:
            for child in self._children:  # only after an error: _stop_all leaves none
                if child.proc is not None and child.proc.poll() is None:
                    child.proc.kill()
                    child.proc.wait()
            for sig, handler in handlers.items():
                signal.signal(sig, handler)

    # -- the loop ------------------------------------------------------------------

    def _on_signal(self, signum: int, frame: object) -> None:
        if not self._stop_requests:
            log.info(
                "%s: stopping every child (grace %gs)",
                signal.Signals(signum).name,
                self.grace_seconds,
            )
        self.request_stop()

    def _check(self, now: float) -> None:
        """Notice exited children and schedule their restart; start those that are due."""
        for child in self._children:
            if child.proc is not None:
                status = child.proc.poll()
                if status is None:
                    continue
                ran = now - child.started_at
                if ran >= self.backoff.stable_seconds:
                    child.exits_in_a_row = 0
                child.exits_in_a_row += 1
                child.restarts += 1
                delay = self.backoff.delay(child.exits_in_a_row)
                log.warning(
                    "%s (pid %d) %s after %.1fs; restart #%d in %.1fs",
                    child.spec.name,
                    child.proc.pid,
                    describe_exit(status),
                    ran,
                    child.restarts,
                    delay,
                )
                child.proc = None
                child.restart_at = now + delay
            elif child.restart_at is not None and now >= child.restart_at:
                self._start(child)

    def _start(self, child: _Child) -> None:
        child.restart_at = None
        try:
            child.proc = subprocess.Popen(
                child.spec.argv,
                env=None if self.env is None else dict(self.env),
                stdin=subprocess.DEVNULL,
                process_group=0,
                preexec_fn=die_with_parent_hook(),
            )
        except OSError as exc:  # e.g. the interpreter vanished: try again later, loudly
            child.exits_in_a_row += 1
            child.restarts += 1
            delay = self.backoff.delay(child.exits_in_a_row)
            log.error("%s could not start: %s; retry in %.1fs", child.spec.name, exc, delay)
            child.restart_at = time.monotonic() + delay
            return
        child.started_at = time.monotonic()
        if child.restarts:
            log.info(
                "restarted %s (pid %d, restart #%d)",
                child.spec.name,
                child.proc.pid,
                child.restarts,
            )
        else:
            log.info("started %s (pid %d)", child.spec.name, child.proc.pid)

    def _stop_all(self) -> int:
        """Stop signal to every running child, wait up to the grace period, SIGKILL the rest."""
        running = [c for c in self._children if c.proc is not None]
        for child in running:
            child.proc.send_signal(child.spec.stop_signal)  # a no-op if it already exited
        started = time.monotonic()
        deadline = started + self.grace_seconds
        while True:
            running = [c for c in running if not self._exited(c, started)]
            if not running or time.monotonic() >= deadline or self._stop_requests >= 2:
                break
            time.sleep(self.tick_seconds)
        why = "a second stop signal" if self._stop_requests >= 2 else "the grace period"
        for child in running:
            log.warning(
                "%s (pid %d) still running after %s: SIGKILL", child.spec.name, child.proc.pid, why
            )
            child.proc.kill()
            child.proc.wait()
        for child in self._children:
            child.proc = None
        log.info("stopped in %.1fs", time.monotonic() - started)
        return 1 if running else 0

    def _exited(self, child: _Child, since: float) -> bool:
        """Whether a stopping child has exited (logged once, when it is noticed)."""
        status = child.proc.poll()
        if status is None:
            return False
        log.info(
            "%s (pid %d) %s after %.1fs",
            child.spec.name,
            child.proc.pid,
            describe_exit(status),
            time.monotonic() - since,
        )
        return True


def describe_exit(status: int) -> str:
    """``Popen.returncode`` in words: "exited with status 1" or "was killed by SIGKILL"."""
    if status < 0:
        try:
            name = signal.Signals(-status).name
        except ValueError:
            name = f"signal {-status}"
        return f"was killed by {name}"
    return f"exited with status {status}"


def die_with_parent_hook() -> Callable[[], None] | None:
    """A ``preexec_fn`` that sets PR_SET_PDEATHSIG = SIGKILL, or None where Linux's prctl is absent.

    ``prctl`` is looked up here, in the parent, so the child only makes the
    call (nothing that could need a lock another thread held at fork time).
    If the parent died before the call took effect, the child kills itself.
    """
    if not sys.platform.startswith("linux"):
        return None
    try:
        prctl = ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):
        return None
    parent = os.getpid()
    sigkill = int(signal.SIGKILL)

    def die_with_parent() -> None:
        prctl(PR_SET_PDEATHSIG, sigkill)
        if os.getppid() != parent:
            os.kill(os.getpid(), sigkill)

    return die_with_parent


# -- the goclaw stack ---------------------------------------------------------------


def stack_specs(
    home: os.PathLike[str] | str,
    config_path: os.PathLike[str] | str | None = None,
    *,
    workers: int = 1,
    concurrency: int | None = None,
    host: str,
    port: int,
) -> list[ChildSpec]:
    """What ``goclaw up`` runs: a gateway, ``workers`` workers and the scheduler, each a
    ``goclaw`` process.

    Every child gets the same ``--home`` (and ``--config``) as ``goclaw up``, so
    they share one configuration and one database. Workers stop on SIGINT
    (running tasks finish and their outcomes are committed; SIGTERM would
    release them at once), the gateway on SIGTERM: the same signals the
    systemd units in ``workers/`` use.
    """
    base = (sys.executable, "-m", "goclaw.cli", "--home", os.fspath(home))
    if config_path is not None:
        base += ("--config", os.fspath(config_path))
    worker = ("worker",) if concurrency is None else ("worker", "--concurrency", str(concurrency))
    return [
        ChildSpec("gateway", (*base, "gateway", "--host", host, "--port", str(port))),
        *(
            ChildSpec(f"worker-{i}", (*base, *worker), stop_signal=signal.SIGINT)
            for i in range(1, workers + 1)
        ),
        ChildSpec("scheduler", (*base, "scheduler")),
    ]


__all__ = [
    "STOP_SIGNALS",
    "Backoff",
    "ChildSpec",
    "Supervisor",
    "describe_exit",
    "die_with_parent_hook",
    "stack_specs",
]
