"""Keeping a session inside the model's context window.

When a turn's request nears the window (``compact_at`` of it), or the
provider says it overflowed, the older messages are summarised by the model
and the summary stands in for them; the ``keep_recent_messages`` newest stay
word for word. The cut never separates an assistant's tool calls from their
results, which providers reject. If the summary call fails, the old
messages are dropped instead (truncation) and the summary says how many:
the turn goes on, with less memory rather than none.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable, Sequence
from typing import Any

from goclaw.agent.sessions import StoredMessage

SUMMARY_PROMPT = (
    "You maintain the memory of a conversation between a user and an assistant. "
    "Write a concise summary of the conversation below: the user's goals, facts and "
    "decisions established, results of tool calls that still matter, and open questions. "
    "Write it so the assistant can continue the conversation from it. Reply with the "
    "summary only."
)
#: Characters of one message given to the summariser (a huge tool result is cut, not sent whole).
MAX_MESSAGE_CHARS = 4000


@dataclasses.dataclass(frozen=True)
class Compaction:
    upto: int  # the last seq the summary stands in for
    summary: str
    method: str  # summary | truncation
    messages: int  # how many messages it replaced


def cut_point(messages: Sequence[StoredMessage], keep_recent: int) -> int | None:
    """Index of the first message to keep, or None when there is nothing to compact."""
    cut = len(messages) - keep_recent
    # A kept 'tool' message needs the assistant message that asked for it.
    while cut > 0 and messages[cut].role == "tool":
        cut -= 1
    return cut if cut > 0 else None


def compact(
    messages: Sequence[StoredMessage],
    *,
    previous_summary: str | None,
    keep_recent: int,
    summarise: Callable[[list[dict[str, Any]]], str],
) -> Compaction | None:
    """Plan and summarise; None when the history is already as short as it may get."""
    cut = cut_point(messages, keep_recent)
    if cut is None:
        return None
    old = list(messages[:cut])
    upto = old[-1].seq
    request = [
        {"role": "system", "content": SUMMARY_PROMPT},
        {"role": "user", "content": transcript(old, previous_summary)},
    ]
    try:
        summary = summarise(request).strip()
        if not summary:
            raise ValueError("the model returned an empty summary")
        method = "summary"
    except Exception:
        note = f"[{len(old)} earlier messages were dropped to fit the context window]"
        summary = f"{previous_summary}\n{note}" if previous_summary else note
        method = "truncation"
    return Compaction(upto, summary, method, len(old))


def transcript(messages: Sequence[StoredMessage], previous_summary: str | None) -> str:
    lines = []
    if previous_summary:
        lines.append(f"Summary of what came before:\n{previous_summary}\n")
    for stored in messages:
        message = stored.message
        content = message.get("content") or ""
        if message.get("tool_calls"):
            calls = ", ".join(
                f"{c['function']['name']}({c['function']['arguments']})"
                for c in message["tool_calls"]
            )
            content = f"{content} [called {calls}]".strip()
        if not isinstance(content, str):
            content = json.dumps(content)
        lines.append(f"{message.get('role')}: {content[:MAX_MESSAGE_CHARS]}")
    return "\n".join(lines)
