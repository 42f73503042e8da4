"""The gateway's request pipeline: identify → route → authorise → read → verify, then
forward (:mod:`twofold.gateway.forward`). Each step is a plain function of the registry
snapshot, the :class:`~twofold.gateway.facts.ConnectionFacts` and the request: no sockets,
no HTTP library, so the same steps serve direct TLS and TLS edges, and each is tested on
its own. A step refuses by raising :class:`GatewayError` (a stable code, a 4xx status and a
message saying what to do); nothing unverified is ever forwarded.
"""

from __future__ import annotations

import datetime as dt
import itertools
import json
import re
import secrets
import time
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from json.scanner import make_scanner
from typing import Any, cast

from twofold.errors import JWSError, TwofoldError
from twofold.gateway import replay
from twofold.gateway.facts import ConnectionFacts, RequestHead
from twofold.gateway.sandbox import Forwarded
from twofold.gateway.snapshot import ClientCert, Product, Snapshot

SIGNED_TYPES = ("application/jose", "text/xml")
_COMPACT_JWS = re.compile(rb"\s*[A-Za-z0-9_-]+\.[A-Za-z0-9_-]*\.[A-Za-z0-9_-]+\s*")
_JWS_STATUS = {"jws_signature_invalid": 401, "jws_no_key": 401, "jws_too_large": 413}

HEADER_ORG = "X-Twofold-Organisation"
HEADER_ENV = "X-Twofold-Environment"
HEADER_CLIENT_CERT = "X-Twofold-Client-Cert-Sha256"
HEADER_SIGNATURE_CERT = "X-Twofold-Signature-Cert-Sha256"

# Request headers never forwarded: hop-by-hop, framing, and what the gateway sets itself.
_HOP_BY_HOP = frozenset(
    {
        "connection",
        "keep-alive",
        "proxy-authenticate",
        "proxy-authorization",
        "proxy-connection",
        "te",
        "trailer",
        "transfer-encoding",
        "upgrade",
        "host",
        "content-length",
        "content-type",
        "content-encoding",
        "expect",
    }
)
# Headers an upstream may trust for identity: only the gateway sets them.
_TRUST_HEADERS = frozenset(
    {
        "x-request-id",
        "forwarded",
        "x-forwarded-for",
        "x-forwarded-proto",
        "x-forwarded-host",
        "x-real-ip",
        "client-cert",
        "client-cert-chain",
        "x-forwarded-client-cert",
        "x-ssl-client-cert",
        "x-client-cert",
        "ssl-client-cert",
    }
)
_NOT_FORWARDED = _HOP_BY_HOP | _TRUST_HEADERS
_ENCODED_SEPARATORS = re.compile(r"%(2f|5c|00)", re.IGNORECASE)
_PLAIN_PATH = re.compile(r"(?:/[A-Za-z0-9_~!$&'()*+,=:@-]+)+/?|/")  # no '.', '%', ';', '\\', NUL

# Request ids: unique per process start and cheap (uuid4 costs more than the rest of the headers).
_REQUEST_ID_PREFIX = secrets.token_hex(6)
_request_ids = itertools.count(1)


class GatewayError(TwofoldError):
    code = "gateway_error"


@dataclass(slots=True)
class Outcome:
    """What the access log and metrics record about one request (never bodies or headers)."""

    org: str | None = None
    org_id: int | None = None
    fingerprint: str | None = None
    product: str | None = None
    signature_fingerprint: str | None = None
    code: str = "ok"
    message: str | None = None  # the refusal message (recent calls on the dashboard)

    def refused(self, error: TwofoldError) -> None:
        self.code, self.message = error.code, error.message


class Admitted:
    """A request that passed every step before its body: who calls, which product, and
    the snapshot that decided it (the later steps use the same one)."""

    __slots__ = ("client", "product", "snapshot")

    def __init__(self, snapshot: Snapshot, client: ClientCert, product: Product) -> None:
        self.snapshot, self.client, self.product = snapshot, client, product


def forwardable(name: str) -> bool:
    """A client header the upstream may see. Names with '_' are dropped (as nginx does):
    CGI-style upstreams read ``X_Twofold_Organisation`` as the gateway's own header."""
    decided = _forwardable.get(name)
    if decided is None:
        lower = name.lower()
        decided = (
            "_" not in lower
            and lower not in _NOT_FORWARDED
            and not lower.startswith(("x-twofold-", "x-ssl-", "x-client-"))
        )
        if len(_forwardable) < 4096:  # names as clients spell them: few, and the same every time
            _forwardable[name] = decided
    return decided


