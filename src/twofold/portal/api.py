"""The versioned JSON API (``/api/v1``): everything the pages do, for scripts and CI.

Authenticated by personal API tokens (``Authorization: Bearer tf_…``). Errors are
``{"error": {"code": …, "message": …}}`` with a 4xx status and a stable code.
"""

from __future__ import annotations

import base64
import binascii
import json
from typing import Any

from aiohttp import web

from twofold.portal.api_accounts import ACCOUNT_ROUTES
from twofold.portal.api_base import _field, _json_body, _registry
from twofold.portal.openapi import STR as _STR
from twofold.portal.openapi import Route, openapi_document
from twofold.portal.web import CONFIG, issuer_for, read_form, require_operator, require_principal
from twofold.registry.rules import RegistryError

# --- handlers ------------------------------------------------------------------------------


async def me(request: web.Request) -> web.Response:
    who = require_principal(request)
    return web.json_response(
        {
            "email": who.name,
            "organisation": who.org_slug,
            "roles": sorted(who.roles),
            "second_factor": who.mfa_enrolled,
        }
    )


async def environments(request: web.Request) -> web.Response:
    require_principal(request)
    gateways = dict(request.app[CONFIG].gateway_urls)
    rows = await _registry(request).list_environments()
    return web.json_response([{**row, "gateway_url": gateways.get(row["id"])} for row in rows])


async def save_environment(request: web.Request) -> web.Response:
    who = require_operator(request)
    body = await _json_body(request)
    env = await _registry(request).save_environment(
        who,
        _field(body, "id"),
        name=_field(body, "name", required=False),
        allow_self_signed=_field(body, "allow_self_signed", bool, required=False),
        ca_pem=_field(body, "ca_pem", required=False),
        gateway_port=_field(body, "gateway_port", int, required=False),
    )
    return web.json_response(env, status=201)


async def products(request: web.Request) -> web.Response:
    require_principal(request)
    return web.json_response(await _registry(request).list_products())


async def save_product(request: web.Request) -> web.Response:
    who = require_operator(request)
    body = await _json_body(request)
    product = await _registry(request).save_product(
        who,
        _field(body, "id"),
        name=_field(body, "name"),
        path_prefix=_field(body, "path_prefix"),
        upstream=_field(body, "upstream"),
        signature=_field(body, "signature", required=False, default="required"),
        content_types=_field(body, "content_types", list, required=False),
        algorithms=_field(body, "algorithms", list, required=False),
        replay_window=_field(body, "replay_window", int, required=False),
        replay_iat=_field(body, "replay_iat", required=False),
        replay_id=_field(body, "replay_id", required=False),
        sign_responses=_field(body, "sign_responses", bool, required=False),
    )
    return web.json_response(product, status=201)


async def organisations(request: web.Request) -> web.Response:
    who = require_principal(request)
    return web.json_response(await _registry(request).list_orgs(who))


async def add_organisation(request: web.Request) -> web.Response:
    who = require_operator(request)
    body = await _json_body(request)
    org = await _registry(request).add_org(who, _field(body, "slug"), _field(body, "name", required=False))
    return web.json_response(org, status=201)


async def users(request: web.Request) -> web.Response:
    who = require_principal(request)
    return web.json_response(await _registry(request).list_users(who, request.query.get("org")))


async def add_user(request: web.Request) -> web.Response:
    who = require_operator(request)
    body = await _json_body(request)
    user = await _registry(request).add_user(
        who,
        _field(body, "email"),
        org=_field(body, "organisation", required=False),
        roles=_field(body, "roles", list),
        password=_field(body, "password", required=False),
    )
    return web.json_response(user, status=201)


async def certificates(request: web.Request) -> web.Response:
    who = require_principal(request)
    rows = await _registry(request).list_certificates(
        who,
        request.query.get("env"),
        org=request.query.get("org"),
        include_removed=request.query.get("include_removed") in ("1", "true"),
    )
    return web.json_response(rows)


async def certificate(request: web.Request) -> web.Response:
    who = require_principal(request)
    fingerprint = request.match_info["fingerprint"].lower().replace(":", "")
    rows = await _registry(request).list_certificates(who, request.query.get("env"), include_removed=True)
    match = [r for r in rows if r["fingerprint"] == fingerprint]
    if not match:
        return web.json_response(
            {"error": {"code": "certificate_not_found", "message": f"no certificate {fingerprint[:16]}…"}},
            status=404,
        )
    return web.json_response(match[-1])


