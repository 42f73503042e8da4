"""One call through a gateway with given credentials, described: what `twofold rotate` and
`twofold doctor` need to know — did TLS accept the client certificate, what did the gateway
answer (status, error code), did the signature verify and with which certificate."""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from typing import Any

import httpx

from twofold.client import Client
from twofold.client.tls import CertSource, KeySource, explain_tls_failure

# Gateway refusals that mean "this client certificate is not (yet) accepted here".
IDENTIFICATION_REFUSALS = frozenset(
    {
        "certificate_not_registered",
        "client_certificate_required",
        "certificate_expired",
        "certificate_not_yet_valid",
    }
)
# ... and "this signature is not (yet) verified with a registered certificate".
SIGNATURE_REFUSALS = frozenset({"no_signature_certificate", "jws_no_key", "jws_signature_invalid"})
SIGNED_BY = "x-twofold-signature-cert-sha256"  # what the gateway tells the upstream (echo shows it)
PROBE_PAYLOAD = {"twofold": "probe"}


@dataclass(frozen=True)
class Probe:
    status: int | None  # None: no HTTP answer (TLS or connection failure)
    code: str | None = None  # the gateway's error code, or the client's TLS diagnosis
    message: str = ""
    body: Any = None
    tls_version: str | None = None
    date: str | None = None  # the server's Date header
    headers: dict[str, str] = field(default_factory=dict)

    @property
    def tls_refused(self) -> bool:
        return self.status is None

    @property
    def identified(self) -> bool:
        """The gateway accepted the client certificate (whatever it said next)."""
        return self.status is not None and self.code not in IDENTIFICATION_REFUSALS

    @property
    def ok(self) -> bool:
        return self.status is not None and 200 <= self.status < 300

    def signed_by(self) -> str | None:
        """The Digital Signature certificate the gateway verified with (echo product only)."""
        if isinstance(self.body, dict) and isinstance(self.body.get("headers"), dict):
            for name, value in self.body["headers"].items():
                if name.lower() == SIGNED_BY:
                    return str(value)
        return None

    def describe(self) -> str:
        if self.status is None:
            return self.message
        return f"HTTP {self.status}" + (f" {self.code}: {self.message}" if self.code else "")


def probe(
    url: str,
    *,
    cert: CertSource,
    key: KeySource,
    verify: bool | str | os.PathLike[str] | bytes,
    passphrase: bytes | None = None,
    signing_key: KeySource | None = None,
    signing_cert: CertSource | None = None,
    signing_passphrase: bytes | None = None,
    timeout: float = 10.0,
) -> Probe:
    """GET ``url`` (POST a small signed JSON body when a signing key is given), on a new
    connection; never raises for what the server or TLS did."""
    try:
        with Client(
            cert=cert,
            key=key,
            passphrase=passphrase,
            verify=verify,
            signing_key=signing_key,
            signing_cert=signing_cert,
            signing_passphrase=signing_passphrase,
            timeout=timeout,
        ) as client:
            if signing_key is not None:
                response = client.post(url, json=PROBE_PAYLOAD)
            else:
                response = client.get(url, headers={"Content-Type": "application/json"})
            stream = response.extensions.get("network_stream")
            ssl_object = stream.get_extra_info("ssl_object") if stream is not None else None
            version = ssl_object.version() if ssl_object is not None else None
    except httpx.TransportError as exc:
        error = explain_tls_failure(exc, sent_client_cert=True, host=url)
        return Probe(None, error.code, error.message)
    try:
        body: Any = response.json()
    except ValueError:
        body = response.text
    code = message = None
    if response.status_code >= 400 and isinstance(body, dict) and isinstance(body.get("error"), dict):
        code, message = body["error"].get("code"), body["error"].get("message")
    return Probe(
        response.status_code,
        code,
        message or "",
        body,
        version,
        response.headers.get("date"),
        dict(response.headers),
    )


def probe_until(
    url: str,
    accepted: Any,
    *,
    deadline: float = 10.0,
    interval: float = 0.25,
    **kwargs: Any,
) -> Probe:
    """Probe again until ``accepted(probe)`` or ``deadline`` seconds: registry changes reach
    the gateway within a second or so. Returns the last probe."""
    started = time.monotonic()
    while True:
        result = probe(url, **kwargs)
        if accepted(result) or time.monotonic() - started > deadline:
            return result
        time.sleep(interval)
