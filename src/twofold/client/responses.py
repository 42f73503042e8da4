"""Verifying the gateway's signed responses (products with signed responses answer with a
compact JWS of their JSON, ``Content-Type: application/jose``).

>>> verifier = ResponseVerifier("https://portal.bank.example/.well-known/jwks.json", verify="ca.pem")
>>> response = verifier.verified(httpx_response)   # the JSON payload, once its signature holds

The keys come from the provider's JWKS — fetched from the portal (again when a response
names a key it does not list yet: a new gateway node, a new key) or read from a file or a
dict. Only keys of the JWKS verify, each with its own ``alg`` (ES256, PS256 or RS256): the
JWS header cannot name another key or algorithm. What is refused raises
:class:`ResponseSignatureError`: a 2xx answer that is not signed, a signature that does not
verify, a key the JWKS does not list, a JWS that is not a response (the header of a response
has ``typ`` JOSE and the ``request_id`` it answered; an expiry notice has neither). Unsigned refusals (4xx, 5xx) of the gateway itself
pass: they are not the API's answers, and their status says what happened.
"""

from __future__ import annotations

import contextlib
import json
import os
import ssl
import threading
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import httpx

from twofold.client.tls import client_context
from twofold.crypto import jws
from twofold.crypto.jwk import verification_key_from_jwk
from twofold.errors import JWSError, KeyLoadError, TwofoldError

JOSE = "application/jose"
ALGORITHMS = ("ES256", "PS256", "RS256")
REFETCH_COOLDOWN = 10.0  # seconds between two fetches of the JWKS for an unknown kid
JwksSource = str | os.PathLike[str] | Mapping[str, Any]


class ResponseSignatureError(TwofoldError):
    """A response that should be signed is not, or its signature does not verify."""

    code = "response_signature_invalid"


