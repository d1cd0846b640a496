"""web_fetch: GET one http(s) URL, bounded in time and size, with redirects checked hop by hop.

Built on ``http.client`` rather than ``urllib.request`` so that each redirect is
followed here, where every hop passes the outbound check, and so that the
connection's socket is at hand for the total deadline. Proxies from the
worker's environment are not used: the check must judge the real destination.

Each hop's host is resolved once, by the SSRF guard (``netguard``), and the
connection goes to an address the guard passed (DNS pinning), while the Host
header, TLS SNI and certificate check keep the name from the URL.
"""

from __future__ import annotations

import codecs
import contextlib
import functools
import http.client
import socket
import ssl
import threading
import time
import urllib.parse
from typing import Any

from goclaw.agent.tools.base import Tool, ToolContext, ToolError
from goclaw.agent.tools.netguard import IP, resolve_and_check

MAX_REDIRECTS = 5
_REDIRECTS = frozenset({301, 302, 303, 307, 308})
_CHUNK = 64 * 1024
_HEADERS = {
    "User-Agent": "goclaw-web-fetch/0.1",
    "Accept": "*/*",
    "Accept-Encoding": "identity",
    "Connection": "close",
}
_TEXT_TYPES = frozenset(
    {
        "application/json",
        "application/xml",
        "application/javascript",
        "application/ecmascript",
        "application/x-javascript",
        "application/x-ndjson",
        "application/x-www-form-urlencoded",
        "application/yaml",
        "application/x-yaml",
        "application/toml",
    }
)
#: Characters left as they are when a URL's path and query are re-quoted.
_URL_SAFE = "/?&=%:@!$'()*+,;[]~-._"


def web_fetch(ctx: ToolContext, url: str) -> dict[str, Any]:
    """Fetch ``url``; an HTTP error status is a result for the model, not an error."""
    limits = ctx.limits
    deadline = time.monotonic() + limits.fetch_timeout_seconds
    current = url
    for _ in range(MAX_REDIRECTS + 1):
        parts = _parse(current)
        addresses = _check_outbound(ctx, current, parts)
        with _Exchange(parts, deadline, addresses) as exchange:
            response = exchange.response
            location = response.getheader("Location")
            if response.status in _REDIRECTS and location:
                current = urllib.parse.urljoin(current, location.strip())
                continue
            return _result(exchange, current, limits.fetch_max_bytes)
    raise ToolError("fetch_failed", f"{url}: more than {MAX_REDIRECTS} redirects")


def _check_outbound(ctx: ToolContext, url: str, parts: urllib.parse.SplitResult) -> list[IP]:
    """The one place every request (each redirect hop too) is judged before it is sent.

    First the policy's verdict on the URL, then the SSRF guard on every address the
    host resolves to. Answers those addresses: the only ones the request may use.
    """
    ctx.policy.check(ctx, "net.http", url)
    assert parts.hostname is not None  # _parse saw to it
    try:
        return resolve_and_check(
            parts.hostname,
            _port(parts),
            resolver=ctx.resolver,
            allowed_networks=ctx.policy.allowed_networks(ctx),
        )
    except ToolError as exc:
        ctx.policy.refused(ctx, "net.http", url, f"{exc.code}: {exc.message}")
        raise


def _port(parts: urllib.parse.SplitResult) -> int:
    return parts.port or (443 if parts.scheme == "https" else 80)


def _parse(url: str) -> urllib.parse.SplitResult:
    try:
        parts = urllib.parse.urlsplit(url)
        parts.port  # noqa: B018 - raises ValueError for a port that is not a number
    except ValueError as exc:
        raise ToolError("bad_url", f"{url}: {exc}") from exc
    if parts.scheme not in ("http", "https"):
        raise ToolError("bad_url", f"{url}: only http and https URLs can be fetched")
    if not parts.hostname:
        raise ToolError("bad_url", f"{url}: no host")
    return parts