_forwardable: dict[str, bool] = {}


# --- identify ---------------------------------------------------------------------------------


def identify(snapshot: Snapshot, facts: ConnectionFacts, now: dt.datetime | None = None) -> ClientCert:
    """The organisation behind the client certificate, looked up in the live snapshot on
    every request (a removed certificate is refused on its next request, on an open
    connection too)."""
    env = facts.environment
    if facts.problem is not None:
        code, status, message = facts.problem
        raise GatewayError(message, code=code, status=status)
    if facts.fingerprint is None:
        raise GatewayError(
            "no client certificate was presented; call with your mTLS certificate and key"
            if facts.via == "tls"
            else f"the TLS edge ({facts.via}) forwarded no client certificate; call with your mTLS "
            "certificate and key",
            code="client_certificate_required",
            status=401,
        )
    client = snapshot.mtls.get(env, {}).get(facts.fingerprint)
    if client is None:
        elsewhere = [e for e, certs in snapshot.mtls.items() if facts.fingerprint in certs]
        hint = (
            f" (it is registered for {', '.join(elsewhere)})"
            if elsewhere
            else "; register it as MTLS on the portal's Security page"
        )
        raise GatewayError(
            f"certificate not registered for environment {env}{hint}",
            code="certificate_not_registered",
            status=401,
        )
    moment = time.time() if now is None else now.timestamp()
    if client.valid_until <= moment:
        raise GatewayError(
            f"the client certificate expired on {client.not_after:%Y-%m-%d}",
            code="certificate_expired",
            status=401,
        )
    if client.valid_from > moment:
        raise GatewayError(
            "the client certificate is not valid yet", code="certificate_not_yet_valid", status=401
        )
    return client


# --- route ------------------------------------------------------------------------------------


def check_path(path: str, raw_path: str) -> None:
    """Refuse paths that the gateway would match as one product while an upstream normalises
    them into another (``/bank//payments``, ``/bank/payments;x``, ``/a/%2e%2e/b``, ``%2F`` …):
    the product decides whether a signature is required, so the path must be unambiguous."""
    if _PLAIN_PATH.fullmatch(path) and "%" not in raw_path:
        return  # the common case: segments of plain characters
    segments = path.split("/")[1:]
    if (
        not path.startswith("/")
        or any(segment in (".", "..") for segment in segments)
        or "" in segments[:-1]  # an empty segment: '//' (a trailing '/' is fine)
        or ";" in path
        or "\\" in path
        or "\x00" in path
        or _ENCODED_SEPARATORS.search(raw_path)
    ):
        raise GatewayError(
            "the path is not in normal form (it has '.', '..' or empty segments, ';' parameters, "
            "backslashes or encoded slashes); send the normalised path",
            code="path_invalid",
            status=400,
        )


def route(snapshot: Snapshot, head: RequestHead, env: str) -> Product:
    """The API product serving the path (longest prefix, whole segments, any case)."""
    check_path(head.path, head.raw_path)
    product = snapshot.product_for(head.path)
    if product is None:
        raise GatewayError(
            f"no API product serves {head.path} in environment {env}", code="no_such_api", status=404
        )
    return product


# --- authorise --------------------------------------------------------------------------------


def authorise(snapshot: Snapshot, client: ClientCert, product: Product, env: str) -> None:
    if product.id not in snapshot.access.get((client.org_id, env), ()):
        raise GatewayError(
            f"organisation {client.org} has no project with API product {product.id} in environment {env}; "
            "add the product to a project on the portal's Projects page",
            code="product_not_in_project",
            status=403,
        )


# --- read -------------------------------------------------------------------------------------


def body_too_large(max_body: int) -> GatewayError:
    return GatewayError(f"the body is larger than {max_body} bytes", code="body_too_large", status=413)


def admit_body(head: RequestHead, max_body: int) -> None:
    """Before reading: a declared length over the limit is refused at once."""
    if head.content_length is not None and head.content_length > max_body:
        raise body_too_large(max_body)


