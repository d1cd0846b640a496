"""``systemd-analyze verify`` accepts the unit files shipped in ``workers/``.

A unit with a typo fails only when an operator installs it, so this test runs
systemd's own checker on every ``*.service`` and ``*.target`` in ``workers/``.
It needs no running systemd (PID 1 may be anything, as in a container) and no
privileges.

Two things differ from a production host, and the test handles them openly:

* ``verify`` requires each ``ExecStart=`` binary to exist and be executable.
  The units run ``/usr/local/bin/goclaw``; the test copies them to a temporary
  directory and rewrites only that path to the ``goclaw`` entry point of the
  running interpreter's environment. Everything else is verified as shipped.
* A template (``goclaw-worker@.service``) is verified through an instance:
  it is copied to ``goclaw-worker@default.service``, the instance that
  ``goclaw.target`` wants, so ``%i`` is expanded as it will be in production.

``verify`` exits 0 on many mistakes (unknown keys, unparsable values) and only
prints a warning, so the check fails on a non-zero exit status *or* on any
output line that mentions a unit or the temporary directory. The log level and
target are pinned so that such warnings always reach stderr. The negative
tests break copies of the units on purpose and prove that the check notices.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

WORKERS = Path(__file__).resolve().parents[2] / "workers"
UNIT_SUFFIXES = (".service", ".target")
SHIPPED_BINARY = "/usr/local/bin/goclaw"
EXEC_START = re.compile(r"^(ExecStart=)" + re.escape(SHIPPED_BINARY) + r"(?=\s)", re.MULTILINE)
SYSTEMD_ANALYZE = shutil.which("systemd-analyze") or (
    "/usr/bin/systemd-analyze" if os.access("/usr/bin/systemd-analyze", os.X_OK) else None
)
GOCLAW_BIN = Path(sys.executable).parent / "goclaw"

pytestmark = [
    pytest.mark.skipif(SYSTEMD_ANALYZE is None, reason="systemd-analyze is not installed"),
    pytest.mark.skipif(
        not os.access(GOCLAW_BIN, os.X_OK),
        reason=f"goclaw entry point not installed at {GOCLAW_BIN} (pip install -e .)",
    ),
]


def shipped_units() -> list[Path]:
    return sorted(p for p in WORKERS.iterdir() if p.suffix in UNIT_SUFFIXES)


def stage_units(dest: Path) -> list[Path]:
    """Copy every unit to ``dest`` for verification; return the paths to pass to verify.

    Only the ``ExecStart=`` binary path changes. A template is written under
    its ``@default`` instance name instead of its own.
    """
    staged = []
    for unit in shipped_units():
        text = unit.read_text(encoding="utf-8")
        if unit.suffix == ".service":
            text, count = EXEC_START.subn(rf"\g<1>{GOCLAW_BIN}", text)
            assert count == 1, f"{unit.name}: expected one ExecStart={SHIPPED_BINARY} line"
        name = unit.name.replace("@.", "@default.")
        target = dest / name
        target.write_text(text, encoding="utf-8")
        staged.append(target)
    return staged


def verify(units: list[Path]) -> tuple[list[str], str]:
    """Run ``systemd-analyze verify``; return (problems, full output)."""
    assert SYSTEMD_ANALYZE is not None
    env = {
        **os.environ,
        "SYSTEMD_LOG_LEVEL": "info",  # warnings about a unit must never be filtered out
        "SYSTEMD_LOG_TARGET": "console",  # not the journal, even under a systemd service
        "SYSTEMD_LOG_COLOR": "0",
        "SYSTEMD_PAGER": "",
    }
    proc = subprocess.run(
        [
            SYSTEMD_ANALYZE,
            "verify",
            "--man=no",
            "--recursive-errors=no",
            *(str(u) for u in units),
        ],
        capture_output=True,
        text=True,
        env=env,
        timeout=30,
        check=False,
    )
    output = proc.stdout + proc.stderr
    directory = str(units[0].parent)
    # Every unit is named goclaw*; lines about other (host) units are not ours to judge.
    problems = [line for line in output.splitlines() if directory in line or "goclaw" in line]
    if proc.returncode != 0:
        problems.append(f"exit status {proc.returncode}")
    return problems, output


def test_units_exist() -> None:
    names = {p.name for p in shipped_units()}
    assert names == {
        "goclaw-worker@.service",
        "goclaw-gateway.service",
        "goclaw-scheduler.service",
        "goclaw.target",
    }


def test_systemd_analyze_verify_accepts_units(tmp_path: Path) -> None:
    units = stage_units(tmp_path)
    problems, output = verify(units)
    assert not problems, f"systemd-analyze verify reported problems:\n{output}"


@pytest.mark.parametrize(
    ("unit", "old", "new", "expected"),
    [
        ("goclaw-gateway.service", "Restart=always", "Restart=sometimes", "sometimes"),
        (
            "goclaw-scheduler.service",
            "RestartSec=2",
            "RestartSec=2\nBogusKey=1",
            "Unknown key",
        ),
        ("goclaw-worker@default.service", "KillSignal=SIGINT", "KillSignal=SIGFOO", "SIGFOO"),
        (
            "goclaw-worker@default.service",
            f"ExecStart={GOCLAW_BIN}",
            "ExecStart=/nonexistent/goclaw",
            "not executable",
        ),
    ],
    ids=["bad-restart-value", "unknown-key", "bad-signal-in-template", "missing-binary"],
)
def test_verify_catches_broken_unit(
    tmp_path: Path, unit: str, old: str, new: str, expected: str
) -> None:
    units = stage_units(tmp_path)
    path = tmp_path / unit
    text = path.read_text(encoding="utf-8")
    assert old in text
    path.write_text(text.replace(old, new, 1), encoding="utf-8")
    problems, output = verify(units)
    assert problems, f"a broken {unit} passed verification:\n{output}"
    assert any(expected in line for line in problems), output
