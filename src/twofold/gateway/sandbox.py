"""The built-in upstream, shaped like a bank payments API, so the system is useful before
any real API exists. Products whose upstream is ``sandbox:<name>`` are answered here, in
process; sandbox data lives in the registry database."""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, TypeGuard
from urllib.parse import parse_qs

from twofold.errors import TwofoldError
from twofold.registry.service import Registry

if TYPE_CHECKING:
    from twofold.gateway.replay import Claim


@dataclass(slots=True)  # built for every request: a frozen dataclass costs a microsecond more
class Forwarded:
    """What the gateway passes to an upstream after every check."""

    method: str
    path: str  # decoded
    raw_path: str  # as sent (what a proxy forwards)
    query_string: str  # as sent  # raw, percent-encoded as the client sent it
    headers: dict[str, str]
    body: bytes
    org_id: int
    org: str
    environment: str
    replay: Claim | None = None  # an id to record before forwarding (twofold.gateway.replay)


Answer = tuple[int, Any]


def _error(status: int, code: str, message: str) -> Answer:
    return status, {"error": {"code": code, "message": message}}


def _refused(error: TwofoldError) -> Answer:
    """A registry refusal as the sandbox's answer. One that passes with time (the registry
    database unreachable: 503 ``registry_unavailable``) says when to try again, in
    ``error.retry_after`` — :func:`retry_after_header` makes it the Retry-After header."""
    status, body = _error(error.status, error.code, error.message)
    if error.retry_after:
        body["error"]["retry_after"] = error.retry_after
    return status, body


def retry_after_header(data: Any) -> list[tuple[str, str]]:
    """``[("Retry-After", seconds)]`` for a sandbox answer that says when to try again."""
    error = data.get("error") if isinstance(data, dict) else None
    seconds = error.get("retry_after") if isinstance(error, dict) else None
    return [("Retry-After", str(seconds))] if isinstance(seconds, int) else []


def _payload(request: Forwarded) -> Any:
    try:
        return json.loads(request.body) if request.body else None
    except (ValueError, RecursionError):  # RecursionError: nested too deeply to parse
        return None


def _valid_e2e(value: object) -> TypeGuard[str]:
    """A string of 1–100 printable characters that the database can store (no control
    characters such as NUL, no lone surrogates)."""
    if not isinstance(value, str) or not value.strip() or len(value) > 100:
        return False
    if any(ord(c) < 0x20 or ord(c) == 0x7F for c in value):
        return False
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _storable(payload: Any) -> bool:
    """Standard JSON only: NaN, Infinity and numbers too large for a float are refused."""
    try:
        json.dumps(payload, allow_nan=False)
    except ValueError:
        return False
    return True


async def payments(registry: Registry, request: Forwarded, suffix: str) -> Answer:
    if request.method == "POST" and suffix in ("", "/"):
        payload = _payload(request)
        e2e = None
        if isinstance(payload, dict):
            ids = (
                (payload.get("payments") or {}).get("paymentIdentifiers")
                if isinstance(payload.get("payments"), dict)
                else None
            )
            e2e = ids.get("endToEndId") if isinstance(ids, dict) else None
        if not _valid_e2e(e2e):
            return _error(
                400,
                "missing_end_to_end_id",
                "the payment needs payments.paymentIdentifiers.endToEndId (a string of up to 100 printable "
                "characters)",
            )
        if not _storable(payload):
            return _error(
                400,
                "payment_invalid",
                "the payment contains numbers JSON cannot carry (NaN, Infinity or out of range)",
            )
        try:
            stored = await registry.sandbox_create_payment(request.org_id, request.environment, e2e, payload)
        except TwofoldError as error:
            return _refused(error)
        return 202, {
            "paymentInitiationResponse": {
                "endToEndId": stored["endToEndId"],
                "firmRootId": stored["firmRootId"],
            }
        }
    if request.method == "GET" and suffix == "/status":
        e2e = (parse_qs(request.query_string).get("endToEndId") or [""])[0]
        if not e2e:
            return _error(400, "missing_end_to_end_id", "give ?endToEndId=… of the payment")
        if not _valid_e2e(e2e):
            return _error(
                404, "payment_not_found", "no payment with that endToEndId (it has characters none can have)"
            )
        try:
            stored = await registry.sandbox_payment(request.org_id, request.environment, e2e)
        except TwofoldError as error:
            return _refused(error)
        return 200, {
            "paymentStatus": {
                "endToEndId": stored["endToEndId"],
                "firmRootId": stored["firmRootId"],
                "status": stored["status"],
                "createdAt": stored["createdAt"],
            }
        }
    return _error(
        404,
        "not_found",
        "the sandbox payments API has POST /tsapi/v1/payments and GET /tsapi/v1/payments/status?endToEndId=…",
    )


async def balance(registry: Registry, request: Forwarded, suffix: str) -> Answer:
    if request.method not in ("GET", "POST"):
        return _error(405, "method_not_allowed", "use GET (or POST with a filter)")
    return 200, {
        "accountBalances": [
            {
                "accountId": f"{request.org.upper()}-000123456789",
                "currency": "USD",
                "balances": [
                    {"type": "CLOSING_AVAILABLE", "amount": "1250000.00"},
                    {"type": "OPENING_LEDGER", "amount": "1249100.50"},
                ],
            },
        ],
        "organisation": request.org,
        "environment": request.environment,
    }


async def echo(registry: Registry, request: Forwarded, suffix: str) -> Answer:
    body: Any = _payload(request)
    if body is None and request.body:
        body = request.body.decode("utf-8", "replace")
    return 200, {
        "method": request.method,
        "path": request.path,
        "query": request.query_string,
        "headers": request.headers,
        "body": body,
    }


SANDBOXES = {"payments": payments, "balance": balance, "echo": echo}

DEFAULT_PRODUCTS: list[dict[str, Any]] = [
    {
        "id": "payments",
        "name": "Payments",
        "path_prefix": "/tsapi/v1/payments",
        "upstream": "sandbox:payments",
        "signature": "required",
        "content_types": ["application/jose", "text/xml"],
    },
    {
        "id": "balance",
        "name": "Account balance",
        "path_prefix": "/accessapi/balance",
        "upstream": "sandbox:balance",
        "signature": "none",
        "content_types": ["application/json", "text/xml"],
    },
    {
        "id": "echo",
        "name": "Echo (debugging)",
        "path_prefix": "/echo",
        "upstream": "sandbox:echo",
        "signature": "optional",
        "content_types": ["application/json", "application/jose", "text/xml"],
    },
]
