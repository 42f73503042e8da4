"""Signed responses for the API products that ask for them (``sign_responses``).

The gateway signs the upstream's JSON answer — its exact bytes — as a compact JWS with its
own key (:class:`twofold.provider_keys.ProviderKey`: ES256 by default, or RS256/PS256) and
answers ``Content-Type: application/jose``. The protected header names the key by ``kid``
(listed in the portal's JWKS at ``/.well-known/jwks.json``) and says when and to which
request it answered::

    {"alg": "ES256", "kid": "<RFC 7638 thumbprint>", "typ": "JOSE", "cty": "json",
     "iat": 1767225600, "request_id": "<the X-Request-Id the upstream was given>"}

What is not signed: answers without a body, answers that are not JSON (or that the upstream
compressed: for these products the gateway asks it for an identity encoding), HEAD, and the
gateway's own refusals (they are not the API's answers) — a client that verifies treats an
unsigned 2xx as a failure.
"""

from __future__ import annotations

import time

from twofold.provider_keys import ProviderKey

JOSE = "application/jose"


def is_json(content_type: bytes | str | None) -> bool:
    if not content_type:
        return False
    media = (content_type.decode("latin-1") if isinstance(content_type, bytes) else content_type).split(
        ";", 1
    )[0]
    media = media.strip().lower()
    return media == "application/json" or (media.startswith("application/") and media.endswith("+json"))


class ResponseSigner:
    """The gateway's response key, published in the registry before it signs (see serve)."""

    def __init__(self, key: ProviderKey) -> None:
        self.key = key

    @property
    def kid(self) -> str:
        return self.key.kid

    def sign(self, body: bytes, request_id: str) -> bytes:
        headers = {"cty": "json", "iat": int(time.time()), "request_id": request_id}
        return self.key.sign_bytes(body, typ="JOSE", headers=headers).encode("ascii")
