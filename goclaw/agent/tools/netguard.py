"""The SSRF guard: which addresses an outbound request may reach.

``resolve_and_check`` resolves a host once and judges every address it got;
the caller then connects to those very addresses (DNS pinning), so a resolver
that answers differently a moment later (DNS rebinding) changes nothing. Any
address that is not on the public internet is refused unless the policy lists
a network containing it in ``allowed_networks``.
"""

from __future__ import annotations

import ipaddress
import socket
from collections.abc import Callable, Collection, Sequence
from typing import Any

from goclaw.agent.tools.base import ToolError

IP = ipaddress.IPv4Address | ipaddress.IPv6Address
Network = ipaddress.IPv4Network | ipaddress.IPv6Network
#: Called like ``socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)``; answers its tuples.
Resolver = Callable[..., Sequence[tuple[Any, ...]]]

#: Instance metadata services: they hand out credentials to whoever asks from inside.
METADATA_ADDRESSES = frozenset(
    ipaddress.ip_address(a)
    for a in (
        "169.254.169.254",  # AWS, GCP, Azure, OpenStack, Oracle, DigitalOcean
        "fd00:ec2::254",  # AWS over IPv6
        "100.100.100.200",  # Alibaba Cloud
        "168.63.129.16",  # Azure WireServer (a public-looking address)
    )
)

_net = ipaddress.ip_network

#: (category, networks), judged in this order; the first that matches names the refusal.
_BLOCKED: tuple[tuple[str, tuple[Network, ...]], ...] = (
    ("unspecified", (_net("0.0.0.0/8"), _net("::/128"))),  # Linux sends 0.0.0.0 to itself
    ("loopback", (_net("127.0.0.0/8"), _net("::1/128"))),
    ("link-local", (_net("169.254.0.0/16"), _net("fe80::/10"))),
    ("shared address space (carrier-grade NAT)", (_net("100.64.0.0/10"),)),
    ("multicast", (_net("224.0.0.0/4"), _net("ff00::/8"))),
    (
        "private",
        (_net("10.0.0.0/8"), _net("172.16.0.0/12"), _net("192.168.0.0/16"), _net("fc00::/7")),
    ),
    ("site-local", (_net("fec0::/10"),)),
    ("reserved", (_net("240.0.0.0/4"),)),  # 255.255.255.255 (broadcast) included
)
_NAT64 = _net("64:ff9b::/96")


def category(ip: IP) -> str | None:
    """Why ``ip`` may not be reached, or None for a public address.

    An IPv6 address that carries an IPv4 one (IPv4-mapped ``::ffff:a.b.c.d``, NAT64,
    6to4) is judged by that IPv4 address too: ``::ffff:127.0.0.1`` is loopback.
    """
    for candidate in _candidates(ip):
        if candidate in METADATA_ADDRESSES:
            return "cloud metadata"
        for name, networks in _BLOCKED:
            if any(candidate in network for network in networks):
                return name
        # Whatever else is not globally routable: documentation, benchmarking, IETF ranges.
        if candidate.is_reserved:
            return "reserved"
        if not candidate.is_global:
            return "special-purpose (not globally routable)"
    return None


def resolve_and_check(
    host: str,
    port: int,
    *,
    resolver: Resolver | None = None,
    allowed_networks: Collection[Network] = (),
) -> list[IP]:
    """Every address ``host`` has, each one checked; connect only to these.

    An IP literal is judged as it is, without a lookup. Raises ToolError
    ``ssrf_blocked`` naming the host, the address and its category if any address
    is refused (one bad answer among good ones is enough: the connection could land
    on it), and ``fetch_failed`` if the host does not resolve.
    """
    literal = _literal(host)
    addresses = [literal] if literal is not None else _resolve(host, port, resolver)
    for ip in addresses:
        if _allowed(ip, allowed_networks):
            continue
        why = category(ip)
        if why is not None:
            shown = host if literal is not None else f"{host} resolves to {ip}"
            raise ToolError(
                "ssrf_blocked",
                f"{shown}: blocked, {why} address (not in a network the policy allows)",
            )
    return addresses


def _literal(host: str) -> IP | None:
    try:
        return ipaddress.ip_address(host.strip("[]"))
    except ValueError:
        return None


def _resolve(host: str, port: int, resolver: Resolver | None) -> list[IP]:
    lookup = resolver or socket.getaddrinfo
    try:
        answers = lookup(host, port, type=socket.SOCK_STREAM)
    except (OSError, UnicodeError) as exc:  # socket.gaierror is an OSError
        raise ToolError("fetch_failed", f"{host}: cannot resolve: {exc}") from exc
    addresses: list[IP] = []
    for answer in answers:
        sockaddr = answer[4]
        try:
            ip = ipaddress.ip_address(sockaddr[0])
        except ValueError as exc:
            raise ToolError(
                "ssrf_blocked", f"{host} resolves to {sockaddr[0]!r}, not an IP address"
            ) from exc
        if ip not in addresses:
            addresses.append(ip)
    if not addresses:
        raise ToolError("fetch_failed", f"{host}: cannot resolve: no addresses")
    return addresses


def _candidates(ip: IP) -> list[IP]:
    found: list[IP] = [ip]
    if isinstance(ip, ipaddress.IPv6Address):
        embedded = ip.ipv4_mapped or ip.sixtofour
        if embedded is None and ip in _NAT64:
            embedded = ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF)
        if embedded is not None:
            found.insert(0, embedded)  # name the refusal by the address that matters
    return found


def _allowed(ip: IP, allowed_networks: Collection[Network]) -> bool:
    # IPv4-mapped ``::ffff:127.0.0.1`` counts as 127.0.0.1 for the allowance too.
    return any(
        candidate in network
        for candidate in (ip, ip.ipv4_mapped if isinstance(ip, ipaddress.IPv6Address) else None)
        if candidate is not None
        for network in allowed_networks
    )
