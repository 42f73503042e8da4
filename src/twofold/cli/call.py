"""`twofold call`: curl for mTLS + JWS APIs."""

from __future__ import annotations

import json
import sys
from typing import Any
from urllib.parse import urlsplit

import click
import httpx
from click.core import ParameterSource
from cryptography import x509

from twofold.cli._common import (
    EXIT_HTTP,
    err,
    examples,
    fail,
    passphrase_options,
    passphrase_source,
    print_json,
    read_input,
    write_file,
)
from twofold.client import (
    JOSE,
    LEGACY_XML,
    ResponseSignatureError,
    ResponseVerifier,
    client_context,
    explain_tls_failure,
    signing_auth,
)
from twofold.crypto import certs
from twofold.errors import ClientError, UsageError


def _body(data: str | None) -> bytes | None:
    if data is None:
        return None
    if data.startswith("@"):
        return read_input(data[1:] or "-")
    return data.encode()


def _headers(values: tuple[str, ...]) -> list[tuple[str, str]]:
    parsed = []
    for value in values:
        name, sep, rest = value.partition(":")
        if not sep or not name.strip():
            raise UsageError(f"bad header {value!r}: write it as 'Name: value'")
        parsed.append((name.strip(), rest.strip()))
    return parsed


def _tls_facts(response: httpx.Response) -> dict[str, Any]:
    stream = response.extensions.get("network_stream")
    ssl_object = stream.get_extra_info("ssl_object") if stream is not None else None
    if ssl_object is None:
        return {}
    facts: dict[str, Any] = {"version": ssl_object.version(), "cipher": ssl_object.cipher()[0]}
    der = ssl_object.getpeercert(True)  # httpcore hands out the bare _ssl object: no keywords
    if der:
        server = x509.load_der_x509_certificate(der)
        facts["server_certificate"] = {
            "subject": server.subject.rfc4514_string(),
            "issuer": server.issuer.rfc4514_string(),
            "not_after": server.not_valid_after_utc.isoformat(),
            "sha256_fingerprint": certs.fingerprint_sha256(server),
        }
    return facts


def _pretty(content: bytes, content_type: str) -> str:
    text = content.decode("utf-8", "replace")
    if "json" in content_type or text.lstrip().startswith(("{", "[")):
        try:
            return json.dumps(json.loads(text), indent=2, ensure_ascii=False)
        except ValueError:
            pass
    return text