async def add_certificate(request: web.Request) -> web.Response:
    """JSON ``{"environment", "use", "certificate"}`` (PEM text, or base64 DER in
    ``certificate_der``), or multipart with fields environment, use and file."""
    who = require_principal(request)
    fields, data = await _upload(request, "certificate")
    env, use = _field(fields, "environment"), _field(fields, "use")
    row = await _registry(request).add_certificate(who, env, use, data)
    return web.json_response(row, status=201)


async def _upload(request: web.Request, field: str) -> tuple[dict[str, Any], bytes]:
    """The other fields and the file of an upload: multipart (a ``file`` part), or JSON with
    ``field`` as PEM text or ``field + "_der"`` as base64 DER."""
    if request.content_type.startswith("multipart/"):
        form = await read_form(request)
        upload = form.get("file")
        data = upload.file.read() if isinstance(upload, web.FileField) else str(upload or "").encode()
        return {k: str(v) for k, v in form.items() if k != "file"}, data
    body = await _json_body(request)
    if f"{field}_der" in body:
        try:
            return body, base64.b64decode(_field(body, f"{field}_der"), validate=True)
        except (binascii.Error, ValueError):
            raise RegistryError(f"{field}_der is not base64", code="field_invalid") from None
    return body, _field(body, field).encode()


def _days(value: Any) -> int | None:
    if value in (None, ""):
        return None
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    if isinstance(value, str) and value.strip().isdigit():
        return int(value)
    raise RegistryError("days must be a whole number of days", code="field_invalid")


async def request_certificate(request: web.Request) -> web.Response:
    """A CSR for the environment's issuing CA: JSON ``{"environment", "use", "csr", "days"?}``
    (PEM text, or base64 DER in ``csr_der``), or multipart with fields environment, use, days
    and file. Answers the registered certificate with ``certificate_pem`` and ``chain_pem``."""
    who = require_principal(request)
    fields, data = await _upload(request, "csr")
    env, use = str(fields.get("environment", "")), str(fields.get("use", ""))
    if not env or not use:
        raise RegistryError(
            "give the environment and the certificate use (mtls or signature)", code="field_missing"
        )
    row = await _registry(request).issue_certificate(
        who, env, use, data, issuer=await issuer_for(request, env), days=_days(fields.get("days"))
    )
    return web.json_response(row, status=201)


async def certificate_pem(request: web.Request) -> web.Response:
    who = require_principal(request)
    return web.json_response(await _registry(request).certificate_pem(who, request.match_info["fingerprint"]))


async def remove_certificate(request: web.Request) -> web.Response:
    who = require_principal(request)
    env = request.query.get("env")
    if not env:
        raise RegistryError("say which environment: ?env=cat", code="field_missing")
    row = await _registry(request).remove_certificate(who, env, request.match_info["fingerprint"])
    return web.json_response(row)


async def projects(request: web.Request) -> web.Response:
    who = require_principal(request)
    return web.json_response(await _registry(request).list_projects(who, request.query.get("org")))


async def create_project(request: web.Request) -> web.Response:
    who = require_principal(request)
    body = await _json_body(request)
    return web.json_response(await _registry(request).create_project(who, _field(body, "name")), status=201)


def _project_id(request: web.Request) -> int:
    try:
        return int(request.match_info["project"])
    except ValueError:
        raise RegistryError("project ids are numbers", code="field_invalid") from None


async def project(request: web.Request) -> web.Response:
    who = require_principal(request)
    return web.json_response(await _registry(request).project(who, _project_id(request)))


async def add_project_product(request: web.Request) -> web.Response:
    """Idempotent; answers with the project as it now is."""
    who = require_principal(request)
    await _registry(request).set_project_product(
        who, _project_id(request), request.match_info["product"], request.match_info["env"], present=True
    )
    return web.json_response(await _registry(request).project(who, _project_id(request)))


async def remove_project_product(request: web.Request) -> web.Response:
    """Idempotent; answers with the project as it now is."""
    who = require_principal(request)
    await _registry(request).set_project_product(
        who, _project_id(request), request.match_info["product"], request.match_info["env"], present=False
    )
    return web.json_response(await _registry(request).project(who, _project_id(request)))


async def delete_project(request: web.Request) -> web.Response:
    who = require_principal(request)
    await _registry(request).delete_project(who, _project_id(request))
    return web.json_response({"ok": True})


