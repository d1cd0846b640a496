"""The policy test homes run under unless a test writes its own: every built-in tool,
the workspace, both ACP capabilities; no approvals, no hosts, public networks only."""

from __future__ import annotations

from pathlib import Path

OPEN_POLICY = """\
version: 1
allow: [tools.read_file, tools.write_file, tools.list_dir, tools.exec, tools.web_fetch,
        net.http, acp.read, acp.mutate]
paths: [.]
"""


def write_policy(home: Path, text: str = OPEN_POLICY) -> Path:
    path = home / "policy.yaml"
    path.write_text(text)
    return path
