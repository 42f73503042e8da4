"""The JSON API's route table entries and the OpenAPI 3 document made from them."""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web

from twofold import __version__

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
STR = {"type": "string"}


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
    multipart: bool = False  # the body may also be multipart/form-data (environment, use, file)


def openapi_document(routes: Sequence[Route]) -> dict[str, Any]:
    """The OpenAPI 3 document of the JSON API, made from its route table."""
    error = {
        "description": "refused",
        "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Error"}}},
    }
    paths: dict[str, dict[str, Any]] = {}
    for route in routes:
        params = [
            {"name": name, "in": "path", "required": True, "schema": STR} for name in _path_params(route.path)
        ]
        params += [{"name": name, "in": "query", "required": False, "schema": STR} for name in route.query]
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
            if route.multipart:
                op["requestBody"]["content"]["multipart/form-data"] = {
                    "schema": {
                        "type": "object",
                        "properties": {
                            "environment": STR,
                            "use": STR,
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
                            "properties": {"code": STR, "message": STR},
                        }
                    },
                }
            },
        },
    }


def _path_params(path: str) -> list[str]:
    return [part[1:-1] for part in path.split("/") if part.startswith("{")]