async def tokens(request: web.Request) -> web.Response:
    who = require_principal(request)
    return web.json_response(await _registry(request).list_tokens(who))


async def create_token(request: web.Request) -> web.Response:
    who = require_principal(request)
    body = await _json_body(request)
    token = await _registry(request).create_token(who, _field(body, "name", required=False, default="api"))
    return web.json_response({"token": token, "note": "shown once: store it now"}, status=201)


async def revoke_token(request: web.Request) -> web.Response:
    who = require_principal(request)
    try:
        token_id = int(request.match_info["token"])
    except ValueError:
        raise RegistryError("token ids are numbers", code="field_invalid") from None
    await _registry(request).revoke_token(who, token_id)
    return web.json_response({"ok": True})


async def audit_log(request: web.Request) -> web.Response:
    who = require_principal(request)
    try:
        limit = int(request.query.get("limit", "200"))
    except ValueError:
        raise RegistryError("limit must be a number", code="field_invalid") from None
    return web.json_response(
        await _registry(request).audit_entries(who, limit=limit, org=request.query.get("org"))
    )


async def audit_verify(request: web.Request) -> web.Response:
    require_operator(request)
    report = await _registry(request).verify_audit(request.query.get("expect_head"))
    return web.json_response(report.to_dict())


async def openapi(request: web.Request) -> web.Response:
    return web.Response(text=json.dumps(openapi_document(ROUTES), indent=2), content_type="application/json")


# --- the route table (also the OpenAPI document) -------------------------------------------

_CSR_BODY = {
    "type": "object",
    "required": ["environment", "use"],
    "properties": {
        "environment": {"type": "string", "example": "prod"},
        "use": {"type": "string", "enum": ["mtls", "signature"]},
        "csr": {"type": "string", "description": "PEM text of a PKCS#10 certificate signing request"},
        "csr_der": {"type": "string", "description": "base64 of a DER CSR"},
        "days": {"type": "integer", "description": "validity (default: the environment's maximum)"},
    },
}
_CERT_BODY = {
    "type": "object",
    "required": ["environment", "use"],
    "properties": {
        "environment": {"type": "string", "example": "cat"},
        "use": {"type": "string", "enum": ["mtls", "signature"]},
        "certificate": {"type": "string", "description": "PEM text of one certificate"},
        "certificate_der": {"type": "string", "description": "base64 of a DER certificate"},
    },
}

