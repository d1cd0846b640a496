"""exec: run a shell command in the workspace, bounded in time, output and reach.

The command runs as ``/bin/sh -c`` forked straight from the worker (no helper
process in between, so ``$PPID`` is the worker), in a session of its own so
that its whole process group can be killed. It sees a minimal environment:
the worker's holds provider API keys.

The command is over when ``/bin/sh`` exits. Whatever it left running in its
process group is then killed, because a process that outlives its tool call
outlives the task's lease too, and a retried task would start another one.
"""

from __future__ import annotations

import contextlib
import os
import selectors
import signal
import subprocess
import time
from typing import Any

from goclaw.agent.tools.base import Tool, ToolContext, ToolError

_PATH = "/usr/local/bin:/usr/bin:/bin"
_CHUNK = 64 * 1024
#: How often a quiet command is checked for having exited.
_POLL_SECONDS = 0.05
#: After /bin/sh exits, how long what it left behind may keep writing to its pipes.
_LINGER_SECONDS = 0.2


def exec_command(ctx: ToolContext, command: str) -> dict[str, Any]:
    """Run ``command``; a non-zero exit code is a result for the model, not an error."""
    limits = ctx.limits
    env = {"PATH": _PATH, "HOME": str(ctx.workspace), "LANG": "C.UTF-8"}
    try:
        proc = subprocess.Popen(
            ["/bin/sh", "-c", command],
            cwd=ctx.workspace,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            start_new_session=True,
        )
    except (OSError, ValueError) as exc:  # ValueError: a NUL byte in the command
        raise ToolError("exec_failed", f"could not start /bin/sh: {exc}") from exc
    output = _Output(limits.exec_output_bytes)
    deadline = time.monotonic() + limits.exec_timeout_seconds
    try:
        finished = _pump(proc, output, deadline) and _wait_exit(proc.pid, deadline)
    finally:
        # Kill before reaping: while /bin/sh is an unreaped zombie its pid, which is the
        # group's id, cannot be reused, so this cannot hit somebody else's processes.
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        for stream in (proc.stdout, proc.stderr):
            if stream is not None:
                stream.close()
    if not finished:
        raise ToolError(
            "timeout",
            f"command still running after {limits.exec_timeout_seconds:g}s; "
            "it and every process it started were killed",
        )
    return {
        "exit_code": proc.returncode,
        "stdout": output.text("stdout"),
        "stderr": output.text("stderr"),
        "truncated": output.truncated,
    }


class _Output:
    """stdout and stderr under one byte budget; what does not fit is read and dropped."""

    def __init__(self, limit: int) -> None:
        self.left = limit
        self.kept = {"stdout": bytearray(), "stderr": bytearray()}
        self.truncated = False

    def add(self, stream: str, chunk: bytes) -> None:
        keep = chunk[: self.left]
        self.kept[stream] += keep
        self.left -= len(keep)
        if len(keep) < len(chunk):
            self.truncated = True

    def text(self, stream: str) -> str:
        return self.kept[stream].decode("utf-8", errors="replace")


def _pump(proc: subprocess.Popen[bytes], output: _Output, deadline: float) -> bool:
    """Read both pipes until they close; False when the deadline passed first.

    Reading never stops at the output cap: a command blocked on a full pipe
    would never finish, and killing it at the cap would cut its work short.
    """
    assert proc.stdout is not None and proc.stderr is not None
    with selectors.DefaultSelector() as selector:
        selector.register(proc.stdout, selectors.EVENT_READ, "stdout")
        selector.register(proc.stderr, selectors.EVENT_READ, "stderr")
        exited_at: float | None = None
        while selector.get_map():
            now = time.monotonic()
            if now >= deadline:
                return False
            if exited_at is None and _exited(proc.pid):
                exited_at = now
            if exited_at is not None and now - exited_at >= _LINGER_SECONDS:
                return True  # a background process holds the pipes; the kill ends it
            for key, _ in selector.select(min(deadline - now, _POLL_SECONDS)):
                chunk = os.read(key.fd, _CHUNK)
                if chunk:
                    output.add(key.data, chunk)
                else:
                    selector.unregister(key.fileobj)
    return True


def _wait_exit(pid: int, deadline: float) -> bool:
    """Wait for /bin/sh to exit without reaping it; False at the deadline."""
    pause = 0.001  # the pipes close a moment before the exit: start with short naps
    while not _exited(pid):
        left = deadline - time.monotonic()
        if left <= 0:
            return False
        time.sleep(min(pause, left))
        pause = min(pause * 2, _POLL_SECONDS)
    return True


def _exited(pid: int) -> bool:
    try:
        return os.waitid(os.P_PID, pid, os.WEXITED | os.WNOHANG | os.WNOWAIT) is not None
    except ChildProcessError:  # reaped behind our back (SIGCHLD ignored): gone all the same
        return True


EXEC = Tool(
    name="exec",
    description=(
        "Run a shell command with /bin/sh -c in the workspace directory and return its "
        "exit code, stdout and stderr. A non-zero exit code is reported, not an error. "
        "There is no stdin and a minimal environment (PATH, HOME=workspace, LANG). The "
        "command is killed at the time limit (30 s by default), together with everything "
        "it started; processes it leaves in the background are killed when it exits. "
        "Output beyond the limit (64 KiB by default, stdout and stderr together) is "
        "dropped and the result is marked truncated."
    ),
    parameters={
        "type": "object",
        "properties": {
            "command": {
                "type": "string",
                "minLength": 1,
                "description": "The shell command line, e.g. 'ls -la && git status'.",
            }
        },
        "required": ["command"],
        "additionalProperties": False,
    },
    run=lambda ctx, arguments: exec_command(ctx, **arguments),
    side_effect=True,
    subject_argument="command",
)