class _Exchange:
    """One request and its response, with a watchdog that enforces the total deadline.

    Socket timeouts bound each read, not the sum: a server that sends a byte
    just before every timeout would hold the worker for ever. At the deadline
    the watchdog shuts the socket down, which wakes any blocked read.
    """

    def __init__(
        self, parts: urllib.parse.SplitResult, deadline: float, addresses: list[IP]
    ) -> None:
        self.parts = parts
        self.deadline = deadline
        self.addresses = addresses
        self.fired = threading.Event()
        self.conn: http.client.HTTPConnection | None = None
        #: Kept apart from the connection, which lets go of it once the headers are in.
        self.sock: socket.socket | None = None
        self._response: http.client.HTTPResponse | None = None
        self.watchdog: threading.Timer | None = None

    def __enter__(self) -> _Exchange:
        try:
            self._open()
        except BaseException as exc:
            self.__exit__(type(exc), exc, exc.__traceback__)
            raise
        return self

    def __exit__(self, *exc_info: object) -> None:
        if self.watchdog is not None:
            self.watchdog.cancel()
        if self._response is not None:
            self._response.close()  # the socket stays open while the response holds it
        if self.conn is not None:
            self.conn.close()

    def _open(self) -> None:
        parts = self.parts
        timeout = self.remaining()
        # An explicit port: http.client would read the last group of a bare IPv6 host as one.
        if parts.scheme == "https":
            self.conn = _PinnedHTTPSConnection(
                parts.hostname, _port(parts), self.addresses, timeout=timeout, context=_tls()
            )
        else:
            self.conn = _PinnedHTTPConnection(
                parts.hostname, _port(parts), self.addresses, timeout=timeout
            )
        self.watchdog = threading.Timer(timeout, self._abort)
        self.watchdog.daemon = True
        self.watchdog.start()
        target = urllib.parse.quote(parts.path or "/", safe=_URL_SAFE)
        if parts.query:
            target += "?" + urllib.parse.quote(parts.query, safe=_URL_SAFE)
        try:
            self.conn.connect()
            self.sock = self.conn.sock
            if self.fired.is_set():  # fired during the connect, before there was a socket
                raise TimeoutError
            self.conn.request("GET", target, headers=_HEADERS)
            self._response = self.conn.getresponse()
        except (OSError, http.client.HTTPException, ValueError) as exc:
            raise self.failure(exc) from exc

    @property
    def response(self) -> http.client.HTTPResponse:
        assert self._response is not None, "used outside its with block"
        return self._response

    def remaining(self) -> float:
        left = self.deadline - time.monotonic()
        if left <= 0:
            raise self.failure(TimeoutError())
        return left

    def read(self, limit: int) -> tuple[bytes, bool]:
        """Up to ``limit`` bytes of the body, and whether there was more."""
        body = bytearray()
        try:
            while len(body) <= limit:
                chunk = self.response.read1(min(_CHUNK, limit + 1 - len(body)))
                if not chunk:
                    break
                body += chunk
        except (OSError, http.client.HTTPException, ValueError) as exc:
            raise self.failure(exc) from exc
        if self.fired.is_set():  # the watchdog's shutdown looks like an end of body
            raise self.failure(TimeoutError())
        return bytes(body[:limit]), len(body) > limit

    def failure(self, exc: BaseException) -> ToolError:
        url = urllib.parse.urlunsplit(self.parts)
        if self.fired.is_set() or isinstance(exc, TimeoutError):
            return ToolError("timeout", f"{url}: no complete response in time")
        return ToolError("fetch_failed", f"{url}: {type(exc).__name__}: {exc}")

    def _abort(self) -> None:
        self.fired.set()
        sock = self.sock
        if sock is not None:
            with contextlib.suppress(OSError):  # already closed
                # The plain socket's shutdown, under TLS too: it wakes a read blocked in
                # another thread without touching the TLS state that read is using.
                socket.socket.shutdown(sock, socket.SHUT_RDWR)


