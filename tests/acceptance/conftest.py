"""Real ``goclaw`` processes against a real database, with leases short enough to test.

``Stack`` owns a GOCLAW_HOME, the environment every child process gets, a
broker the test reads through, and the worker processes it started (killed
at teardown, whatever the test did).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from goclaw.broker import Broker
from goclaw.config import load_config
from goclaw.doorbell import socket_dir_for
from goclaw.worker import open_broker
from tests.policy_support import write_policy

FAST_ENV = {
    "GOCLAW_BROKER__LEASE_SECONDS": "1.5",
    "GOCLAW_BROKER__HEARTBEAT_SECONDS": "0.3",
    "GOCLAW_BROKER__RETRY_BASE_SECONDS": "0.05",
    "GOCLAW_BROKER__RETRY_MAX_SECONDS": "0.2",
    "GOCLAW_BROKER__CANCEL_CHECK_SECONDS": "0.1",
    "GOCLAW_BROKER__IDLE_POLL_SECONDS": "1.0",
    # Most stacks never run an agent: spare each worker the model library's import.
    "GOCLAW_WORKER__PRELOAD_MODELS": "false",
}


class WorkerProcess:
    def __init__(self, proc: subprocess.Popen, log_path: Path) -> None:
        self.proc = proc
        self.log_path = log_path

    @property
    def pid(self) -> int:
        return self.proc.pid

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def alive(self) -> bool:
        return self.proc.poll() is None

    def kill(self) -> None:
        """SIGKILL: no cleanup, no final report, leases left to expire."""
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(10)

    def stop(self, sig: int = signal.SIGINT, timeout: float = 20) -> int:
        if self.alive():
            self.proc.send_signal(sig)
        return self.proc.wait(timeout)


AUTH_TOKEN = "acceptance-token-" + "x" * 16


class GatewayProcess(WorkerProcess):
    def __init__(self, proc: subprocess.Popen, log_path: Path, url: str) -> None:
        super().__init__(proc, log_path)
        self.url = url

    def healthy(self) -> bool:
        if not self.alive():
            raise AssertionError(f"the gateway exited\n{self.log()}")
        try:
            with urllib.request.urlopen(f"{self.url}/healthz", timeout=2) as response:
                return response.status == 200
        except OSError:
            return False


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class Stack:
    def __init__(self, tmp_path: Path, database_url: str, env: dict[str, str]) -> None:
        self.home = tmp_path / "home"
        self.home.mkdir(parents=True)
        write_policy(self.home)
        self.env = {
            **os.environ,
            **FAST_ENV,
            **env,
            "GOCLAW_HOME": str(self.home),
            "GOCLAW_DATABASE_URL": database_url,
        }
        self.config = load_config(self.home, env=self.env)
        self.broker: Broker = open_broker(self.config)
        self.workers: list[WorkerProcess] = []
        self.gateways: list[GatewayProcess] = []

    def _spawn(self, name: str, *args: str) -> WorkerProcess:
        """``goclaw ARGS`` in its own session, logging to HOME/NAME-N.log; killed with the
        stack."""
        log_path = self.home / f"{name}-{len(self.workers)}.log"
        with log_path.open("wb") as log_file:  # the child keeps its own descriptor
            proc = subprocess.Popen(
                [sys.executable, "-m", "goclaw.cli", *args],
                env=self.env,
                stdout=log_file,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        process = WorkerProcess(proc, log_path)
        self.workers.append(process)
        return process

    def worker(self, *args: str, concurrency: int = 4) -> WorkerProcess:
        worker = self._spawn("worker", "worker", "-c", str(concurrency), *args)
        proc = worker.proc
        wait_for(
            # Process workers register each forked child, under the parent's id.
            lambda: any(
                w.pid == proc.pid or f":{proc.pid}:" in w.id for w in self.broker.live_workers()
            ),
            timeout=20,
            what=lambda: f"worker {proc.pid} to register\n{worker.log()}",
        )
        return worker

    def scheduler(self, *args: str) -> WorkerProcess:
        """A ``goclaw scheduler`` process, once it has started (stopped with the stack)."""
        process = self._spawn("scheduler", "scheduler", *args)
        proc = process.proc
        wait_for(
            lambda: "scheduler started" in process.log() or not process.alive(),
            timeout=20,
            what=lambda: f"scheduler {proc.pid} to start\n{process.log()}",
        )
        assert process.alive(), process.log()
        return process

    def gateway(self, port: int = 0) -> GatewayProcess:
        """A ``goclaw gateway`` process on 127.0.0.1, answering /healthz (port 0: a free one)."""
        token = self.home / "auth.token"
        if not token.exists():
            token.write_text(AUTH_TOKEN)
        port = port or free_port()
        log_path = self.home / f"gateway-{port}-{len(self.gateways)}.log"
        with log_path.open("wb") as log_file:
            proc = subprocess.Popen(
                [sys.executable, "-m", "goclaw.cli", "gateway", "--port", str(port)],
                env=self.env,
                stdout=log_file,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        gateway = GatewayProcess(proc, log_path, f"http://127.0.0.1:{port}")
        self.workers.append(gateway)  # killed at teardown like the workers
        self.gateways.append(gateway)
        wait_for(
            gateway.healthy, timeout=20, what=lambda: f"the gateway to answer\n{gateway.log()}"
        )
        return gateway

    def cli(self, *args: str, check: bool = True) -> subprocess.CompletedProcess:
        result = subprocess.run(
            [sys.executable, "-m", "goclaw.cli", *args],
            env=self.env,
            capture_output=True,
            text=True,
            timeout=60,
        )
        if check and result.returncode != 0:
            raise AssertionError(
                f"goclaw {' '.join(args)} exited {result.returncode}\n{result.stderr}"
            )
        return result

    def cli_json(self, *args: str) -> Any:
        return json.loads(self.cli(*args, "--json").stdout)

    def wait_terminal(self, ids: list[int], timeout: float = 60) -> dict[int, Any]:
        def done() -> bool:
            counts = self.broker.db.fetchone(
                "SELECT COUNT(*) FROM tasks WHERE state IN "
                "('SUCCEEDED', 'FAILED', 'CANCELED', 'DEAD_LETTER')"
                f" AND id IN ({','.join('?' * len(ids))})",
                ids,
            )
            return counts[0] == len(ids)

        wait_for(done, timeout=timeout, what=lambda: f"tasks to end: {self.broker.counts()}")
        return {i: self.broker.get(i) for i in ids}

    def close(self) -> None:
        for worker in self.workers:
            if worker.alive():
                # The whole group: process workers fork children of their own.
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(worker.pid, signal.SIGKILL)
                worker.proc.wait(10)
        if self.broker.db.is_sqlite:  # killed workers leave their doorbell sockets
            shutil.rmtree(socket_dir_for(self.broker.db), ignore_errors=True)
        self.broker.close()


def wait_for(
    predicate: Callable[[], Any],
    *,
    timeout: float,
    what: Callable[[], str] | str = "condition",
    interval: float = 0.02,
) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            message = what() if callable(what) else what
            raise AssertionError(f"timed out after {timeout}s waiting for {message}")
        time.sleep(interval)


@pytest.fixture
def make_stack(tmp_path, database_url) -> Iterator[Callable[..., Stack]]:
    stacks: list[Stack] = []

    def make(**env: str) -> Stack:
        stack = Stack(tmp_path / f"s{len(stacks)}", database_url, env)
        stacks.append(stack)
        return stack

    yield make
    for stack in stacks:
        stack.close()


@pytest.fixture
def stack(make_stack) -> Stack:
    return make_stack()
