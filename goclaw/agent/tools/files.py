"""read_file, write_file, list_dir: file access confined to the agent's workspace.

Every path is joined to the workspace and resolved, symlinks included, before
anything is opened; a result outside the resolved workspace is refused. So
``..``, an absolute path and a symlink (to a file or a directory, at any depth)
all fail the same way. What this does not stop is a process that swaps a
directory for a symlink between the check and the open; the last component is
opened with ``O_NOFOLLOW`` and writes rename over (never follow) the final name,
which leaves a swapped parent directory as the remaining race.
"""

from __future__ import annotations

import contextlib
import heapq
import os
import stat
import tempfile
from pathlib import Path
from typing import Any

from goclaw.agent.tools.base import Tool, ToolContext, ToolError

#: Mode of a file that write_file creates; an existing file keeps its own mode.
_NEW_FILE_MODE = 0o644


def confine(ctx: ToolContext, path: str, capability: str) -> tuple[Path, str]:
    """The resolved path, and how to show it to the model (relative to the workspace).

    The policy judged the path as written; this judges where it really leads
    (symlinks resolved). A refusal here is recorded with the policy's decisions.
    """
    if "\x00" in path:
        raise ToolError("invalid_arguments", "path: contains a NUL byte")
    root = ctx.workspace.resolve()
    try:
        target = (root / path).resolve(strict=False)
    except (OSError, RuntimeError) as exc:  # RuntimeError: a symlink loop
        raise ToolError("not_found", f"{path}: cannot be resolved ({exc})") from exc
    if not target.is_relative_to(root):
        raise _outside(ctx, capability, path, f"{path}: resolves outside the workspace")
    return target, target.relative_to(root).as_posix()


def _outside(ctx: ToolContext, capability: str, path: str, message: str) -> ToolError:
    ctx.policy.refused(ctx, capability, path, f"path_outside_workspace: {message}")
    return ToolError("path_outside_workspace", message)


def read_file(ctx: ToolContext, path: str) -> dict[str, Any]:
    """Read a whole text file; above ``read_max_bytes`` it is refused, not cut.

    A cut file read as if whole is a worse failure for a model than a refusal
    it can act on, and the result keeps one shape.
    """
    target, shown = confine(ctx, path, "tools.read_file")
    limit = ctx.limits.read_max_bytes
    flags = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC  # NONBLOCK: a FIFO
    try:
        fd = os.open(target, flags)
    except FileNotFoundError as exc:
        raise ToolError("not_found", f"{shown}: no such file") from exc
    except NotADirectoryError as exc:
        raise ToolError("not_found", f"{shown}: a parent is not a directory") from exc
    except OSError as exc:
        if _is_symlink(target):  # swapped for a symlink after the check
            raise _outside(ctx, "tools.read_file", path, f"{shown}: is now a symlink") from exc
        raise
    try:
        info = os.fstat(fd)
        if stat.S_ISDIR(info.st_mode):
            raise ToolError("is_a_directory", f"{shown}: is a directory (use list_dir)")
        if not stat.S_ISREG(info.st_mode):
            raise ToolError("invalid_arguments", f"{shown}: not a regular file")
        if info.st_size > limit:
            raise ToolError("too_large", f"{shown}: {info.st_size} bytes, the limit is {limit}")
        with os.fdopen(fd, "rb", closefd=False) as handle:
            data = handle.read(limit + 1)  # the size can lie (a growing file)
    finally:
        os.close(fd)
    if len(data) > limit:
        raise ToolError("too_large", f"{shown}: more than {limit} bytes")
    return {"path": shown, "content": data.decode("utf-8", errors="replace"), "bytes": len(data)}


