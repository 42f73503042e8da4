"""mTLS (+ JWS) API clients on top of httpx.

>>> from twofold.client import Client
>>> with Client("https://localhost:8443", cert="mtls.crt", key="mtls.key",
...             signing_key="sign.key", verify="ca.pem",
...             verify_response="https://localhost:8000/.well-known/jwks.json") as api:
...     r = api.post("/tsapi/v1/payments", json={"paymentIdentifiers": {"endToEndId": "E2E-1"}})
...     r.json()   # the gateway's signed answer, verified against the portal's JWKS
"""

from __future__ import annotations

import os
from typing import Any

import httpx
from cryptography import x509

from twofold.client.auth import JOSE, LEGACY_XML, JWSAuth
from twofold.client.responses import (
    AsyncVerifyingTransport,
    JwksSource,
    ResponseSignatureError,
    ResponseVerifier,
    VerifyingTransport,
)
from twofold.client.tls import (
    CertSource,
    KeySource,
    client_context,
    explain_tls_failure,
    load_client_credentials,
    read_source,
)
from twofold.crypto import certs as _certs
from twofold.crypto import keys as _keys

__all__ = [
    "JOSE",
    "LEGACY_XML",
    "AsyncClient",
    "Client",
    "JWSAuth",
    "ResponseSignatureError",
    "ResponseVerifier",
    "client_context",
    "explain_tls_failure",
    "load_client_credentials",
    "signing_auth",
]


def signing_auth(
    signing_key: KeySource,
    *,
    passphrase: _keys.Passphrase = None,
    alg: str | None = None,
    kid: str | None = None,
    signing_cert: CertSource | None = None,
    content_type: str = JOSE,
) -> JWSAuth:
    """A :class:`JWSAuth` from a key in any form. With ``signing_cert`` the header names the
    certificate by ``x5t#S256`` so the verifier can pick it without trying every key."""
    if isinstance(signing_key, _keys.PrivateKey):
        key = signing_key
        cert = None
    else:
        data, name = read_source(signing_key, "the signing key file")
        creds = _keys.load_credentials(data, passphrase, name=name)
        key, cert = creds.key, creds.certificate
    if signing_cert is not None:
        if isinstance(signing_cert, x509.Certificate):
            cert = signing_cert
        else:
            data, name = read_source(signing_cert, "the signing certificate file")
            cert = _certs.load_certificate(data, name=name)
    x5t = _certs.x5t_s256(cert) if cert is not None else None
    return JWSAuth(key, alg=alg, kid=kid, x5t_s256=x5t, content_type=content_type)


def _options(
    cert: CertSource | None,
    key: KeySource | None,
    passphrase: _keys.Passphrase,
    verify: bool | str | os.PathLike[str] | bytes,
    signing_key: KeySource | None,
    signing_passphrase: _keys.Passphrase,
    signing_cert: CertSource | None,
    alg: str | None,
    kid: str | None,
    content_type: str,
    verify_response: JwksSource | ResponseVerifier | None,
    kwargs: dict[str, Any],
    asynchronous: bool,
) -> dict[str, Any]:
    context = client_context(cert=cert, key=key, passphrase=passphrase, verify=verify)
    options: dict[str, Any] = {"verify": context}
    if verify_response is not None:
        verifier = (
            verify_response
            if isinstance(verify_response, ResponseVerifier)
            else ResponseVerifier(verify_response, verify=verify)
        )
        transport_options = {n: kwargs.pop(n) for n in ("limits", "http1", "http2") if n in kwargs}
        inner = kwargs.pop("transport", None)
        if asynchronous:
            inner = inner or httpx.AsyncHTTPTransport(verify=context, **transport_options)
            options["transport"] = AsyncVerifyingTransport(inner, verifier)
        else:
            inner = inner or httpx.HTTPTransport(verify=context, **transport_options)
            options["transport"] = VerifyingTransport(inner, verifier)
    if signing_key is not None:
        options["auth"] = signing_auth(
            signing_key,
            passphrase=signing_passphrase,
            alg=alg,
            kid=kid,
            signing_cert=signing_cert,
            content_type=content_type,
        )
    return options


class Client(httpx.Client):
    """An ``httpx.Client`` that authenticates with a client certificate and, given a
    ``signing_key``, sends every request body as a compact JWS (RS256 by default). With
    ``verify_response`` (the portal's JWKS URL, a JWKS file or dict, or a
    :class:`ResponseVerifier`) every signed response is verified and its JSON payload becomes
    the content; an unsigned 2xx or a bad signature raises :class:`ResponseSignatureError`."""

    def __init__(
        self,
        base_url: str = "",
        *,
        cert: CertSource | None = None,
        key: KeySource | None = None,
        passphrase: _keys.Passphrase = None,
        verify: bool | str | os.PathLike[str] | bytes = True,
        signing_key: KeySource | None = None,
        signing_passphrase: _keys.Passphrase = None,
        signing_cert: CertSource | None = None,
        alg: str | None = None,
        kid: str | None = None,
        content_type: str = JOSE,
        verify_response: JwksSource | ResponseVerifier | None = None,
        **kwargs: Any,
    ) -> None:
        options = _options(
            cert,
            key,
            passphrase,
            verify,
            signing_key,
            signing_passphrase,
            signing_cert,
            alg,
            kid,
            content_type,
            verify_response,
            kwargs,
            asynchronous=False,
        )
        super().__init__(base_url=base_url, **options, **kwargs)


class AsyncClient(httpx.AsyncClient):
    """The asyncio twin of :class:`Client`."""

    def __init__(
        self,
        base_url: str = "",
        *,
        cert: CertSource | None = None,
        key: KeySource | None = None,
        passphrase: _keys.Passphrase = None,
        verify: bool | str | os.PathLike[str] | bytes = True,
        signing_key: KeySource | None = None,
        signing_passphrase: _keys.Passphrase = None,
        signing_cert: CertSource | None = None,
        alg: str | None = None,
        kid: str | None = None,
        content_type: str = JOSE,
        verify_response: JwksSource | ResponseVerifier | None = None,
        **kwargs: Any,
    ) -> None:
        options = _options(
            cert,
            key,
            passphrase,
            verify,
            signing_key,
            signing_passphrase,
            signing_cert,
            alg,
            kid,
            content_type,
            verify_response,
            kwargs,
            asynchronous=True,
        )
        super().__init__(base_url=base_url, **options, **kwargs)