class _PinnedHTTPConnection(http.client.HTTPConnection):
    """Connects to the checked addresses, never to what the host name resolves to now.

    ``self.host`` stays the name from the URL, so the Host header names it.
    """

    def __init__(
        self, host: str, port: int, addresses: list[IP], *, timeout: float, **kwargs: Any
    ) -> None:
        super().__init__(host, port, timeout=timeout, **kwargs)
        self.addresses = list(addresses)

    def connect(self) -> None:
        self.sock = _connect_pinned(self.addresses, self.port, self.timeout)
        with contextlib.suppress(OSError):  # as http.client does; not every OS has it
            self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


class _PinnedHTTPSConnection(_PinnedHTTPConnection):
    """The same over TLS: SNI and the certificate's name check use the URL's host name."""

    default_port = http.client.HTTPS_PORT

    def __init__(
        self,
        host: str,
        port: int,
        addresses: list[IP],
        *,
        timeout: float,
        context: ssl.SSLContext,
    ) -> None:
        super().__init__(host, port, addresses, timeout=timeout)
        self.context = context

    def connect(self) -> None:
        super().connect()
        assert self.sock is not None
        self.sock = self.context.wrap_socket(self.sock, server_hostname=self.host)


def _connect_pinned(addresses: list[IP], port: int, timeout: float | None) -> socket.socket:
    """A TCP connection to the first of ``addresses`` that answers; no name lookup.

    ``timeout`` bounds all the attempts together, not each one.
    """
    ends = None if timeout is None else time.monotonic() + timeout
    last: OSError | None = None
    for ip in addresses:
        left = None if ends is None else ends - time.monotonic()
        if left is not None and left <= 0:
            raise TimeoutError("connect timed out")
        family = socket.AF_INET6 if ip.version == 6 else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM)
        try:
            sock.settimeout(left)
            sock.connect((str(ip), port))
        except OSError as exc:
            sock.close()
            last = exc
            continue
        sock.settimeout(timeout)  # each later read is bounded as http.client would
        return sock
    assert last is not None, "resolve_and_check answers at least one address"
    raise last


def _result(exchange: _Exchange, url: str, limit: int) -> dict[str, Any]:
    response = exchange.response
    headers = response.headers
    media_type = headers.get_content_type()  # text/plain when the header is missing
    if _is_text(media_type):
        body, truncated = exchange.read(limit)
        content = body.decode(_charset(headers.get_content_charset()), errors="replace")
    else:
        size = headers.get("Content-Length")
        size_note = f" of {size} bytes" if size and size.isdigit() else ""
        content = f"[{media_type} body{size_note} not shown: web_fetch returns text only]"
        truncated = False
    return {
        "url": url,
        "status": response.status,
        "content_type": headers.get("Content-Type", ""),
        "content": content,
        "truncated": truncated,
    }


def _is_text(media_type: str) -> bool:
    return (
        media_type.startswith("text/")
        or media_type in _TEXT_TYPES
        or media_type.endswith(("+json", "+xml"))
    )


def _charset(declared: str | None) -> str:
    if declared:
        try:
            return codecs.lookup(declared).name
        except LookupError:
            pass
    return "utf-8"


@functools.cache
def _tls() -> ssl.SSLContext:
    return ssl.create_default_context()


WEB_FETCH = Tool(
    name="web_fetch",
    description=(
        "Fetch a web page or text resource with HTTP GET and return its status, content "
        "type and text. Only http and https URLs; up to 5 redirects are followed. Bodies "
        "beyond the size limit (512 KiB by default) are cut and marked truncated; "
        "non-text content (images, archives, PDFs) is not returned, only noted. HTTP "
        "error statuses (404, 500) are returned as results."
    ),
    parameters={
        "type": "object",
        "properties": {
            "url": {
                "type": "string",
                "minLength": 1,
                "description": "The absolute http:// or https:// URL to fetch.",
            }
        },
        "required": ["url"],
        "additionalProperties": False,
    },
    run=lambda ctx, arguments: web_fetch(ctx, **arguments),
    subject_argument="url",
)