def _inflate(data: bytes, coding: str, limit: int) -> bytes:
    """One content coding undone, never to more than ``limit`` + 1 bytes (a small
    compressed body can inflate to gigabytes)."""
    if coding in ("gzip", "x-gzip"):
        attempts: tuple[int, ...] = (16 + zlib.MAX_WBITS,)
    elif coding == "deflate":  # zlib-wrapped (RFC 9110), or raw as some clients send it
        attempts = (zlib.MAX_WBITS, -zlib.MAX_WBITS)
    else:
        raise GatewayError(
            f"the Content-Encoding {coding!r} is not supported; send the body uncompressed, or gzip or deflate",
            code="content_encoding_not_supported",
            status=415,
        )
    for wbits in attempts:
        inflater = zlib.decompressobj(wbits)
        try:
            inflated = inflater.decompress(data, limit + 1)
        except zlib.error:
            continue
        if inflater.eof or len(inflated) > limit:
            return inflated
    raise GatewayError(f"the body is not complete {coding} data", code="content_encoding_invalid", status=400)


def read(head: RequestHead, body: bytes, max_body: int) -> bytes:
    """The body as the client meant it: within the limit, its Content-Encoding undone."""
    if len(body) > max_body:
        raise body_too_large(max_body)
    encoding = head.content_encoding
    if encoding and body:
        for coding in reversed([c.strip().lower() for c in encoding.split(",")]):
            if coding and coding != "identity":
                body = _inflate(body, coding, max_body)
                if len(body) > max_body:
                    raise body_too_large(max_body)
    return body


def client_disconnected() -> GatewayError:
    return GatewayError(
        "the client closed the connection before it sent the whole body",
        code="client_disconnected",
        status=400,
    )


# --- verify -----------------------------------------------------------------------------------


def expects_signature(product: Product, method: str, body: bytes, media: str) -> bool:
    """Whether the body is a JWS to verify; refuses unsigned bodies where one is required."""
    if product.signature == "none":
        return False
    if not body:
        if product.signature == "required" and method in ("POST", "PUT", "PATCH"):
            raise GatewayError(
                "this API requires a signed body: send the payload as a compact JWS "
                "(Content-Type: application/jose)",
                code="signature_required",
                status=400,
            )
        return False
    if media == "application/jose":
        return True
    if media == "text/xml":  # legacy clients send the JWS as text/xml
        return product.signature == "required" or _COMPACT_JWS.fullmatch(body) is not None
    if product.signature == "required":
        raise GatewayError(
            "this API requires a signed body; send the compact JWS as application/jose, not "
            f"{media or 'a body without Content-Type'}",
            code="signature_required",
            status=415,
        )
    return False


