"""The client walkthrough of the README, run for real against a throwaway local mTLS endpoint
(`twofold.devserver.EchoServer`): init → show → sign → verify → call (with curl too).

Every step prints the command as a person would type it, then runs it.
"""

from __future__ import annotations

import json
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

from twofold.crypto import certs
from twofold.devserver import EchoServer

WORK = Path("walkthrough")
TWOFOLD = str(Path(sys.executable).with_name("twofold"))


def step(title: str, *args: str, stdout: Path | None = None) -> str:
    shown = " ".join(shlex.quote(a) for a in args) + (f" > {stdout}" if stdout else "")
    print(f"\n\033[1m# {title}\033[0m\n$ {shown}", flush=True)
    argv = [TWOFOLD if a == "twofold" else a for a in args]
    result = subprocess.run(argv, capture_output=True, text=True, check=False)
    if stdout is not None:
        stdout.write_text(result.stdout)
    else:
        print(result.stdout, end="")
    print(result.stderr, end="", file=sys.stderr, flush=True)
    if result.returncode != 0:
        sys.exit(f"step failed with exit code {result.returncode}")
    return result.stdout


def main() -> None:
    if WORK.exists():
        shutil.rmtree(WORK)
    WORK.mkdir()
    creds = WORK / "acme-cat"
    step(
        "1. Keys, CSRs and self-signed certificates for mTLS and for signing",
        "twofold",
        "init",
        "--cn",
        "acme-cat",
        "--subject",
        "/C=US/ST=NY/L=New York/O=Acme/OU=Treasury",
        "--out",
        str(creds),
    )
    step("2. Inspect the mTLS certificate", "twofold", "cert", "show", str(creds / "mtls.crt"))
    payment = WORK / "payment.json"
    payment.write_text(
        json.dumps(
            {
                "paymentIdentifiers": {"endToEndId": "E2E-WALKTHROUGH-1"},
                "value": {"amount": "125.50", "currency": "USD"},
                "debtor": {"account": "000123456789"},
                "creditor": {"account": "000987654321", "name": "Globex"},
            },
            indent=2,
        )
        + "\n"
    )
    token = WORK / "payment.jws"
    step(
        "3. Sign the payment as a compact JWS (RS256)",
        "twofold",
        "jws",
        "sign",
        "--key",
        str(creds / "sign.key"),
        "--sign-cert",
        str(creds / "sign.crt"),
        str(payment),
        stdout=token,
    )
    print(token.read_text()[:100] + "…")
    step(
        "4. Verify it with the signature certificate",
        "twofold",
        "jws",
        "verify",
        "--cert",
        str(creds / "sign.crt"),
        str(token),
    )

    mtls = certs.load_certificate((creds / "mtls.crt").read_bytes())
    sign = certs.load_certificate((creds / "sign.crt").read_bytes())
    with EchoServer(trusted=[mtls], signature_certs=[sign]) as server:
        ca = WORK / "ca.pem"
        ca.write_bytes(server.ca_pem)
        print(
            f"\n\033[1m# A local mTLS endpoint listens on {server.url}\033[0m (it trusts only "
            f"{creds}/mtls.crt; its own certificate is issued by {ca})"
        )
        common = ["--cert", str(creds / "mtls.crt"), "--key", str(creds / "mtls.key"), "--cacert", str(ca)]
        step(
            "5. Call it over mTLS without a signature",
            "twofold",
            "call",
            f"{server.url}/accessapi/balance",
            *common,
        )
        step(
            "6. Call it with a signed body (-v shows TLS and what was signed)",
            "twofold",
            "call",
            f"{server.url}/tsapi/v1/payments",
            "-d",
            f"@{payment}",
            *common,
            "--sign-key",
            str(creds / "sign.key"),
            "--sign-cert",
            str(creds / "sign.crt"),
            "-v",
        )
        if shutil.which("curl"):
            step(
                "7. The same signed call with curl, as a bank's documentation shows it",
                "curl",
                "-sS",
                "--cert",
                str(creds / "mtls.crt"),
                "--key",
                str(creds / "mtls.key"),
                "--cacert",
                str(ca),
                "--header",
                "Content-Type: application/jose",
                "--data",
                f"@{token}",
                f"{server.url}/tsapi/v1/payments",
            )
            print()
    print(f"\n\033[1;32mDone.\033[0m Files are in {WORK}/.")


if __name__ == "__main__":
    main()
