"""Error bodies in the shape OpenAI's API uses, for every HTTP route of the gateway.

One shape for all HTTP errors (auth, limits, the OpenAI-compatible API), so a
client written against OpenAI's SDK gets a typed exception, not a parse error.
"""

from __future__ import annotations

from aiohttp import web


def openai_error(
    status: int,
    message: str,
    type: str,
    *,
    code: str | None = None,
    param: str | None = None,
    headers: dict[str, str] | None = None,
) -> web.Response:
    """An error in the shape OpenAI's API (and so every OpenAI client) expects."""
    body = {"error": {"message": message, "type": type, "param": param, "code": code}}
    return web.json_response(body, status=status, headers=headers)
