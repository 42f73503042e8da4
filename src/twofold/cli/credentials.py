"""`twofold key`, `twofold csr`, `twofold cert` and `twofold init`: credentials."""

from __future__ import annotations

import datetime as dt
import os
from pathlib import Path

import click

from twofold.cli._common import (
    err,
    examples,
    new_passphrase,
    out,
    passphrase_options,
    passphrase_source,
    print_json,
    read_file,
    read_input,
    self_command,
    write_file,
)
from twofold.crypto import certs, keys
from twofold.crypto.certs import CertificateInfo
from twofold.running import running_serves, serve_for

DEFAULT_SUBJECT_HELP = (
    "Distinguished name, OpenSSL style: '/C=US/ST=NY/L=New York/O=Acme/OU=Treasury/CN=acme-cat' "
    "(or RFC 4514: 'CN=acme-cat,O=Acme,C=US')."
)


def _load_key(path: str, passphrase_file: str | None, passphrase_env: str | None) -> keys.PrivateKey:
    data = read_file(path, "the key file")
    return keys.load_private_key(data, passphrase_source(passphrase_file, passphrase_env, path), name=path)


# --- key ---------------------------------------------------------------------------------


@click.group(help="Private keys." + examples("twofold key new --out mtls.key"))
def key() -> None:
    pass


@key.command(
    "new",
    help="Generate a private key (PKCS#8 PEM, file mode 0600)."
    + examples(
        "twofold key new --out mtls.key",
        "twofold key new --type ec --curve P-256 --out sign.key",
        "twofold key new --bits 3072 --der --out key.der        # PKCS#8 DER, as Java reads",
        "twofold key new --passphrase-file pass.txt --out enc.key",
    ),
)
@click.option("--type", "kind", type=click.Choice(["rsa", "ec"]), default="rsa", show_default=True)
@click.option("--bits", type=click.Choice(["2048", "3072", "4096"]), default="2048", show_default=True)
@click.option("--curve", default="P-256", show_default=True, help="EC curve: P-256, P-384 or P-521.")
@click.option("--out", "out_path", required=True, help="Where to write the key ('-' for stdout).")
@click.option("--der", is_flag=True, help="Write PKCS#8 DER instead of PEM.")
@click.option(
    "--passphrase-file",
    type=click.Path(exists=True, dir_okay=False),
    help="Encrypt the key with the passphrase in this file (AES-256, PBKDF2).",
)
@click.option("--force", is_flag=True, help="Overwrite an existing file.")
@click.option("--json", "as_json", is_flag=True, help="Print a JSON summary.")
def key_new(
    kind: str,
    bits: str,
    curve: str,
    out_path: str,
    der: bool,
    passphrase_file: str | None,
    force: bool,
    as_json: bool,
) -> None:
    private = keys.generate_private_key(kind, bits=int(bits), curve=curve)
    data = keys.private_key_bytes(private, der=der, passphrase=new_passphrase(passphrase_file))
    write_file(out_path, data, secret=True, force=force)
    summary = {
        "file": out_path,
        "key": keys.describe_key(private),
        "format": "PKCS#8 DER" if der else "PKCS#8 PEM",
        "encrypted": bool(passphrase_file),
    }
    if as_json:
        print_json(summary)
    elif out_path != "-":
        enc = ", encrypted" if passphrase_file else ""
        err.print(f"wrote {summary['key']} private key to {out_path} ({summary['format']}{enc}, mode 0600)")


# --- csr ---------------------------------------------------------------------------------


@click.group(help="Certificate signing requests, for a certificate authority.")
def csr() -> None:
    pass


