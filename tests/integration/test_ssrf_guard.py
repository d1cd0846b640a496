"""The SSRF guard of web_fetch against real HTTP servers on loopback, with a test resolver.

Nothing leaves the machine: names like ``good.test`` exist only in ``FakeDNS``, so
a fetch of one that succeeds proves the connection went to the address the guard
checked, not to anything a real lookup could have answered.
"""

from __future__ import annotations

import http.server
import ipaddress
import shutil
import socket
import ssl
import subprocess
import threading
import time
from collections.abc import Iterator

import pytest

from goclaw.agent.tools import BUILTIN_TOOLS, ToolError, invoke, parse_arguments
from goclaw.agent.tools import web as web_module
from goclaw.agent.tools.netguard import category, resolve_and_check
from tests.tool_context import LOOPBACK, make_ctx

WEB_FETCH = BUILTIN_TOOLS["web_fetch"]


def fetch(ctx, url):
    return invoke(WEB_FETCH, ctx, parse_arguments(WEB_FETCH, {"url": url}))


def blocked(ctx, url) -> ToolError:
    with pytest.raises(ToolError) as caught:
        fetch(ctx, url)
    assert caught.value.code == "ssrf_blocked", caught.value
    return caught.value


class FakeDNS:
    """``socket.getaddrinfo`` for made-up names; each answer list is used once, the last kept."""

    def __init__(self, **answers: list[str] | list[list[str]]) -> None:
        self.answers = {
            name.replace("_", "."): value if isinstance(value[0], list) else [value]
            for name, value in answers.items()
        }
        self.calls: list[str] = []

    def __call__(self, host, port, *args, **kwargs):
        self.calls.append(host)
        queue = self.answers.get(host)
        if queue is None:
            raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")
        addresses = queue.pop(0) if len(queue) > 1 else queue[0]
        return [
            (
                socket.AF_INET6 if ":" in a else socket.AF_INET,
                socket.SOCK_STREAM,
                6,
                "",
                (a, port, 0, 0) if ":" in a else (a, port),
            )
            for a in addresses
        ]


class Handler(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        self.server.seen.append(
            {"path": self.path, "host": self.headers["Host"], "peer": self.client_address[0]}
        )
        if self.path.startswith("/redirect?to="):
            self.send_response(302)
            self.send_header("Location", self.path.partition("=")[2])
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        body = b"hello from loopback"
        self.send_response(200)
        self.send_header("Content-Type", "text/plain")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


class IPv6Server(http.server.ThreadingHTTPServer):
    address_family = socket.AF_INET6


def _serve(server: http.server.ThreadingHTTPServer) -> Iterator[http.server.ThreadingHTTPServer]:
    server.seen = []
    thread = threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    try:
        yield server
    finally:
        server.shutdown()
        server.server_close()
        thread.join(5)


@pytest.fixture
def server():
    yield from _serve(http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler))


@pytest.fixture
def port(server):
    return server.server_address[1]


# -- classification ----------------------------------------------------------


@pytest.mark.parametrize(
    ("address", "expected"),
    [
        ("127.0.0.1", "loopback"),
        ("127.8.9.10", "loopback"),
        ("::1", "loopback"),
        ("::ffff:127.0.0.1", "loopback"),  # IPv4-mapped: judged as the IPv4 address
        ("10.1.2.3", "private"),
        ("172.16.0.1", "private"),
        ("192.168.1.1", "private"),
        ("fc00::1", "private"),
        ("fd12:3456::1", "private"),
        ("::ffff:10.0.0.1", "private"),
        ("64:ff9b::a00:1", "private"),  # NAT64 of 10.0.0.1
        ("169.254.1.1", "link-local"),
        ("fe80::1", "link-local"),
        ("169.254.169.254", "cloud metadata"),
        ("::ffff:169.254.169.254", "cloud metadata"),
        ("fd00:ec2::254", "cloud metadata"),
        ("100.100.100.200", "cloud metadata"),
        ("100.64.0.1", "shared address space (carrier-grade NAT)"),
        ("224.0.0.1", "multicast"),
        ("ff02::1", "multicast"),
        ("0.0.0.0", "unspecified"),
        ("0.1.2.3", "unspecified"),
        ("::", "unspecified"),
        ("240.0.0.1", "reserved"),
        ("255.255.255.255", "reserved"),
        ("fec0::1", "site-local"),
        ("192.0.2.1", "special-purpose (not globally routable)"),
        ("2001:db8::1", "special-purpose (not globally routable)"),
        ("8.8.8.8", None),
        ("2606:4700:4700::1111", None),
    ],
)
def test_classification(address, expected):
    assert category(ipaddress.ip_address(address)) == expected


