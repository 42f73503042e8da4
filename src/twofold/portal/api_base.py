"""What the JSON API's modules share: the registry and reading JSON bodies."""

from __future__ import annotations

from typing import Any

from aiohttp import web

from twofold.portal.web import REGISTRY, check_json_text
from twofold.registry.rules import RegistryError
from twofold.registry.service import Registry


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
