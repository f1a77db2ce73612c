r"""A TLS-terminating reverse proxy that exposes only the SuperLink's Fleet API.

flwr 1.41 and 1.42 serve the Fleet API (``/v1/fleet/*``, what SuperNodes call), the
Control API (``/v1/control/*``, what ``flwr run``/``ls``/``stop``/``supernode register``
call), the Runtime API (``/v1/runtime/*``) and the OpenAPI UI (``/docs``,
``/openapi.json``) on one HTTPS port, and the open-source build authenticates no
user on the Control API.  The mitigation: bind the SuperLink to loopback on the
coordinator's machine and publish this proxy instead.  It decrypts each request
(it holds the SuperLink's certificate and key), forwards ``POST /v1/fleet/...`` to
the SuperLink over TLS (verifying it against the CA), and answers everything else
with ``403`` without contacting the SuperLink.  Filtering needs the request path, so
it must terminate TLS; a TCP-level filter cannot see the path.

The SuperNodes' request signatures (public key, timestamp, signature headers) pass
through unchanged; they sign a timestamp only, not the host or the body, so the
proxy does not break them.

Usage::

    python -m simulations.fleet_proxy --listen 0.0.0.0:9443 \\
        --upstream 127.0.0.1:18000 --certfile server.pem --keyfile server.key \\
        --ca ca.crt
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

Scope = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[MutableMapping[str, Any]]]
Send = Callable[[MutableMapping[str, Any]], Awaitable[None]]

ALLOWED_PREFIX = "/v1/fleet/"
ALLOWED_METHODS = frozenset({"POST"})
# hop-by-hop headers (RFC 9110 7.6.1) and the ones httpx recomputes
_DROP = frozenset(
    {
        "connection",
        "keep-alive",
        "proxy-authenticate",
        "proxy-authorization",
        "te",
        "trailer",
        "transfer-encoding",
        "upgrade",
        "host",
        "content-length",
        "accept-encoding",
    }
)

log = logging.getLogger("fed_unlearn.fleet_proxy")


def is_allowed(method: str, path: str) -> bool:
    """Whether the proxy forwards ``METHOD path`` (only Fleet API calls)."""
    # no "..", no percent-encoding tricks: Fleet paths are plain ASCII words
    return (
        method.upper() in ALLOWED_METHODS
        and path.startswith(ALLOWED_PREFIX)
        and ".." not in path
        and "%" not in path
        and "//" not in path
    )


class FleetOnlyProxy:
    """ASGI app: forward Fleet API calls to ``upstream``, refuse the rest (403).

    Parameters
    ----------
    upstream : str
        ``https://host:port`` of the SuperLink.
    ca : str
        CA certificate that signed the SuperLink's certificate.
    timeout : float
        Seconds allowed per upstream request.
    """

    def __init__(self, upstream: str, ca: str, timeout: float = 120.0) -> None:
        self.upstream = upstream.rstrip("/")
        self.ca = ca
        self.timeout = timeout
        self._client: Any = None
        self.refused = 0
        self.forwarded = 0

    def _http(self) -> Any:
        if self._client is None:
            import ssl

            import httpx

            self._client = httpx.AsyncClient(
                verify=ssl.create_default_context(cafile=self.ca),
                timeout=self.timeout,
                follow_redirects=False,
            )
        return self._client

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        """Serve one ASGI connection scope (lifespan or HTTP request)."""
        if scope["type"] == "lifespan":
            while True:
                msg = await receive()
                if msg["type"] == "lifespan.startup":
                    await send({"type": "lifespan.startup.complete"})
                elif msg["type"] == "lifespan.shutdown":
                    if self._client is not None:
                        await self._client.aclose()
                    await send({"type": "lifespan.shutdown.complete"})
                    return
        if scope["type"] != "http":  # websockets etc.
            return
        method = scope["method"]
        path = (scope.get("raw_path") or scope["path"].encode()).decode("latin-1")
        query = scope.get("query_string", b"").decode("latin-1")
        client = scope.get("client") or ("?", 0)
        if not is_allowed(method, path):
            self.refused += 1
            log.warning("refused %s %s from %s:%s", method, path, *client)
            body = json.dumps(
                {"detail": f"{method} {path} is not exposed (Fleet API only)"}
            ).encode()
            await send(
                {
                    "type": "http.response.start",
                    "status": 403,
                    "headers": [
                        (b"content-type", b"application/json"),
                        (b"content-length", str(len(body)).encode()),
                    ],
                }
            )
            await send({"type": "http.response.body", "body": body})
            return
        chunks = []
        more = True
        while more:
            msg = await receive()
            chunks.append(msg.get("body", b""))
            more = msg.get("more_body", False)
        headers = [
            (k.decode("latin-1"), v.decode("latin-1"))
            for k, v in scope["headers"]
            if k.decode("latin-1").lower() not in _DROP
        ]
        try:
            resp = await self._http().request(
                method,
                self.upstream + path + (f"?{query}" if query else ""),
                content=b"".join(chunks),
                headers=headers,
            )
        except Exception as exc:  # noqa: BLE001 - answered as 502 and logged
            log.error("upstream %s failed for %s: %s", self.upstream, path, exc)
            body = json.dumps({"detail": "SuperLink unreachable"}).encode()
            await send(
                {
                    "type": "http.response.start",
                    "status": 502,
                    "headers": [(b"content-type", b"application/json")],
                }
            )
            await send({"type": "http.response.body", "body": body})
            return
        self.forwarded += 1
        out_headers = [
            (k.encode("latin-1"), v.encode("latin-1"))
            for k, v in resp.headers.items()
            if k.lower() not in _DROP and k.lower() != "content-encoding"
        ]
        out_headers.append((b"content-length", str(len(resp.content)).encode()))
        await send(
            {
                "type": "http.response.start",
                "status": resp.status_code,
                "headers": out_headers,
            }
        )
        await send({"type": "http.response.body", "body": resp.content})


def serve(listen: str, upstream: str, certfile: str, keyfile: str, ca: str) -> None:
    """Run the proxy until SIGINT/SIGTERM.

    Parameters
    ----------
    listen : str
        ``host:port`` to listen on (e.g. ``0.0.0.0:9443``).
    upstream : str
        ``host:port`` of the SuperLink (e.g. ``127.0.0.1:18000``).
    certfile, keyfile : str
        Certificate and key the proxy presents (the SuperLink's: SuperNodes verify
        it against the same CA).
    ca : str
        CA certificate used to verify the SuperLink.
    """
    import uvicorn

    host, _, port = listen.rpartition(":")
    app = FleetOnlyProxy(f"https://{upstream}", ca)
    uvicorn.run(
        app,
        host=host.strip("[]") or "127.0.0.1",
        port=int(port),
        ssl_certfile=certfile,
        ssl_keyfile=keyfile,
        log_level="info",
        access_log=False,  # refusals are logged; forwarded calls are counted
        lifespan="on",
    )


def main(argv: list[str] | None = None) -> int:
    """Command-line entry point (see the module docstring)."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--listen", required=True, help="host:port to listen on")
    ap.add_argument("--upstream", required=True, help="SuperLink host:port")
    ap.add_argument("--certfile", required=True)
    ap.add_argument("--keyfile", required=True)
    ap.add_argument("--ca", required=True, help="CA that signed the SuperLink cert")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    serve(args.listen, args.upstream, args.certfile, args.keyfile, args.ca)
    return 0


if __name__ == "__main__":
    sys.exit(main())