def write_file(ctx: ToolContext, path: str, content: str) -> dict[str, Any]:
    """Replace a file's content atomically: readers see the old file or the new one.

    Parent directories are created. A file that is a symlink is written where
    the link resolves to, which must be inside the workspace.
    """
    try:
        data = content.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise ToolError("invalid_arguments", f"content: not valid Unicode ({exc.reason})") from exc
    limit = ctx.limits.write_max_bytes
    if len(data) > limit:
        raise ToolError("too_large", f"content: {len(data)} bytes, the limit is {limit}")
    target, shown = confine(ctx, path, "tools.write_file")
    if target.is_dir():
        raise ToolError("is_a_directory", f"{shown}: is a directory")
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
    except (FileExistsError, NotADirectoryError) as exc:
        raise ToolError("not_a_directory", f"{shown}: a parent is not a directory") from exc
    try:
        mode = stat.S_IMODE(os.stat(target, follow_symlinks=False).st_mode)
    except FileNotFoundError:
        mode = _NEW_FILE_MODE
    fd, temp = tempfile.mkstemp(dir=target.parent, prefix=".goclaw-", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.chmod(temp, mode)
        os.replace(temp, target)  # renames over the name itself; never follows a link
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(temp)
        raise
    return {"path": shown, "bytes": len(data)}


def list_dir(ctx: ToolContext, path: str = ".") -> dict[str, Any]:
    """The first ``list_max_entries`` entries by name, without reading a huge directory whole."""
    target, shown = confine(ctx, path, "tools.list_dir")
    limit = ctx.limits.list_max_entries
    try:
        with os.scandir(target) as scan:
            first = heapq.nsmallest(limit + 1, scan, key=lambda entry: entry.name)
    except FileNotFoundError as exc:
        raise ToolError("not_found", f"{shown}: no such directory") from exc
    except NotADirectoryError as exc:
        raise ToolError("not_a_directory", f"{shown}: is not a directory") from exc
    entries = [_entry(entry) for entry in first[:limit]]
    return {"path": shown, "entries": entries, "truncated": len(first) > limit}


def _entry(entry: os.DirEntry[str]) -> dict[str, Any]:
    kind, size = "other", None
    with contextlib.suppress(OSError):  # removed while listing: report what is known
        if entry.is_symlink():
            kind = "link"
        elif entry.is_dir(follow_symlinks=False):
            kind = "dir"
        elif entry.is_file(follow_symlinks=False):
            kind, size = "file", entry.stat(follow_symlinks=False).st_size
    return {"name": entry.name, "type": kind, "size": size}


def _is_symlink(path: Path) -> bool:
    try:
        return stat.S_ISLNK(os.lstat(path).st_mode)
    except OSError:
        return False


_PATH_HELP = "Path relative to the workspace (the working directory of exec)."

READ_FILE = Tool(
    name="read_file",
    description=(
        "Read a UTF-8 text file from the workspace and return its whole content. Files "
        "larger than the read limit (256 KiB by default) are refused with too_large; "
        "undecodable bytes appear as U+FFFD. Paths outside the workspace are refused."
    ),
    parameters={
        "type": "object",
        "properties": {"path": {"type": "string", "minLength": 1, "description": _PATH_HELP}},
        "required": ["path"],
        "additionalProperties": False,
    },
    run=lambda ctx, arguments: read_file(ctx, **arguments),
    subject_argument="path",
)

WRITE_FILE = Tool(
    name="write_file",
    description=(
        "Create or replace a file in the workspace with the given text (UTF-8), creating "
        "parent directories as needed. The whole file is replaced atomically; there is no "
        "append. Paths outside the workspace are refused."
    ),
    parameters={
        "type": "object",
        "properties": {
            "path": {"type": "string", "minLength": 1, "description": _PATH_HELP},
            "content": {"type": "string", "description": "The complete new content."},
        },
        "required": ["path", "content"],
        "additionalProperties": False,
    },
    run=lambda ctx, arguments: write_file(ctx, **arguments),
    side_effect=True,
    subject_argument="path",
)

LIST_DIR = Tool(
    name="list_dir",
    description=(
        "List a directory of the workspace, sorted by name: each entry's name, type "
        "(file, dir, link or other) and size in bytes (files only). Long listings are cut "
        "and marked truncated."
    ),
    parameters={
        "type": "object",
        "properties": {
            "path": {
                "type": "string",
                "minLength": 1,
                "default": ".",
                "description": _PATH_HELP + " Defaults to the workspace itself.",
            }
        },
        "additionalProperties": False,
    },
    run=lambda ctx, arguments: list_dir(ctx, **arguments),
    subject_argument="path",
)