@csr.command(
    "new",
    help="Make a CSR (PEM) for a key, to send to a certificate authority."
    + examples(
        "twofold csr new --key mtls.key --subject '/C=US/ST=NY/L=New York/O=Acme/OU=Treasury/CN=acme-cat' "
        "--out mtls.csr",
        "openssl req -in mtls.csr -noout -verify -subject",
    ),
)
@click.option("--key", "key_path", required=True, help="The private key the CSR is made with.")
@click.option("--subject", required=True, help=DEFAULT_SUBJECT_HELP)
@click.option(
    "--san", multiple=True, help="Subject alternative name: DNS:x, IP:1.2.3.4, email:x (repeatable)."
)
@click.option("--out", "out_path", default="-", show_default=True, help="Where to write the CSR.")
@click.option("--force", is_flag=True, help="Overwrite an existing file.")
@passphrase_options()
def csr_new(
    key_path: str,
    subject: str,
    san: tuple[str, ...],
    out_path: str,
    force: bool,
    passphrase_file: str | None,
    passphrase_env: str | None,
) -> None:
    private = _load_key(key_path, passphrase_file, passphrase_env)
    request = certs.build_csr(private, subject, sans=san)
    write_file(out_path, certs.csr_pem(request), force=force)
    if out_path != "-":
        err.print(f"wrote CSR for {request.subject.rfc4514_string()} to {out_path}")


# --- cert --------------------------------------------------------------------------------


@click.group(help="Certificates: self-signed client certificates, and inspection.")
def cert() -> None:
    pass


@cert.command(
    "selfsign",
    help="Make a self-signed certificate for a key (SHA-256; KeyUsage digitalSignature; "
    "ExtendedKeyUsage clientAuth for --use mtls)."
    + examples(
        "twofold cert selfsign --key mtls.key --subject '/O=Acme/CN=acme-cat' --out mtls.crt",
        "twofold cert selfsign --key sign.key --subject '/O=Acme/CN=acme-sign' --use signature --out sign.crt",
    ),
)
@click.option("--key", "key_path", required=True, help="The private key to certify.")
@click.option("--subject", required=True, help=DEFAULT_SUBJECT_HELP)
@click.option("--days", type=click.IntRange(1, 3650), default=365, show_default=True)
@click.option(
    "--use",
    type=click.Choice(["mtls", "signature"]),
    default="mtls",
    show_default=True,
    help="mtls adds EKU clientAuth; signature marks the key for non-repudiation.",
)
@click.option("--san", multiple=True, help="Subject alternative name (repeatable).")
@click.option("--out", "out_path", default="-", show_default=True)
@click.option("--force", is_flag=True, help="Overwrite an existing file.")
@passphrase_options()
def cert_selfsign(
    key_path: str,
    subject: str,
    days: int,
    use: str,
    san: tuple[str, ...],
    out_path: str,
    force: bool,
    passphrase_file: str | None,
    passphrase_env: str | None,
) -> None:
    private = _load_key(key_path, passphrase_file, passphrase_env)
    certificate = certs.self_signed_certificate(
        private, subject, days=days, usage="client" if use == "mtls" else "signature", sans=san
    )
    write_file(out_path, certs.certificate_pem(certificate), force=force)
    if out_path != "-":
        err.print(
            f"wrote self-signed certificate for {certificate.subject.rfc4514_string()} to {out_path} "
            f"(valid {days} days, SHA-256 {certs.fingerprint_sha256(certificate)})"
        )


def _print_info(info: CertificateInfo) -> None:
    def row(label: str, value: object) -> None:
        out.print(f"[bold]{label:<22}[/]{value}")

    row("Subject", info.subject)
    row("Issuer", info.issuer + ("  (self-signed)" if info.self_signed else ""))
    row("Serial", info.serial)
    left = f"{info.days_left} days left"
    colour = "red" if info.days_left < 30 else "green"
    row("Valid", f"{info.not_before} → {info.not_after}  [{colour}]{left}[/]")
    row("Key", info.key)
    row("Signature", info.signature_algorithm)
    row("SHA-256 fingerprint", info.sha256_fingerprint)
    row("x5t#S256", info.x5t_s256)
    row("SHA-1 thumbprint", info.sha1_thumbprint)
    row("Key usage", ", ".join(info.key_usage) or "-")
    row("Extended key usage", ", ".join(info.extended_key_usage or []) or "- (any)")
    if info.subject_alt_names:
        row("Alt names", ", ".join(info.subject_alt_names))
    for warning in info.warnings:
        out.print(f"[bold yellow]warning:[/] {warning}")