@click.command(
    "call",
    help="Call an API over mutual TLS, optionally sending the body as a compact JWS — as "
    "`curl --cert --key` does, plus the signature. The body is sent exactly as given "
    "(`-d @file` reads a file, `-d @-` stdin). Without --sign-key a body is sent as "
    "application/json; with it, the body is replaced by its JWS (RS256) and sent as "
    "application/jose (or --content-type text/xml for legacy gateways). Prints the response "
    "body, pretty when JSON. Exit codes: 0 ok, 3 TLS/connection failure, 4 HTTP status >= 400."
    + examples(
        "twofold call https://localhost:8443/accessapi/balance --cert mtls.crt --key mtls.key --cacert ca.pem",
        "twofold call https://localhost:8443/tsapi/v1/payments -d @payment.json \\\n"
        "      --cert mtls.crt --key mtls.key --sign-key sign.key --sign-cert sign.crt --cacert ca.pem -v",
        "twofold call https://localhost:8443/accessapi/balance --cert mtls.crt --key mtls.key -o balance.json",
        "twofold call https://api.bank.example/x --cert client.p12 --passphrase-file p.txt -d '{\"a\":1}'",
        "twofold call https://localhost:8443/tsapi/v1/payments -d @payment.json --cert mtls.crt --key mtls.key \\\n"
        "      --sign-key sign.key --cacert ca.pem --verify-response https://localhost:8000/.well-known/jwks.json",
    ),
)
@click.argument("url")
@click.option("-X", "--request", "method", help="HTTP method (default GET, or POST when -d is given).")
@click.option(
    "-H", "--header", "header_values", multiple=True, help="Extra header 'Name: value' (repeatable)."
)
@click.option("-d", "--data", help="Body: a string, @file, or @- for stdin.")
@click.option("--cert", help="Client certificate (PEM/DER; or a PKCS#12 / combined PEM given as --key).")
@click.option("--key", help="Client private key (any format: PKCS#1/8, SEC1, PEM/DER, encrypted, PKCS#12).")
@passphrase_options(what="the client key")
@click.option("--sign-key", help="Sign the body with this private key (the Digital Signature key).")
@click.option(
    "--sign-cert",
    help="The signing certificate: the JWS header names it by its SHA-256 thumbprint (x5t#S256).",
)
@click.option("--x5t", "x5t_cert", hidden=True, help="Same as --sign-cert (the name `twofold jws sign` had).")
@passphrase_options(prefix="sign-", what="the signing key")
@click.option("--kid", help="JWS kid header value.")
@click.option("--alg", default=None, help="JWS algorithm (default RS256; ES256 for P-256 keys).")
@click.option(
    "--content-type",
    type=click.Choice([JOSE, LEGACY_XML]),
    default=JOSE,
    show_default=True,
    help="Content-Type of a signed body.",
)
@click.option(
    "--cacert",
    envvar="TWOFOLD_CACERT",
    help="CA certificate(s) that issued the server's certificate (`twofold serve`: data/ca/ca.crt). "
    "Env: TWOFOLD_CACERT.",
)
@click.option("-k", "--insecure", is_flag=True, help="Do not check the server's certificate (unsafe).")
@click.option("-v", "--verbose", is_flag=True, help="Show TLS version, server certificate, what was signed.")
@click.option("-i", "--include", is_flag=True, help="Print the response status line and headers.")
@click.option("--raw", is_flag=True, help="Print the body as received (no pretty JSON).")
@click.option(
    "-o", "--output", "output", help="Write the response body, as received, to this file ('-': stdout)."
)
@click.option("--json", "as_json", is_flag=True, help="Print status, headers, body and TLS facts as JSON.")
@click.option(
    "--verify-response",
    "verify_response",
    metavar="JWKS",
    help="Verify the gateway's signed response (application/jose) against this JWKS — the portal's "
    "https://…/.well-known/jwks.json or a file — and print its JSON payload; exit 1 when a 2xx "
    "answer is unsigned or its signature does not hold.",
)
@click.option(
    "--timeout",
    type=click.FloatRange(0, 3600, min_open=True),
    default=30.0,
    show_default=True,
    help="Seconds.",
)
def call(
    url: str,
    method: str | None,
    header_values: tuple[str, ...],
    data: str | None,
    cert: str | None,
    key: str | None,
    passphrase_file: str | None,
    passphrase_env: str | None,
    sign_key: str | None,
    sign_cert: str | None,
    x5t_cert: str | None,
    sign_passphrase_file: str | None,
    sign_passphrase_env: str | None,
    kid: str | None,
    alg: str | None,
    content_type: str,
    cacert: str | None,
    insecure: bool,
    verbose: bool,
    include: bool,
    raw: bool,
    output: str | None,
    as_json: bool,
    verify_response: str | None,
    timeout: float,
) -> None:
    parts = urlsplit(url)
    if parts.scheme not in ("https", "http") or not parts.netloc:
        raise UsageError(f"{url!r} is not an https:// URL")
    if parts.scheme == "http" and (cert or key):
        https = parts._replace(scheme="https").geturl()
        raise UsageError(f"a client certificate is only sent over TLS: call {https}, not http://")
    if insecure and click.get_current_context().get_parameter_source("cacert") is ParameterSource.ENVIRONMENT:
        cacert = None  # -k says it for this call: TWOFOLD_CACERT does not contradict it
    if cacert and insecure:
        raise UsageError("give --cacert or --insecure, not both")
    if sign_cert and x5t_cert and sign_cert != x5t_cert:
        raise UsageError("--x5t is another name for --sign-cert: give one")
    sign_cert = sign_cert or x5t_cert
    if output and as_json:
        raise UsageError("give -o FILE or --json, not both")
    if sign_cert and not sign_key:
        raise UsageError("--sign-cert names the certificate of --sign-key: give the signing key too")
    body = _body(data)
    method = (method or ("POST" if body is not None else "GET")).upper()
    headers = _headers(header_values)
    if body is not None and not any(n.lower() == "content-type" for n, _ in headers):
        headers.append(("Content-Type", "application/json"))
    verify: bool | str = False if insecure else (cacert or True)
    context = client_context(
        cert=cert,
        key=key,
        passphrase=passphrase_source(passphrase_file, passphrase_env, key or cert or ""),
        verify=verify,
    )
    auth = None
    if sign_key:
        auth = signing_auth(
            sign_key,
            passphrase=passphrase_source(sign_passphrase_file, sign_passphrase_env, sign_key, "sign-"),
            alg=alg,
            kid=kid,
            signing_cert=sign_cert,
            content_type=content_type,
        )
    sent_cert = cert is not None or key is not None
    host = parts.netloc
    try:
        with httpx.Client(verify=context, timeout=timeout) as client:
            request = client.build_request(method, url, headers=headers, content=body)
            response = client.send(request, auth=auth) if auth else client.send(request)
            tls = _tls_facts(response)  # while the connection is open: closed, it has no TLS facts
    except httpx.TransportError as exc:
        error = explain_tls_failure(exc, sent_client_cert=sent_cert, host=host)
        if parts.scheme == "http" and error.code.startswith("tls_"):  # there was no TLS to blame
            error = ClientError(
                f"{host} closed the connection on a plain http:// request: if it speaks TLS, call https://",
                code="connect_closed",
            )
        fail(error)
    sent = response.request
    signed_payload = sent.extensions.get("twofold.signed_payload")
    received = response  # as it arrived (a signed one: its JWS), for -v
    if verify_response:
        try:
            response = ResponseVerifier(verify_response, verify=verify, timeout=timeout).verified(response)
        except ResponseSignatureError as refused:
            fail(refused)
    if verbose:
        _show_verbose(sent, received, tls, signed_payload, auth)
        signature = response.extensions.get("twofold.response_header")
        if signature:
            err.print(f"* response signature verified: {json.dumps(signature)}", markup=False)
    content_type_in = response.headers.get("content-type", "")
    if as_json:
        try:
            parsed_body: object = response.json()
        except ValueError:
            parsed_body = response.text
        print_json(
            {
                "status": response.status_code,
                "headers": dict(response.headers),
                "body": parsed_body,
                "tls": tls,
                "signed": signed_payload is not None,
            }
        )
    else:
        if include:
            click.echo(f"{response.http_version} {response.status_code} {response.reason_phrase}")
            for name, value in response.headers.items():
                click.echo(f"{name}: {value}")
            click.echo()
        if output:
            write_file(output, response.content, force=True)
            if output != "-":
                err.print(
                    f"wrote {len(response.content)} bytes of HTTP {response.status_code} to {output}",
                    markup=False,
                )
        elif raw:
            sys.stdout.buffer.write(response.content)
        else:
            click.echo(_pretty(response.content, content_type_in))
    if response.status_code >= 400:
        message = f"HTTP {response.status_code} {response.reason_phrase}"
        try:
            error = response.json().get("error", {})
            message += f": {error.get('code')}: {error.get('message')}"
        except (ValueError, AttributeError):
            pass
        err.print(f"[bold red]error[/][dim]\\[http_{response.status_code}][/]: {message}", markup=True)
        sys.exit(EXIT_HTTP)


def _show_verbose(
    sent: httpx.Request, response: httpx.Response, tls: dict[str, Any], signed: bytes | None, auth: Any
) -> None:
    if tls:
        err.print(f"* TLS {tls['version'].replace('TLSv', '')}, cipher {tls['cipher']}")
        server = tls.get("server_certificate")
        if server:
            err.print(f"* server certificate: {server['subject']}")
            err.print(f"*   issued by {server['issuer']}, expires {server['not_after']}")
            err.print(f"*   SHA-256 {server['sha256_fingerprint']}")
    if signed is not None:
        header = json.dumps(
            {k: v for k, v in (("alg", auth.alg), ("kid", auth.kid), ("x5t#S256", auth.x5t_s256)) if v}
        )
        err.print(
            f"* signed {len(signed)} payload bytes as JWS {header}; sent {len(sent.content)} bytes "
            f"as {sent.headers.get('content-type')}"
        )
    err.print(f"> {sent.method} {sent.url.raw_path.decode()} HTTP/1.1")
    for name, value in sent.headers.items():
        err.print(f"> {name}: {value}")
    err.print(f"< {response.http_version} {response.status_code} {response.reason_phrase}")
    for name, value in response.headers.items():
        err.print(f"< {name}: {value}")
