"""What a server without API keys still checks: that a web page is not the caller.

Without keys, anything that can reach the port can spend the server's time.
Two browser tricks reach a server on a developer's laptop from any web page:

- a cross-site "simple" request (``text/plain`` or form body, no preflight)
  to http://127.0.0.1:8000/v1/...: so keyless POSTs must be
  ``application/json``, which a page can only send after a CORS preflight
  that spigot does not grant unless ``--cors-origin`` says so;
- DNS rebinding (a page's own host name re-pointed at 127.0.0.1): so a
  keyless server bound to loopback answers only loopback ``Host`` names.
"""

from __future__ import annotations

import ipaddress

from starlette.requests import Request

from spigot.errors import MisdirectedHost, UnsupportedMediaType


def _host_name(host: str) -> str:
    """The name part of a Host header: without its port, IPv6 brackets removed."""
    host = host.strip().lower()
    if host.startswith("["):
        return host[1:].partition("]")[0]
    return host.rpartition(":")[0] if host.count(":") == 1 else host


def is_loopback_host(host: str) -> bool:
    name = _host_name(host)
    if name == "localhost" or name.endswith(".localhost"):
        return True
    try:
        return ipaddress.ip_address(name).is_loopback
    except ValueError:
        return False


def check_keyless(request: Request, *, loopback_only: bool) -> None:
    if loopback_only:
        host = request.headers.get("host")
        if host is not None and not is_loopback_host(host):
            raise MisdirectedHost(
                f"This server listens on loopback without API keys and answers only "
                f"loopback host names, not {host[:100]!r}. Use http://127.0.0.1 or "
                "http://localhost, or create an API key."
            )
    if request.method == "POST":
        media_type = request.headers.get("content-type", "").partition(";")[0].strip().lower()
        if media_type != "application/json":
            raise UnsupportedMediaType(
                "Request bodies must be JSON, sent with 'Content-Type: application/json'."
            )