ROUTES: list[Route] = [
    Route("GET", "/api/v1/me", me, "The calling user", tags=("account",)),
    Route("GET", "/api/v1/environments", environments, "Environments", tags=("environments",)),
    Route(
        "POST",
        "/api/v1/environments",
        save_environment,
        "Create or update an environment",
        "operators",
        {
            "type": "object",
            "required": ["id"],
            "properties": {
                "id": _STR,
                "name": _STR,
                "allow_self_signed": {"type": "boolean"},
                "ca_pem": _STR,
                "gateway_port": {"type": "integer"},
            },
        },
        tags=("environments",),
    ),
    Route("GET", "/api/v1/products", products, "API products", tags=("products",)),
    Route(
        "POST",
        "/api/v1/products",
        save_product,
        "Create or update an API product",
        "operators",
        {
            "type": "object",
            "required": ["id", "name", "path_prefix", "upstream"],
            "properties": {
                "id": _STR,
                "name": _STR,
                "path_prefix": _STR,
                "upstream": _STR,
                "signature": {"type": "string", "enum": ["required", "optional", "none"]},
                "content_types": {"type": "array", "items": _STR},
                "algorithms": {"type": "array", "items": _STR},
                "replay_window": {
                    "type": "integer",
                    "minimum": 0,
                    "description": "refuse replays: signing time within ± seconds, ids once (0: off)",
                },
                "replay_iat": {"type": "string", "description": "payload field (iat) or header:<name>"},
                "replay_id": {"type": "string", "description": "payload field (jti) or header:<name>"},
                "sign_responses": {"type": "boolean", "description": "the gateway signs JSON answers"},
            },
        },
        tags=("products",),
    ),
    Route(
        "GET",
        "/api/v1/organisations",
        organisations,
        "Organisations (operators: all; others: their own)",
        tags=("organisations",),
    ),
    Route(
        "POST",
        "/api/v1/organisations",
        add_organisation,
        "Create an organisation",
        "operators",
        {"type": "object", "required": ["slug"], "properties": {"slug": _STR, "name": _STR}},
        tags=("organisations",),
    ),
    Route(
        "GET",
        "/api/v1/users",
        users,
        "Users (operators: all, ?org=; others: their organisation)",
        query=("org",),
        tags=("users",),
    ),
    Route(
        "POST",
        "/api/v1/users",
        add_user,
        "Create a user",
        "operators",
        {
            "type": "object",
            "required": ["email", "roles"],
            "properties": {
                "email": _STR,
                "organisation": _STR,
                "password": _STR,
                "roles": {
                    "type": "array",
                    "items": {"type": "string", "enum": ["api_security", "developer", "operator"]},
                },
            },
        },
        tags=("users",),
    ),
    Route(
        "GET",
        "/api/v1/certificates",
        certificates,
        "Registered certificates of the caller's organisation",
        query=("env", "org", "include_removed"),
        tags=("certificates",),
    ),
    Route(
        "POST",
        "/api/v1/certificates",
        add_certificate,
        "Register a certificate (MTLS or Digital Signature)",
        "API Security role",
        _CERT_BODY,
        tags=("certificates",),
        multipart=True,
    ),
    Route(
        "POST",
        "/api/v1/certificates/requests",
        request_certificate,
        "Submit a CSR: the environment's issuing CA issues the certificate, which is registered",
        "API Security role",
        _CSR_BODY,
        tags=("certificates",),
        multipart=True,
    ),
    Route(
        "GET",
        "/api/v1/certificates/{fingerprint}/pem",
        certificate_pem,
        "A certificate as PEM, with its chain when the environment's issuing CA issued it",
        tags=("certificates",),
    ),
    Route(
        "GET",
        "/api/v1/certificates/{fingerprint}",
        certificate,
        "One certificate by SHA-256 fingerprint",
        query=("env",),
        tags=("certificates",),
    ),
    Route(
        "DELETE",
        "/api/v1/certificates/{fingerprint}",
        remove_certificate,
        "Remove a certificate",
        "API Security role",
        query=("env",),
        tags=("certificates",),
    ),
    Route(
        "GET",
        "/api/v1/projects",
        projects,
        "Projects and their API products",
        query=("org",),
        tags=("projects",),
    ),
    Route(
        "POST",
        "/api/v1/projects",
        create_project,
        "Create a project",
        "Developer role",
        {"type": "object", "required": ["name"], "properties": {"name": _STR}},
        tags=("projects",),
    ),
    Route(
        "GET",
        "/api/v1/projects/{project}",
        project,
        "One project and its API products",
        tags=("projects",),
    ),
    Route(
        "DELETE",
        "/api/v1/projects/{project}",
        delete_project,
        "Delete a project",
        "Developer role",
        tags=("projects",),
    ),
    Route(
        "PUT",
        "/api/v1/projects/{project}/products/{env}/{product}",
        add_project_product,
        "Add an API product to a project in an environment",
        "Developer role",
        tags=("projects",),
    ),
    Route(
        "DELETE",
        "/api/v1/projects/{project}/products/{env}/{product}",
        remove_project_product,
        "Remove an API product from a project in an environment",
        "Developer role",
        tags=("projects",),
    ),
    Route("GET", "/api/v1/tokens", tokens, "The caller's API tokens", tags=("account",)),
    Route(
        "POST",
        "/api/v1/tokens",
        create_token,
        "Create an API token (shown once)",
        body={"type": "object", "properties": {"name": _STR}},
        tags=("account",),
    ),
    Route(
        "DELETE",
        "/api/v1/tokens/{token}",
        revoke_token,
        "Revoke one of the caller's tokens",
        tags=("account",),
    ),
    Route(
        "GET",
        "/api/v1/audit",
        audit_log,
        "Audit log (operators: all; others: their organisation)",
        query=("limit", "org"),
        tags=("audit",),
    ),
    Route(
        "GET",
        "/api/v1/audit/verify",
        audit_verify,
        "Verify the audit hash chain",
        "operators",
        query=("expect_head",),
        tags=("audit",),
    ),
    *ACCOUNT_ROUTES,
]


def add_routes(app: web.Application) -> None:
    for route in ROUTES:
        app.router.add_route(route.method, route.path, route.handler)
    app.router.add_get("/api/v1/openapi.json", openapi)
