"""A throwaway local mTLS endpoint: requires a client certificate from a pinned set,
verifies a JWS body against given signature certificates, and echoes what it saw.

Used by ``make run``'s client walkthrough and by the client tests; the real gateway is
``twofold serve``.
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from typing import Any

from aiohttp import web
from cryptography import x509

from twofold.aio import LoopThread
from twofold.crypto import certs, jws
from twofold.crypto.ca import LocalCA
from twofold.errors import JWSError
from twofold.tls import server_context

SIGNED_TYPES = ("application/jose", "text/xml")
# Legacy text/xml carries either a compact JWS (signed) or a plain XML/JSON body (unsigned).
_COMPACT_JWS = re.compile(rb"\s*[A-Za-z0-9_-]+\.[A-Za-z0-9_-]*\.[A-Za-z0-9_-]*\s*")


def _is_signed(content_type: str, body: bytes) -> bool:
    if not body or content_type not in SIGNED_TYPES:
        return False
    return content_type == "application/jose" or _COMPACT_JWS.fullmatch(body) is not None


def echo_app(signature_certs: Sequence[x509.Certificate] = ()) -> web.Application:
    verifier = jws.Verifier(signature_certs) if signature_certs else None

    async def echo(request: web.Request) -> web.Response:
        ssl_object = request.transport.get_extra_info("ssl_object") if request.transport else None
        der = ssl_object.getpeercert(binary_form=True) if ssl_object else None
        body = await request.read()
        seen: dict[str, Any] = {
            "method": request.method,
            "path": request.path,
            "query": dict(request.query),
            "headers": {k: v for k, v in request.headers.items() if k.lower() != "authorization"},
            "tls": ssl_object.version() if ssl_object else None,
            "client_certificate": (
                {
                    "sha256": certs.fingerprint_sha256(der),
                    "subject": x509.load_der_x509_certificate(der).subject.rfc4514_string(),
                }
                if der
                else None
            ),
        }
        if _is_signed(request.content_type, body):
            if verifier is None:
                return _error(400, "no_signature_keys", "this endpoint has no signature certificates")
            try:
                verified = verifier.verify(body)
            except JWSError as error:
                return _error(error.status if error.status != 400 else 401, error.code, error.message)
            seen["signature"] = {"verified": True, "alg": verified.alg, "signer": verified.key.label}
            body = verified.payload
        try:
            seen["body"] = json.loads(body) if body else None
        except ValueError:
            seen["body"] = body.decode("utf-8", "replace")
        return web.json_response(seen)

    app = web.Application(client_max_size=1024 * 1024)
    app.router.add_route("*", "/{tail:.*}", echo)
    return app


def _error(status: int, code: str, message: str) -> web.Response:
    return web.json_response({"error": {"code": code, "message": message}}, status=status)


class EchoServer:
    """Runs :func:`echo_app` over TLS in a background thread::

    with EchoServer(trusted=[client_cert], signature_certs=[sign_cert]) as server:
        httpx.get(server.url, verify=server.ca_pem_path, ...)
    """

    def __init__(
        self,
        *,
        trusted: Sequence[x509.Certificate],
        signature_certs: Sequence[x509.Certificate] = (),
        host: str = "127.0.0.1",
        port: int = 0,
        ca: LocalCA | None = None,
    ) -> None:
        self.ca = ca or LocalCA("twofold echo CA")
        issued = self.ca.issue("localhost", usage="server", sans=["DNS:localhost", "IP:127.0.0.1"])
        self.server_certificate = issued.certificate
        self.context = server_context(issued.key, issued.certificate, trusted=trusted)
        self.app = echo_app(signature_certs)
        self.host = host
        self.port = port
        self._thread: LoopThread | None = None
        self._runner: web.AppRunner | None = None

    @property
    def url(self) -> str:
        return f"https://{self.host}:{self.port}"

    @property
    def ca_pem(self) -> bytes:
        return certs.certificate_pem(self.ca.certificate)

    def start(self) -> EchoServer:
        self._thread = LoopThread("twofold-echo")
        try:
            self._thread.call(self._serve(), timeout=10)
        except BaseException:
            self._thread.close()
            raise
        return self

    async def _serve(self) -> None:
        self._runner = web.AppRunner(self.app, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, self.host, self.port, ssl_context=self.context)
        await site.start()
        self.port = self._runner.addresses[0][1]

    def stop(self) -> None:
        if self._thread is None:
            return
        if self._runner is not None:
            self._thread.call(self._runner.cleanup(), timeout=10)
        self._thread.close()

    def __enter__(self) -> EchoServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