@cert.command(
    "show",
    help="Describe a certificate: subject, issuer, validity, key, fingerprints (SHA-256, x5t#S256, "
    "SHA-1 thumbprint) and warnings. --json output is stable for scripts: one object, with any "
    'further certificates of a bundle under "chain".'
    + examples("twofold cert show mtls.crt", "twofold cert show --json mtls.crt | jq -r .sha1_thumbprint"),
)
@click.argument("file", default="-")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
def cert_show(file: str, as_json: bool) -> None:
    data = read_input(file)
    listed = certs.load_certificates(data, name="stdin" if file == "-" else file)
    now = dt.datetime.now(dt.UTC)
    infos = [certs.describe_certificate(c, now) for c in listed]
    if as_json:
        result = infos[0].to_dict()
        result["chain"] = [i.to_dict() for i in infos[1:]]
        print_json(result)
        return
    for index, info in enumerate(infos):
        if index:
            out.print()
            out.print(f"[dim]— certificate {index + 1} of {len(infos)} —[/]")
        _print_info(info)


# --- init --------------------------------------------------------------------------------


@click.command(
    "init",
    help="The authentication utility: in one command, a key + CSR + self-signed certificate for "
    "mTLS and a separate key + CSR + self-signed certificate for the digital signature."
    + examples(
        "twofold init --cn acme-cat",
        "twofold init --cn acme-cat --subject '/C=US/ST=NY/O=Acme/OU=Treasury' --out ./credentials",
    ),
)
@click.option(
    "--cn", required=True, help="Common Name of the mTLS certificate (the signature one gets '-sign')."
)
@click.option("--subject", help="Rest of the subject, e.g. '/C=US/O=Acme/OU=Treasury' (CN is set from --cn).")
@click.option("--out", "out_dir", default=None, help="Directory to write to (default: ./<cn>).")
@click.option("--type", "kind", type=click.Choice(["rsa", "ec"]), default="rsa", show_default=True)
@click.option("--bits", type=click.Choice(["2048", "3072", "4096"]), default="2048", show_default=True)
@click.option("--days", type=click.IntRange(1, 3650), default=365, show_default=True)
@click.option(
    "--passphrase-file",
    type=click.Path(exists=True, dir_okay=False),
    help="Encrypt both private keys with this passphrase.",
)
@click.option("--force", is_flag=True, help="Overwrite existing files.")
@click.option("--json", "as_json", is_flag=True, help="Print the files and fingerprints as JSON.")
def init(
    cn: str,
    subject: str | None,
    out_dir: str | None,
    kind: str,
    bits: str,
    days: int,
    passphrase_file: str | None,
    force: bool,
    as_json: bool,
) -> None:
    directory = Path(out_dir or cn)
    secret = new_passphrase(passphrase_file)
    made: dict[str, dict[str, str]] = {}
    for use, name, suffix in (("mtls", "mtls", ""), ("signature", "sign", "-sign")):
        private = keys.generate_private_key(kind, bits=int(bits))
        name_obj = certs.subject_from_cn(cn + suffix, subject)
        request = certs.build_csr(private, name_obj)
        certificate = certs.self_signed_certificate(
            private, name_obj, days=days, usage="client" if use == "mtls" else "signature"
        )
        paths = {ext: directory / f"{name}.{ext}" for ext in ("key", "csr", "crt")}
        write_file(paths["key"], keys.private_key_bytes(private, passphrase=secret), secret=True, force=force)
        write_file(paths["csr"], certs.csr_pem(request), force=force)
        write_file(paths["crt"], certs.certificate_pem(certificate), force=force)
        made[use] = {
            "key": str(paths["key"]),
            "csr": str(paths["csr"]),
            "certificate": str(paths["crt"]),
            "common_name": cn + suffix,
            "sha256_fingerprint": certs.fingerprint_sha256(certificate),
            "sha1_thumbprint": certs.sha1_thumbprint(certificate),
        }
    if as_json:
        print_json(made)
        return
    for use, info in made.items():
        label = "mTLS" if use == "mtls" else "Digital Signature"
        out.print(f"[bold]{label}[/] ({info['common_name']})")
        out.print(f"  key          {info['key']}  (mode 0600 — keep it secret)")
        out.print(f"  CSR          {info['csr']}  (for a CA-signed certificate, e.g. Production)")
        out.print(f"  certificate  {info['certificate']}  (self-signed, {days} days)")
        out.print(f"  SHA-256      {info['sha256_fingerprint']}")
    for line in next_steps(made["mtls"], made["signature"]):
        out.print(line, markup=False, highlight=False)


