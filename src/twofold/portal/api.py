"""The versioned JSON API (``/api/v1``): everything the pages do, for scripts and CI.

Authenticated by personal API tokens (``Authorization: Bearer tf_…``). Errors are
``{"error": {"code": …, "message": …}}`` with a 4xx status and a stable code.
"""

from __future__ import annotations

import base64
import binascii
import json
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web

from twofold import __version__
from twofold.portal.web import REGISTRY, check_json_text, read_form, require_operator, require_principal
from twofold.registry.rules import RegistryError
from twofold.registry.service import Registry

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


@dataclass(frozen=True)
class Route:
    method: str
    path: str
    handler: Handler
    summary: str
    who: str = "any user"  # shown in the OpenAPI description
    body: dict[str, Any] | None = None  # JSON schema of the request body
    query: tuple[str, ...] = ()
    tags: tuple[str, ...] = field(default_factory=tuple)


def _registry(request: web.Request) -> Registry:
    return request.app[REGISTRY]


async def _json_body(request: web.Request) -> dict[str, Any]:
    if not request.can_read_body:
        return {}
    try:
        body = await request.json()
    except (ValueError, LookupError):  # not JSON, not UTF-8 (UnicodeDecodeError), unknown charset
        raise RegistryError("the request body is not valid JSON", code="bad_json") from None
    except RecursionError:
        raise RegistryError(
            "the request body is nested too deeply; a request is a flat JSON object", code="bad_json"
        ) from None
    if not isinstance(body, dict):
        raise RegistryError("the request body must be a JSON object", code="bad_json")
    check_json_text(body)
    return body


def _field(
    body: dict[str, Any], name: str, kind: type = str, *, required: bool = True, default: Any = None
) -> Any:
    value = body.get(name, default)
    if value is None:
        if required:
            raise RegistryError(f"the field {name!r} is required", code="field_missing")
        return default
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise RegistryError(f"the field {name!r} must be a {kind.__name__}", code="field_invalid")
    return value


# --- handlers ------------------------------------------------------------------------------


async def me(request: web.Request) -> web.Response:
    who = require_principal(request)
    return web.json_response({"email": who.name, "organisation": who.org_slug, "roles": sorted(who.roles)})


async def environments(request: web.Request) -> web.Response:
    require_principal(request)
    return web.json_response(await _registry(request).list_environments())


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
    if request.content_type.startswith("multipart/"):
        form = await read_form(request)
        upload = form.get("file")
        data = upload.file.read() if isinstance(upload, web.FileField) else str(upload or "").encode()
        env, use = str(form.get("environment", "")), str(form.get("use", ""))
    else:
        body = await _json_body(request)
        env, use = _field(body, "environment"), _field(body, "use")
        if "certificate_der" in body:
            try:
                data = base64.b64decode(_field(body, "certificate_der"), validate=True)
            except (binascii.Error, ValueError):
                raise RegistryError("certificate_der is not base64", code="field_invalid") from None
        else:
            data = _field(body, "certificate").encode()
    row = await _registry(request).add_certificate(who, env, use, data)
    return web.json_response(row, status=201)


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
    return web.Response(text=json.dumps(openapi_document(), indent=2), content_type="application/json")


# --- the route table (also the OpenAPI document) -------------------------------------------

_STR = {"type": "string"}
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
]


def openapi_document() -> dict[str, Any]:
    error = {
        "description": "refused",
        "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Error"}}},
    }
    paths: dict[str, dict[str, Any]] = {}
    for route in ROUTES:
        params = [
            {"name": name, "in": "path", "required": True, "schema": _STR}
            for name in _path_params(route.path)
        ]
        params += [{"name": name, "in": "query", "required": False, "schema": _STR} for name in route.query]
        op: dict[str, Any] = {
            "summary": route.summary,
            "description": f"Allowed for: {route.who}.",
            "operationId": f"{route.method.lower()}_{route.handler.__name__}",
            "tags": list(route.tags),
            "parameters": params,
            "security": [{"token": []}],
            "responses": {
                "200" if route.method != "POST" else "201": {
                    "description": "ok",
                    "content": {"application/json": {}},
                },
                "400": error,
                "401": error,
                "403": error,
                "404": error,
                "409": error,
            },
        }
        if route.body is not None:
            op["requestBody"] = {"required": True, "content": {"application/json": {"schema": route.body}}}
            if route.handler is add_certificate:
                op["requestBody"]["content"]["multipart/form-data"] = {
                    "schema": {
                        "type": "object",
                        "properties": {
                            "environment": _STR,
                            "use": _STR,
                            "file": {"type": "string", "format": "binary"},
                        },
                    }
                }
        paths.setdefault(route.path, {})[route.method.lower()] = op
    return {
        "openapi": "3.0.3",
        "info": {
            "title": "twofold portal API",
            "version": __version__,
            "description": "Register mTLS and Digital Signature certificates, projects and API products.",
        },
        "paths": paths,
        "components": {
            "securitySchemes": {
                "token": {"type": "http", "scheme": "bearer", "description": "a personal API token (tf_…)"}
            },
            "schemas": {
                "Error": {
                    "type": "object",
                    "required": ["error"],
                    "properties": {
                        "error": {
                            "type": "object",
                            "required": ["code", "message"],
                            "properties": {"code": _STR, "message": _STR},
                        }
                    },
                }
            },
        },
    }


def _path_params(path: str) -> list[str]:
    return [part[1:-1] for part in path.split("/") if part.startswith("{")]


def add_routes(app: web.Application) -> None:
    for route in ROUTES:
        app.router.add_route(route.method, route.path, route.handler)
    app.router.add_get("/api/v1/openapi.json", openapi)