def _not_json(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")  # Python's json accepts NaN and Infinity


_SCAN_JSON = cast(  # the C scanner that json.loads uses, without its wrappers
    Callable[[str, int], tuple[Any, int]], make_scanner(cast(Any, json.JSONDecoder(parse_constant=_not_json)))
)
_JSON_SPACE = " \t\n\r"


def check_json(payload: bytes) -> None:
    """Raises ValueError (or UnicodeDecodeError, RecursionError) unless ``payload`` is one
    UTF-8 JSON text (RFC 8259: no NaN or Infinity)."""
    text = payload.decode("utf-8")
    start = len(text) - len(text.lstrip(_JSON_SPACE)) if text[:1] in _JSON_SPACE else 0
    try:
        _value, end = _SCAN_JSON(text, start)
    except StopIteration:
        raise ValueError("not JSON") from None
    if end != len(text) and text[end:].strip(_JSON_SPACE):
        raise ValueError("more than one JSON text")


def verify_signature(
    snapshot: Snapshot, client: ClientCert, env: str, product: Product, body: bytes, max_body: int
) -> tuple[bytes, str | None]:
    """The JWS verified against the organisation's Digital Signature certificates (every
    request, in full); returns the payload (which must be JSON) and the signer's label."""
    verifier = snapshot.verifier(client.org_id, env, product.algorithms, max_body)
    if verifier is None:
        raise GatewayError(
            f"organisation {client.org} has no Digital Signature certificate in environment {env}; register "
            "one on the portal's Security page",
            code="no_signature_certificate",
            status=401,
        )
    try:
        verified = verifier.verify(body)
    except JWSError as error:
        status = _JWS_STATUS.get(error.code, 400)
        message = error.message
        if error.code == "jws_signature_invalid":
            message = (
                f"signature does not verify against any Digital Signature certificate of organisation "
                f"{client.org} in environment {env}"
            )
            known = verifier.signed_by_a_known_key(body)
            if known is False:
                message += (
                    ": the signing key belongs to none of them. Register its certificate on the "
                    "portal's Security page (Add Security, Digital Signature), or sign with the key of "
                    "a registered one"
                )
            elif known is True:
                message += ": a registered key signed it, but not these bytes; send exactly what was signed"
        raise GatewayError(message, code=error.code, status=status) from None
    try:
        check_json(verified.payload)
    except (ValueError, UnicodeDecodeError, RecursionError):  # RecursionError: nested too deeply
        raise GatewayError(
            "the signed payload is not JSON (or is nested too deeply); sign the JSON request body",
            code="payload_not_json",
            status=400,
        ) from None
    return verified.payload, verified.key.label


def verify(
    admitted: Admitted,
    head: RequestHead,
    body: bytes,
    env: str,
    max_body: int,
    outcome: Outcome,
) -> tuple[bytes, str]:
    """The body's content type for this product, and its signature where one is expected:
    returns what to forward (the verified JSON payload, or the body as sent) and its
    Content-Type."""
    product = admitted.product
    media = head.media_type if body else ""
    signed = expects_signature(product, head.method, body, media)
    if body and media not in product.content_types:
        raise GatewayError(
            f"{product.name} does not accept {media or 'a body without Content-Type'}; send "
            f"{' or '.join(sorted(product.content_types))}",
            code="content_type_not_accepted",
            status=415,
        )
    if not signed:
        return body, head.content_type
    payload, outcome.signature_fingerprint = verify_signature(
        admitted.snapshot, admitted.client, env, product, body, max_body
    )
    return payload, "application/json"


# --- what is forwarded ------------------------------------------------------------------------


def upstream_headers(
    head: RequestHead,
    facts: ConnectionFacts,
    client: ClientCert,
    signature_fp: str | None,
    content_type: str,
) -> dict[str, str]:
    """The client's forwardable headers, then the gateway's own: who called (organisation,
    certificate, signer), from where, and a request id."""
    headers = {name: value for name, value in head.headers if forwardable(name)}
    headers["X-Forwarded-For"] = facts.client_address
    headers["X-Forwarded-Proto"] = "https"
    sent_id = head.request_id
    if sent_id and len(sent_id) <= 128 and sent_id.isprintable():
        headers["X-Request-Id"] = sent_id
    else:
        headers["X-Request-Id"] = f"{_REQUEST_ID_PREFIX}-{next(_request_ids):x}"
    if content_type:
        headers["Content-Type"] = content_type
    headers[HEADER_ORG] = client.org
    headers[HEADER_ENV] = facts.environment
    headers[HEADER_CLIENT_CERT] = client.fingerprint
    if signature_fp:
        headers[HEADER_SIGNATURE_CERT] = signature_fp
    return headers


# --- the steps together -----------------------------------------------------------------------


def admit(
    snapshot: Snapshot, facts: ConnectionFacts, head: RequestHead, max_body: int, outcome: Outcome
) -> Admitted:
    """identify → route → authorise → the declared body length: everything decided before
    a byte of the body is read (and before ``100 Continue`` is sent)."""
    env = facts.environment
    client = identify(snapshot, facts)
    outcome.org, outcome.org_id, outcome.fingerprint = client.org, client.org_id, client.fingerprint
    product = route(snapshot, head, env)
    outcome.product = product.id
    authorise(snapshot, client, product, env)
    admit_body(head, max_body)
    return Admitted(snapshot, client, product)


def prepare(
    facts: ConnectionFacts,
    admitted: Admitted,
    head: RequestHead,
    body: bytes,
    max_body: int,
    outcome: Outcome,
) -> Forwarded:
    """read → verify, once the whole body is in: what the upstream is given."""
    body = read(head, body, max_body)
    payload, content_type = verify(admitted, head, body, facts.environment, max_body, outcome)
    client = admitted.client
    policy = admitted.product.replay
    return Forwarded(
        head.method,
        head.path,
        head.raw_path,
        head.query,  # as sent: the decoded form can change its meaning
        upstream_headers(head, facts, client, outcome.signature_fingerprint, content_type),
        payload,
        client.org_id,
        client.org,
        facts.environment,
        # A replay-protected product: the signed time and id (recorded by the forward step).
        None
        if policy is None or outcome.signature_fingerprint is None
        else replay.claim(policy, body, payload, client.org_id, client.org, time.time()),
    )