class ResponseVerifier:
    """Verifies signed responses against the provider's JWKS (a URL, a file or a dict).
    ``verify`` is how the portal's certificate is checked when the JWKS is fetched (as for
    :func:`twofold.client.client_context`)."""

    def __init__(
        self, jwks: JwksSource, *, verify: bool | str | os.PathLike[str] | bytes = True, timeout: float = 10.0
    ) -> None:
        self.url: str | None = None
        self._document: Mapping[str, Any] | None = None
        if isinstance(jwks, Mapping):
            self._document = jwks
        elif str(jwks).startswith(("https://", "http://")):
            self.url = str(jwks)
        else:
            path = Path(jwks)
            try:
                self._document = json.loads(path.read_text())
            except (OSError, ValueError) as exc:
                raise ResponseSignatureError(
                    f"the JWKS file {path} cannot be read as JSON ({exc})", code="jwks_invalid"
                ) from None
        self._verify = verify
        self._context: ssl.SSLContext | None = None
        self.timeout = timeout
        self._verifier: jws.Verifier | None = None
        self._kids: frozenset[str] = frozenset()
        self._fetched_at = 0.0
        self._lock = threading.Lock()
        if self._document is not None:
            self._load(self._document)

    # --- the keys -------------------------------------------------------------------------------

    def _load(self, document: Mapping[str, Any]) -> None:
        entries = document.get("keys") if isinstance(document, Mapping) else None
        if not isinstance(entries, list):
            raise ResponseSignatureError('the JWKS has no "keys" list', code="jwks_invalid")
        keys = []
        for entry in entries:
            if not isinstance(entry, Mapping) or entry.get("alg") not in ALGORITHMS:
                continue  # keys for something else (encryption, other algorithms) are not ours
            try:
                keys.append(verification_key_from_jwk(entry))
            except (KeyLoadError, JWSError, ValueError):
                continue
        self._verifier = jws.Verifier(keys, algorithms=ALGORITHMS, max_size=16 * 1024 * 1024)
        self._kids = frozenset(i for k in keys for i in k.ids)

    def _fetch_options(self) -> dict[str, Any]:
        if self._context is None:
            self._context = client_context(verify=self._verify)
        return {"verify": self._context, "timeout": self.timeout, "follow_redirects": False}

    def _fetched(self, response: httpx.Response) -> None:
        if response.status_code != 200:
            raise ResponseSignatureError(
                f"the JWKS at {self.url} answered HTTP {response.status_code}; try again later",
                code="jwks_unavailable",
            )
        try:
            document = response.json()
        except ValueError:
            raise ResponseSignatureError(f"the JWKS at {self.url} is not JSON", code="jwks_invalid") from None
        self._load(document)
        self._fetched_at = time.monotonic()

    def _needs_fetch(self, kid: Any) -> bool:
        if self.url is None:
            return False
        if self._verifier is None:
            return True
        return (
            isinstance(kid, str)
            and kid not in self._kids
            and time.monotonic() - self._fetched_at > REFETCH_COOLDOWN
        )

    def refresh(self) -> None:
        """Fetch the JWKS now (a URL only)."""
        assert self.url is not None
        try:
            with httpx.Client(**self._fetch_options()) as client:
                self._fetched(client.get(self.url))
        except httpx.HTTPError as exc:
            raise ResponseSignatureError(
                f"the JWKS at {self.url} cannot be fetched ({type(exc).__name__}); check the portal URL",
                code="jwks_unavailable",
            ) from None

    async def arefresh(self) -> None:
        assert self.url is not None
        try:
            async with httpx.AsyncClient(**self._fetch_options()) as client:
                self._fetched(await client.get(self.url))
        except httpx.HTTPError as exc:
            raise ResponseSignatureError(
                f"the JWKS at {self.url} cannot be fetched ({type(exc).__name__}); check the portal URL",
                code="jwks_unavailable",
            ) from None

    # --- responses ------------------------------------------------------------------------------

    @staticmethod
    def _token(response: httpx.Response) -> bytes | None:
        """The JWS of a signed response; None for an unsigned refusal; raises for an unsigned 2xx."""
        media = response.headers.get("content-type", "").split(";", 1)[0].strip().lower()
        if media == JOSE:
            return response.content
        if 200 <= response.status_code < 300:
            raise ResponseSignatureError(
                f"the response (HTTP {response.status_code}, {media or 'no Content-Type'}) is not signed; "
                "the API's answers must be signed JWS (application/jose)",
                code="response_not_signed",
            )
        return None

    def _kid(self, token: bytes) -> Any:
        try:
            return jws.unverified_header(token.decode("ascii")).get("kid")
        except (JWSError, UnicodeDecodeError):
            return None  # verify() says what is wrong with it

    def _check(self, response: httpx.Response, token: bytes) -> httpx.Response:
        assert self._verifier is not None
        try:
            verified = self._verifier.verify(token)
        except JWSError as error:
            raise ResponseSignatureError(
                f"the response's signature does not hold: {error.message}",
                code="response_signature_invalid",
            ) from None
        header = verified.header
        if header.get("typ") != "JOSE" or not isinstance(header.get("request_id"), str):
            # Signed by a provider key, but not as a response (an expiry notice, say).
            raise ResponseSignatureError(
                "the body is signed, but not as a gateway response (no typ JOSE and request_id)",
                code="response_signature_invalid",
            )
        return _replaced(response, token, verified)

    def verified(self, response: httpx.Response) -> httpx.Response:
        """``response`` with its verified JSON payload as content (the JWS in
        ``extensions["twofold.response_jws"]``), or unchanged when it is an unsigned refusal."""
        token = self._token(response)
        if token is None:
            return response
        with self._lock:
            if self._needs_fetch(self._kid(token)):
                self.refresh()
        return self._check(response, token)

    async def averified(self, response: httpx.Response) -> httpx.Response:
        token = self._token(response)
        if token is None:
            return response
        if self._needs_fetch(self._kid(token)):
            await self.arefresh()
        return self._check(response, token)


def _replaced(response: httpx.Response, token: bytes, verified: jws.Verified) -> httpx.Response:
    headers = httpx.Headers(response.headers)
    headers["Content-Type"] = "application/json"
    headers["Content-Length"] = str(len(verified.payload))
    extensions = dict(response.extensions)
    extensions["twofold.response_jws"] = token
    extensions["twofold.response_header"] = verified.header
    replaced = httpx.Response(
        response.status_code, headers=headers, content=verified.payload, extensions=extensions
    )
    with contextlib.suppress(RuntimeError):  # a response that was never sent (built by hand)
        replaced.request = response.request
    return replaced


class VerifyingTransport(httpx.BaseTransport):
    """Wraps a transport: every response passes :meth:`ResponseVerifier.verified`."""

    def __init__(self, inner: httpx.BaseTransport, verifier: ResponseVerifier) -> None:
        self.inner, self.verifier = inner, verifier

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        response = self.inner.handle_request(request)
        try:
            response.read()
        finally:
            response.close()
        response.request = request
        return self.verifier.verified(response)

    def close(self) -> None:
        self.inner.close()


class AsyncVerifyingTransport(httpx.AsyncBaseTransport):
    def __init__(self, inner: httpx.AsyncBaseTransport, verifier: ResponseVerifier) -> None:
        self.inner, self.verifier = inner, verifier

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        response = await self.inner.handle_async_request(request)
        try:
            await response.aread()
        finally:
            await response.aclose()
        response.request = request
        return await self.verifier.averified(response)

    async def aclose(self) -> None:
        await self.inner.aclose()