def test_every_resolved_address_is_checked_not_just_the_first():
    dns = FakeDNS(mixed_test=["93.184.216.34", "10.0.0.7"])
    with pytest.raises(ToolError) as caught:
        resolve_and_check("mixed.test", 80, resolver=dns)
    assert caught.value.code == "ssrf_blocked"
    assert caught.value.message.startswith("mixed.test resolves to 10.0.0.7: blocked, private")


def test_allowed_networks_let_exactly_those_addresses_through():
    dns = FakeDNS(lab_test=["10.0.0.7"])
    allowed = (ipaddress.ip_network("10.0.0.0/24"),)
    assert resolve_and_check("lab.test", 80, resolver=dns, allowed_networks=allowed) == [
        ipaddress.ip_address("10.0.0.7")
    ]
    with pytest.raises(ToolError):
        resolve_and_check("10.0.1.7", 80, allowed_networks=allowed)


def test_an_unknown_host_is_a_fetch_failure(tmp_path):
    with pytest.raises(ToolError) as caught:
        fetch(make_ctx(tmp_path, resolver=FakeDNS()), "http://nowhere.test/")
    assert caught.value.code == "fetch_failed" and "nowhere.test" in caught.value.message


# -- web_fetch is stopped ----------------------------------------------------


def test_loopback_literal_is_blocked(tmp_path, server, port):
    error = blocked(make_ctx(tmp_path), f"http://127.0.0.1:{port}/")
    assert error.message.startswith("127.0.0.1: blocked, loopback address")
    assert server.seen == []  # the server would have answered: only the guard stopped it


def test_ipv6_loopback_literal_is_blocked(tmp_path):
    try:
        six = IPv6Server(("::1", 0), Handler)
    except OSError as exc:
        pytest.skip(f"IPv6 loopback unavailable here: {exc}")
    for server in _serve(six):
        url = f"http://[::1]:{server.server_address[1]}/"
        assert "loopback" in blocked(make_ctx(tmp_path), url).message
        assert server.seen == []
        # The same server is reachable once the policy allows ::1: the refusal was the guard's.
        allowed = make_ctx(tmp_path, allowed_networks=[ipaddress.ip_network("::1/128")])
        assert fetch(allowed, url)["content"] == "hello from loopback"


def test_metadata_address_is_blocked_without_a_connection_attempt(tmp_path, monkeypatch):
    dns = FakeDNS()
    attempts = []
    monkeypatch.setattr(web_module, "_connect_pinned", lambda *args: attempts.append(args))
    started = time.monotonic()
    error = blocked(
        make_ctx(tmp_path, resolver=dns, fetch_timeout_seconds=10),
        "http://169.254.169.254/latest/meta-data/iam/security-credentials/",
    )
    assert time.monotonic() - started < 0.5
    assert "cloud metadata" in error.message and "169.254.169.254" in error.message
    assert attempts == [] and dns.calls == []  # a literal needs no lookup


def test_a_name_resolving_to_loopback_is_blocked(tmp_path, server, port):
    dns = FakeDNS(sneaky_test=["127.0.0.1"])
    error = blocked(make_ctx(tmp_path, resolver=dns), f"http://sneaky.test:{port}/")
    assert error.message.startswith("sneaky.test resolves to 127.0.0.1: blocked, loopback")
    assert server.seen == []


def test_a_name_with_one_public_and_one_private_address_is_blocked(tmp_path, server, port):
    dns = FakeDNS(split_test=["93.184.216.34", "127.0.0.1"])
    error = blocked(make_ctx(tmp_path, resolver=dns), f"http://split.test:{port}/")
    assert "127.0.0.1" in error.message
    assert server.seen == []


# -- DNS pinning -------------------------------------------------------------


def test_the_connection_goes_to_the_checked_address_with_the_original_host(tmp_path, server, port):
    dns = FakeDNS(good_test=["127.0.0.1"])
    ctx = make_ctx(tmp_path, resolver=dns, allowed_networks=LOOPBACK)
    result = fetch(ctx, f"http://good.test:{port}/page")
    assert (result["status"], result["content"]) == (200, "hello from loopback")
    # good.test exists only in FakeDNS: the socket went to its checked answer, 127.0.0.1,
    # and the request still named good.test.
    assert server.seen == [{"path": "/page", "host": f"good.test:{port}", "peer": "127.0.0.1"}]
    assert dns.calls == ["good.test"]