def _shown(path: Path) -> str:
    """A path as a person would type it here: relative when under the current directory."""
    try:
        return str(path.resolve().relative_to(Path.cwd().resolve()))
    except ValueError:
        return str(path)


def next_steps(mtls: dict[str, str], sign: dict[str, str]) -> list[str]:
    """What to run next, with the ports and CA of the running serve when one can be found:
    the one of TWOFOLD_DATA (default ./data), else the only one running."""
    serve = serve_for(Path(os.environ.get("TWOFOLD_DATA") or "data"))
    if serve is None:
        serves = running_serves()
        serve = serves[0] if len(serves) == 1 else None
    gateway = serve.gateways.get("cat", "https://localhost:8443") if serve else "https://localhost:8443"
    portal = serve.portal if serve else "https://localhost:8000"
    ca = ""
    if serve and serve.ca:
        ca = _shown(serve.ca)
    elif Path("data/ca/ca.crt").is_file():
        ca = "data/ca/ca.crt"
    cacert = f" --cacert {ca or 'DATA/ca/ca.crt'}"  # DATA: the serve's data directory
    exports = [f"TWOFOLD_PORTAL={os.environ.get('TWOFOLD_PORTAL') or portal}"]
    if os.environ.get("TWOFOLD_CACERT"):
        cacert = ""  # twofold call takes it from there, as the portal commands do
    else:
        exports.append(f"TWOFOLD_CACERT={ca or 'DATA/ca/ca.crt'}")
    if not os.environ.get("TWOFOLD_TOKEN"):
        exports.append("TWOFOLD_TOKEN=tf_…   # your token: the portal's API tokens page")
    tf = self_command()
    lines = [
        "",
        "Next: register the certificates on the portal's Security page (Add Security), or with its API:",
        f"  export {' '.join(exports)}",
        f"  {tf} portal cert add --env cat --use mtls {mtls['certificate']}",
        f"  {tf} portal cert add --env cat --use signature {sign['certificate']}",
        "add the API products to a project (Projects page, or):",
        f"  {tf} portal project add treasury",
        f"  {tf} portal project product add treasury --env cat balance payments",
        "then call the APIs:",
        f"  {tf} call {gateway}/accessapi/balance --cert {mtls['certificate']} --key {mtls['key']}{cacert}",
        f'  {tf} call {gateway}/tsapi/v1/payments -d \'{{"payments": {{"paymentIdentifiers": '
        f'{{"endToEndId": "E2E-1"}}}}}}\' --cert {mtls["certificate"]} --key {mtls["key"]} '
        f"--sign-key {sign['key']} --sign-cert {sign['certificate']}{cacert}",
    ]
    if not ca and not os.environ.get("TWOFOLD_CACERT"):
        lines.append(
            "(DATA/ca/ca.crt: the CA in the data directory of your `twofold serve`, which prints it)"
        )
    return lines
