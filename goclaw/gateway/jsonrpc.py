"""JSON-RPC 2.0 framing for ACP: parse one text frame, build replies, name the errors.

One message per frame. A batch (a JSON array) is refused with ``-32600``:
ACP's ordering guarantees are per message, and a batch would let one frame
hold an unbounded amount of work. Requests carry an ``id`` and get exactly
one reply. A well-formed notification (no ``id``) never gets a reply, not
even an error for its params; a frame that is not a well-formed message at
all gets ``-32600`` with ``id: null``, as the spec's examples do.

Strings must be text a database can store: a lone UTF-16 surrogate
(``"\ud800"``) or NUL (``"\u0000"``) anywhere in a message is refused
(``-32600``), so no client can plant a value that later breaks another
client's replies or a PostgreSQL query. ``NaN`` and ``Infinity`` are not
JSON and are a parse error. Replies are ASCII-escaped JSON, valid whatever
was stored.

Error codes. The standard ones (-32700 … -32603) mean what the spec says.
goclaw's own live in -32000 … -32099 and carry machine-readable ``data``:

=======  ====================  ===================================================
code     name                  data
=======  ====================  ===================================================
-32001   not_found             ``{"what": "task"|"session"|"agent"|"subscription"}``
-32002   policy_denied         ``{"capability": ...}`` (the policy engine, issue 5)
-32003   queue_saturated       ``{"agent_id", "depth", "max", "retry_after"}``
-32004   replay_gap            ``{"cursor", "purged_upto"}``
-32005   version_mismatch      ``{"supported": [min, max]}``
-32006   hello_required        ``{}``: call ``system.hello`` first
-32007   frame_too_large       ``{"max_bytes"}``
-32008   rate_limited          ``{"retry_after"}``
-32009   conflict              ``{"state"}``: e.g. aborting a task that already ended
=======  ====================  ===================================================
"""

from __future__ import annotations

import dataclasses
import json
from typing import Any

from goclaw.gateway import client_json

PARSE_ERROR = -32700
INVALID_REQUEST = -32600
METHOD_NOT_FOUND = -32601
INVALID_PARAMS = -32602
INTERNAL_ERROR = -32603

NOT_FOUND = -32001
POLICY_DENIED = -32002
QUEUE_SATURATED = -32003
REPLAY_GAP = -32004
VERSION_MISMATCH = -32005
HELLO_REQUIRED = -32006
FRAME_TOO_LARGE = -32007
RATE_LIMITED = -32008
CONFLICT = -32009

ERROR_NAMES = {
    PARSE_ERROR: "parse_error",
    INVALID_REQUEST: "invalid_request",
    METHOD_NOT_FOUND: "method_not_found",
    INVALID_PARAMS: "invalid_params",
    INTERNAL_ERROR: "internal_error",
    NOT_FOUND: "not_found",
    POLICY_DENIED: "policy_denied",
    QUEUE_SATURATED: "queue_saturated",
    REPLAY_GAP: "replay_gap",
    VERSION_MISMATCH: "version_mismatch",
    HELLO_REQUIRED: "hello_required",
    FRAME_TOO_LARGE: "frame_too_large",
    RATE_LIMITED: "rate_limited",
    CONFLICT: "conflict",
}

Id = str | int | None


class RpcError(Exception):
    """An error reply; raise it from a method handler."""

    def __init__(self, code: int, message: str, data: Any = None) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.data = data

    def as_json(self) -> dict[str, Any]:
        error: dict[str, Any] = {"code": self.code, "message": self.message}
        data = {"name": ERROR_NAMES.get(self.code, "error")}
        if isinstance(self.data, dict):
            data.update(self.data)
        error["data"] = data
        return error


def invalid_params(message: str) -> RpcError:
    return RpcError(INVALID_PARAMS, message)


@dataclasses.dataclass(frozen=True)
class Message:
    """One parsed request (``is_notification`` when it has no id)."""

    method: str
    params: dict[str, Any]
    id: Id
    is_notification: bool


class BadMessage(Exception):
    """A frame that is not a valid request; ``id`` is what could be read of it (else None)."""

    def __init__(self, error: RpcError, id: Id = None, reply: bool = True) -> None:
        super().__init__(error.message)
        self.error = error
        self.id = id
        #: False for a malformed *notification*: the spec says it gets no reply.
        self.reply = reply


def parse(text: str) -> Message:
    """Parse one frame; raise ``BadMessage`` with the right code for anything else."""
    try:
        data = client_json.loads(text)
    except (ValueError, RecursionError) as exc:
        raise BadMessage(RpcError(PARSE_ERROR, f"not valid JSON: {exc}"[:200])) from None
    if isinstance(data, list):
        raise BadMessage(
            RpcError(INVALID_REQUEST, "batches are not supported: send one message per frame")
        )
    if not isinstance(data, dict):
        raise BadMessage(
            RpcError(INVALID_REQUEST, f"a message is a JSON object, not {type(data).__name__}")
        )
    has_id = "id" in data
    raw_id = data.get("id")
    id_ok = raw_id is None or (isinstance(raw_id, str | int) and not isinstance(raw_id, bool))
    msg_id: Id = raw_id if id_ok else None
    if not id_ok:
        raise BadMessage(RpcError(INVALID_REQUEST, "id must be a string, an integer or null"))
    if data.get("jsonrpc") != "2.0":
        raise BadMessage(RpcError(INVALID_REQUEST, 'jsonrpc must be "2.0"'), msg_id)
    method = data.get("method")
    if not isinstance(method, str) or not method:
        raise BadMessage(RpcError(INVALID_REQUEST, "method must be a non-empty string"), msg_id)
    extra = set(data) - {"jsonrpc", "method", "params", "id"}
    if extra:
        raise BadMessage(RpcError(INVALID_REQUEST, f"unknown member {sorted(extra)[0]!r}"), msg_id)
    if "\\u" in text and not client_json.storable(data):
        raise BadMessage(
            RpcError(INVALID_REQUEST, "strings must not contain NUL or unpaired UTF-16 surrogates"),
            msg_id,
        )
    params = data.get("params", {})
    if params is None:
        params = {}
    if isinstance(params, list):
        raise BadMessage(
            RpcError(INVALID_PARAMS, "params must be an object (by-name parameters)"),
            msg_id,
            has_id,
        )
    if not isinstance(params, dict):
        raise BadMessage(RpcError(INVALID_PARAMS, "params must be an object"), msg_id, has_id)
    return Message(method, params, msg_id, not has_id)


def dumps(value: Any) -> str:
    """ASCII-escaped: valid UTF-8 on the wire whatever a stored string holds."""
    return json.dumps(value, separators=(",", ":"), default=str)


def result(id: Id, value: Any) -> str:
    return dumps({"jsonrpc": "2.0", "id": id, "result": value})


def error(id: Id, err: RpcError) -> str:
    return dumps({"jsonrpc": "2.0", "id": id, "error": err.as_json()})


def notification(method: str, params: dict[str, Any]) -> str:
    return dumps({"jsonrpc": "2.0", "method": method, "params": params})
