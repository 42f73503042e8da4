"""An ``httpx.Auth`` that signs request bodies as compact JWS."""

from __future__ import annotations

from collections.abc import Generator

import httpx

from twofold.crypto import jws
from twofold.crypto.keys import PrivateKey

JOSE = "application/jose"
LEGACY_XML = "text/xml"


class JWSAuth(httpx.Auth):
    """Replaces a non-empty request body by its compact JWS and sets ``Content-Type``.

    The exact body bytes are signed (no re-serialisation). Requests without a body (GET)
    pass unchanged. ``content_type`` is ``application/jose`` by default; ``text/xml`` is
    what some bank gateways still expect.
    """

    requires_request_body = True

    def __init__(
        self,
        key: PrivateKey,
        *,
        alg: str | None = None,
        kid: str | None = None,
        x5t_s256: str | None = None,
        typ: str | None = None,
        content_type: str = JOSE,
    ) -> None:
        self.key = key
        self.alg = alg or jws.default_alg_for(key)
        self.kid = kid
        self.x5t_s256 = x5t_s256
        self.typ = typ
        self.content_type = content_type

    def sign(self, body: bytes) -> str:
        return jws.sign(body, self.key, alg=self.alg, kid=self.kid, x5t_s256=self.x5t_s256, typ=self.typ)

    def auth_flow(self, request: httpx.Request) -> Generator[httpx.Request, httpx.Response, None]:
        body = request.content
        if not body:
            yield request
            return
        token = self.sign(body).encode("ascii")
        headers = httpx.Headers(request.headers)
        headers["Content-Type"] = self.content_type
        headers["Content-Length"] = str(len(token))
        extensions = dict(request.extensions)
        extensions["twofold.signed_payload"] = body
        yield httpx.Request(
            request.method, request.url, headers=headers, content=token, extensions=extensions
        )
