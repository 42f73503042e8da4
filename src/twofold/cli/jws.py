"""`twofold jws sign|verify`: compact JWS on the command line."""

from __future__ import annotations

import json
import sys

import click

from twofold.cli._common import (
    EXIT_FAILURE,
    examples,
    fail,
    passphrase_options,
    passphrase_source,
    print_json,
    read_file,
    read_input,
)
from twofold.crypto import certs, jws, keys
from twofold.errors import JWSError, TwofoldError, UsageError

ALGS = click.Choice(["RS256", "RS384", "RS512", "PS256", "PS384", "PS512", "ES256", "ES384", "ES512"])


@click.group(help="Sign and verify compact JWS (RFC 7515).")
def jws_group() -> None:
    pass


@jws_group.command(
    "sign",
    help="Print the compact JWS of a payload, signed with exactly its bytes (no re-serialising "
    "unless --canonical). Reads FILE, or stdin when FILE is '-' or absent."
    + examples(
        "twofold jws sign --key sign.key payment.json",
        "twofold jws sign --key sign.key --sign-cert sign.crt payment.json   # header names the certificate",
        "echo '{\"a\":1}' | twofold jws sign --key sign.key --kid 3F2A… -",
    ),
)
@click.argument("file", required=False, default="-")
@click.option("--key", "key_path", required=True, help="Signing private key (any format, PKCS#12 too).")
@click.option("--alg", type=ALGS, default=None, help="Algorithm (default RS256; ES256 for P-256 keys).")
@click.option("--kid", help="Key ID header value (often the certificate's SHA-1 thumbprint).")
@click.option(
    "--sign-cert",
    "x5t_cert",
    help="The signing certificate: its SHA-256 thumbprint goes in the x5t#S256 header.",
)
@click.option("--x5t", "x5t_alias", hidden=True, help="Same as --sign-cert (its earlier name).")
@click.option("--typ", help="typ header value (e.g. JOSE).")
@click.option("--canonical", is_flag=True, help="Re-serialise the JSON payload compactly with sorted keys.")
@passphrase_options()
def jws_sign(
    file: str,
    key_path: str,
    alg: str | None,
    kid: str | None,
    x5t_cert: str | None,
    x5t_alias: str | None,
    typ: str | None,
    canonical: bool,
    passphrase_file: str | None,
    passphrase_env: str | None,
) -> None:
    if x5t_cert and x5t_alias and x5t_cert != x5t_alias:
        raise UsageError("--x5t is another name for --sign-cert: give one")
    x5t_cert = x5t_cert or x5t_alias
    if kid and x5t_cert:
        raise UsageError("give --kid or --sign-cert, not both")
    payload = read_input(file)
    if canonical:
        try:
            payload = json.dumps(json.loads(payload), separators=(",", ":"), sort_keys=True).encode()
        except ValueError:
            raise UsageError("--canonical needs a JSON payload, and this is not valid JSON") from None
    creds = keys.load_credentials(
        read_file(key_path, "the key file"),
        passphrase_source(passphrase_file, passphrase_env, key_path),
        name=key_path,
    )
    x5t = None
    if x5t_cert:
        x5t = certs.x5t_s256(certs.load_certificate(read_file(x5t_cert, "the certificate"), name=x5t_cert))
    click.echo(jws.sign(payload, creds.key, alg=alg, kid=kid, x5t_s256=x5t, typ=typ))


@jws_group.command(
    "verify",
    help="Verify a compact JWS and print its payload (exit 0), or say why not (exit 1). Only the "
    "algorithms given with --alg are accepted (default RS256); 'none', HMAC, unknown 'crit' "
    "parameters and the JSON serialization are refused."
    + examples(
        "twofold jws verify --cert sign.crt token.jws",
        "twofold jws sign --key sign.key p.json | twofold jws verify --cert sign.crt",
        "twofold jws verify --key pub.pem --alg PS256 --json token.jws",
    ),
)
@click.argument("file", required=False, default="-")
@click.option(
    "--cert", "cert_paths", multiple=True, help="Certificate of the signer (repeatable: any may match)."
)
@click.option(
    "--key", "key_paths", multiple=True, help="Public key (or private key) of the signer (repeatable)."
)
@click.option(
    "--alg", "algs", type=ALGS, multiple=True, help="Allowed algorithm (repeatable; default RS256)."
)
@click.option("--json", "as_json", is_flag=True, help="Print {valid, header, payload, ...} as JSON.")
def jws_verify(
    file: str, cert_paths: tuple[str, ...], key_paths: tuple[str, ...], algs: tuple[str, ...], as_json: bool
) -> None:
    if not cert_paths and not key_paths:
        raise UsageError("give the signer's --cert or --key")
    candidates: list[jws.VerificationKey] = []
    for path in cert_paths:
        for certificate in certs.load_certificates(read_file(path, "the certificate"), name=path):
            candidates.append(jws.VerificationKey.from_certificate(certificate, label=path))
    for path in key_paths:
        public = keys.load_public_key(read_file(path, "the key file"), name=path)
        candidates.append(jws.VerificationKey(public, label=path))
    token = read_input(file)
    try:
        verified = jws.Verifier(candidates, algorithms=algs or jws.DEFAULT_ALGORITHMS).verify(token)
    except JWSError as error:
        if as_json:
            print_json({"valid": False, "error": {"code": error.code, "message": error.message}})
            sys.exit(EXIT_FAILURE)
        fail(error)
    if as_json:
        try:
            payload: object = json.loads(verified.payload)
        except ValueError:
            payload = verified.payload.decode("utf-8", "replace")
        print_json(
            {
                "valid": True,
                "alg": verified.alg,
                "header": verified.header,
                "signer": verified.key.label,
                "payload": payload,
            }
        )
        return
    sys.stdout.buffer.write(verified.payload)
    if not verified.payload.endswith(b"\n") and sys.stdout.isatty():
        sys.stdout.buffer.write(b"\n")
    sys.stdout.flush()


__all__ = ["TwofoldError", "jws_group"]
