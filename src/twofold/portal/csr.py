"""Pages for certificates issued from CSRs: "Submit a CSR" in the Security page's Add
Security dialog, and downloads of registered certificates (PEM, and the issuing CA's chain)."""

from __future__ import annotations

from urllib.parse import quote

from aiohttp import web

from twofold.errors import TwofoldError
from twofold.portal.pages import _form, _redirect, _registry, _security, _signed_in
from twofold.portal.web import error_status, issuer_for
from twofold.registry.rules import RegistryError

routes = web.RouteTableDef()


@routes.post("/security/certificates/request")
async def request_certificate(request: web.Request) -> web.StreamResponse:
    who = _signed_in(request)
    form = await _form(request)
    env_id, use = str(form.get("environment", "")), str(form.get("use", ""))
    upload = form.get("file")
    data = upload.file.read() if isinstance(upload, web.FileField) else b""
    days_text = str(form.get("days", "")).strip()
    try:
        if days_text and not days_text.isdigit():
            raise RegistryError("the validity must be a whole number of days", code="field_invalid")
        row = await _registry(request).issue_certificate(
            who,
            env_id,
            use,
            data,
            issuer=await issuer_for(request, env_id),
            days=int(days_text) if days_text else None,
        )
    except TwofoldError as error:
        return await _security(request, env_id, status=error_status(error), error=error, use=use, form="csr")
    raise _redirect(
        request,
        f"/security?env={quote(env_id)}&issued={row['fingerprint']}",
        f"Issued and registered {row['use_label']} certificate {row['common_name']} (serial {row['serial']}); "
        "download it below",
    )


@routes.get(r"/security/certificates/{fingerprint:[0-9a-fA-F:]+}/{what:certificate|chain}.pem")
async def download(request: web.Request) -> web.Response:
    who = _signed_in(request)
    got = await _registry(request).certificate_pem(who, request.match_info["fingerprint"])
    what = request.match_info["what"]
    text = got["certificate_pem"] if what == "certificate" else got["chain_pem"]
    if not text:
        raise RegistryError(
            "this certificate was not issued by the environment's issuing CA, so there is no chain to "
            "download here",
            code="chain_not_available",
            status=404,
        )
    name = "".join(c if c.isalnum() or c in "-_." else "_" for c in got["common_name"]) or "certificate"
    return web.Response(
        text=text,
        content_type="application/x-pem-file",
        headers={
            "Content-Disposition": f'attachment; filename="{name}{"-chain" if what == "chain" else ""}.pem"'
        },
    )