def test_a_rebinding_answer_cannot_move_the_connection(tmp_path, server, port):
    # First answer passes; every later one points at the metadata service.
    dns = FakeDNS(good_test=[["127.0.0.1"], ["169.254.169.254"]])
    ctx = make_ctx(tmp_path, resolver=dns, allowed_networks=LOOPBACK)
    assert fetch(ctx, f"http://good.test:{port}/")["content"] == "hello from loopback"
    assert dns.calls == ["good.test"]  # one lookup, checked and used: nothing to rebind
    assert server.seen[0]["peer"] == "127.0.0.1"


def test_a_rebinding_answer_on_the_next_hop_is_checked_again(tmp_path, server, port):
    dns = FakeDNS(good_test=[["127.0.0.1"], ["169.254.169.254"]])
    ctx = make_ctx(tmp_path, resolver=dns, allowed_networks=LOOPBACK)
    error = blocked(ctx, f"http://good.test:{port}/redirect?to=http://good.test:{port}/again")
    assert "good.test resolves to 169.254.169.254" in error.message
    assert dns.calls == ["good.test", "good.test"]
    assert [hit["path"] for hit in server.seen] == [f"/redirect?to=http://good.test:{port}/again"]


# -- redirects ---------------------------------------------------------------


@pytest.mark.parametrize(
    ("target", "needle"),
    [
        ("http://169.254.169.254/latest/meta-data/", "169.254.169.254: blocked, cloud metadata"),
        ("http://evil.test/", "evil.test resolves to 10.0.0.1: blocked, private"),
        ("http://[::ffff:127.0.0.2]/", "loopback"),  # outside the allowed 127.0.0.1/32
    ],
)
def test_an_allowed_host_redirecting_to_a_private_address_is_stopped(
    tmp_path, server, port, target, needle
):
    dns = FakeDNS(good_test=["127.0.0.1"], evil_test=["10.0.0.1"])
    ctx = make_ctx(tmp_path, resolver=dns, allowed_networks=LOOPBACK)
    error = blocked(ctx, f"http://good.test:{port}/redirect?to={target}")
    assert needle in error.message
    assert len(server.seen) == 1  # the first hop was served; the second never sent


def test_the_worker_keeps_serving_after_refusals(tmp_path, server, port):
    dns = FakeDNS(good_test=["127.0.0.1"], evil_test=["10.0.0.1"])
    ctx = make_ctx(tmp_path, resolver=dns, allowed_networks=LOOPBACK)
    blocked(ctx, "http://169.254.169.254/")
    blocked(ctx, "http://evil.test/")
    result = fetch(ctx, f"http://good.test:{port}/redirect?to=/landed")
    assert (result["url"], result["content"]) == (
        f"http://good.test:{port}/landed",
        "hello from loopback",
    )


# -- HTTPS: pinned address, original name for SNI and the certificate ----------


@pytest.fixture
def tls_server(tmp_path):
    if shutil.which("openssl") is None:
        pytest.skip("openssl is needed to make a test certificate")
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run(
        [
            *("openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1"),
            *("-subj", "/CN=good.test", "-addext", "subjectAltName=DNS:good.test"),
            *("-keyout", str(key), "-out", str(cert)),
        ],
        check=True,
        capture_output=True,
    )
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(cert, key)
    names: list[str | None] = []
    context.sni_callback = lambda sock, name, ctx: names.append(name)
    server.socket = context.wrap_socket(server.socket, server_side=True)
    server.sni = names
    server.cafile = cert
    yield from _serve(server)


def test_https_pins_the_address_and_checks_the_certificate_for_the_name(
    tmp_path, tls_server, monkeypatch
):
    client = ssl.create_default_context(cafile=str(tls_server.cafile))
    monkeypatch.setattr(web_module, "_tls", lambda: client)
    port = tls_server.server_address[1]
    dns = FakeDNS(good_test=["127.0.0.1"], other_test=["127.0.0.1"])
    ctx = make_ctx(tmp_path, resolver=dns, allowed_networks=LOOPBACK)

    assert fetch(ctx, f"https://good.test:{port}/")["content"] == "hello from loopback"
    assert tls_server.sni == ["good.test"]
    assert tls_server.seen[0]["host"] == f"good.test:{port}"

    # Same address, another name: the certificate is not for it, so TLS refuses.
    with pytest.raises(ToolError) as caught:
        fetch(ctx, f"https://other.test:{port}/")
    assert caught.value.code == "fetch_failed" and "CERTIFICATE_VERIFY_FAILED" in str(caught.value)
