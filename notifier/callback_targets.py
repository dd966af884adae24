"""Where a status callback may connect: its host resolved within CALLBACK_TIMEOUT, and never to an
address in CALLBACK_DENY_NETWORKS (cloud metadata, link-local, unspecified by default).

The check is made on the addresses the connection itself is made to, after resolving: a name that
resolves into a denied network is refused as the address would be, and there is no second lookup
between the check and the connection for a DNS answer to change."""

from __future__ import annotations

import re
import socket
from concurrent.futures import ThreadPoolExecutor
from contextlib import suppress
from functools import partial
from http.client import HTTPResponse
from ipaddress import IPv4Network, IPv6Network, ip_address
from urllib.parse import urlsplit
from urllib.request import HTTPHandler, HTTPSHandler

import idna

Networks = tuple[IPv4Network | IPv6Network, ...]


class DeniedTarget(Exception):
    """The host is, or resolves only to, addresses in a denied network: no attempt can pass."""


class SlowResolution(Exception):
    """Resolving the host took longer than the callback's timeout."""


def denied_network(address: str, deny: Networks) -> IPv4Network | IPv6Network | None:
    """The network of deny that address (an IP, an IPv6 one with its %zone too) is in, or None; an
    IPv4-mapped IPv6 address counts as the IPv4 one it carries."""
    ip = ip_address(address.partition("%")[0])
    candidates = [ip] if ip.version == 4 or ip.ipv4_mapped is None else [ip, ip.ipv4_mapped]
    return next((network for network in deny for one in candidates if one in network), None)


def literal_denied(url: str, deny: Networks) -> str | None:
    """Why url's host, when it is a literal IP address in a denied network, may not be posted to; None
    otherwise (a name is only known when it is resolved, at each attempt)."""
    host = resolver_host(urlsplit(url).hostname or "")
    if host is None:
        return None  # no name at all, which schemas.CallbackUrl refuses
    address = _ipv4_form(host) or host
    try:
        network = denied_network(address, deny)
    except ValueError:
        return None  # a name
    return None if network is None else _refusal(host, address, network)


def resolver_host(host: str) -> str | None:
    """host as the resolver is asked for it, and as the Host header carries it: beyond ASCII, the
    ToASCII of UTS 46 as browsers apply it (nontransitional mapping, then each label beyond ASCII as
    punycode, without IDNA 2008's stricter checks of what a label may hold: "my_host.тест" and
    "☃.net" work in browsers). Its mapping takes NFKC first, so "①⑥⑨.②⑤④.①⑥⑨.②⑤④" and
    "169。254。169。254" are 169.254.169.254. None when it has no such form (an empty label, one over
    63 characters, a character UTS 46 disallows). Not Python's own codec, IDNA 2003, which
    socket.getaddrinfo would apply to a host given beyond ASCII: it makes "faß.example"
    fass.example, another domain, whose owner would have the signed events."""
    if host.isascii():
        return host
    try:
        mapped = idna.uts46_remap(host, std3_rules=False, transitional=False)
        labels = [label if label.isascii() else "xn--" + label.encode("punycode").decode("ascii")
                  for label in mapped.split(".")]
    except (idna.IDNAError, UnicodeError):
        return None
    named = labels[:-1] if len(labels) > 1 and labels[-1] == "" else labels  # a trailing dot: the root
    if not all(1 <= len(label) <= 63 for label in named):
        return None
    return ".".join(labels)


def _ipv4_form(host: str) -> str | None:
    """The dotted address of a host the resolver reads as IPv4 though ipaddress does not: inet_aton's
    decimal (2852039166), octal (0251.0376.0251.0376), hex and short (169.254.43518) forms. The
    characters are checked first: inet_aton itself also takes "1.2.3.4 anything", which no resolver does."""
    if not _IPV4_CHARACTERS.fullmatch(host):
        return None
    try:
        return socket.inet_ntoa(socket.inet_aton(host))
    except OSError:
        return None


_IPV4_CHARACTERS = re.compile(r"[0-9a-fx.]+", re.IGNORECASE)


def handlers(deny: Networks, resolve_timeout: float,
             response_class: type[HTTPResponse] = HTTPResponse) -> tuple[HTTPHandler, HTTPSHandler]:
    """urllib's HTTP and HTTPS handlers whose connections resolve within resolve_timeout, refuse
    addresses in deny, and read their answers with response_class."""
    return (_HTTPHandler(deny, resolve_timeout, response_class),
            _HTTPSHandler(deny, resolve_timeout, response_class))


def _refusal(host: str, address: str, network) -> str:
    return (f"{host!r} is at {address}, in {network}, which callbacks may not reach (CALLBACK_DENY_NETWORKS)"
            if host != address else
            f"{address} is in {network}, which callbacks may not reach (CALLBACK_DENY_NETWORKS)")


def _resolve(host: str, port: int, timeout: float) -> list:
    # getaddrinfo has no timeout of its own, and a signal cannot interrupt it (glibc's resolver
    # retries its poll): a resolver that does not answer held the worker past CALLBACK_TIMEOUT and RQ's
    # limit alike. Asked in a thread and waited for at most timeout; a thread that is still asking
    # ends when the system resolver gives up (its own timeout and attempts, resolv.conf).
    pool = ThreadPoolExecutor(1, thread_name_prefix="callback-dns")
    try:
        return pool.submit(socket.getaddrinfo, host, port, 0, socket.SOCK_STREAM).result(timeout=timeout)
    except TimeoutError:  # the future's: getaddrinfo itself raises gaierror
        raise SlowResolution(f"resolving {host!r} took over {timeout:g} s") from None
    finally:
        pool.shutdown(wait=False)


def _connect(address: tuple[str, int], timeout: float, source_address=None, *, deny: Networks,
             resolve_timeout: float) -> socket.socket:
    """socket.create_connection, with the host resolved here (within resolve_timeout) and connected to
    only at addresses outside deny."""
    host, port = address
    allowed, refused = [], None
    for *_, sockaddr in _resolve(host, port, resolve_timeout):
        network = denied_network(sockaddr[0], deny)
        if network is None:
            allowed.append(sockaddr[0])
        elif refused is None:
            refused = _refusal(host, sockaddr[0], network)
    if not allowed:
        raise DeniedTarget(refused)
    # Each an address, not a name: create_connection resolves nothing more. The last one's error is raised.
    for ip in allowed[:-1]:
        with suppress(OSError):
            return socket.create_connection((ip, port), timeout, source_address)
    return socket.create_connection((allowed[-1], port), timeout, source_address)


class _Checked:
    """A urllib handler whose connections are made by _connect (http.client's own hook for it,
    _create_connection, set on each connection, whatever class and arguments urllib chose), and read
    their answers with response_class (its hook for that, as getresponse() documents)."""

    def __init__(self, deny: Networks, resolve_timeout: float, response_class: type[HTTPResponse], **kwargs):
        super().__init__(**kwargs)
        self._connect = partial(_connect, deny=deny, resolve_timeout=resolve_timeout)
        self._response_class = response_class

    def do_open(self, http_class, req, **http_conn_args):
        def checked(host, **kwargs):
            connection = http_class(host, **kwargs)
            connection._create_connection = self._connect
            connection.response_class = self._response_class
            return connection

        return super().do_open(checked, req, **http_conn_args)


class _HTTPHandler(_Checked, HTTPHandler):
    pass


class _HTTPSHandler(_Checked, HTTPSHandler):
    pass
