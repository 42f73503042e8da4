"""The `twofold` command: noun-verb, one module per noun."""

from __future__ import annotations

import click

from twofold import __version__
from twofold.cli import admin_catalogue  # noqa: F401 (registers the catalogue's `admin` commands)
from twofold.cli._common import Group
from twofold.cli.admin import admin
from twofold.cli.call import call
from twofold.cli.credentials import cert, csr, init, key
from twofold.cli.demo import demo
from twofold.cli.doctor import doctor
from twofold.cli.edge import edge
from twofold.cli.jws import jws_group
from twofold.cli.portal import portal
from twofold.cli.portal_projects import project
from twofold.cli.rotate import rotate
from twofold.cli.serve import serve_command


@click.group(
    cls=Group,
    context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 110},
    help="""twofold — mutual TLS plus JWS-signed request bodies.

\b
Client toolkit:
  init     key + CSR + self-signed certificate for mTLS and for signing, in one go
  key      private keys          csr   certificate signing requests
  cert     certificates          jws   sign / verify compact JWS
  call     curl for mTLS + JWS APIs
  doctor   why does a call fail? every check, with what to do

\b
Provider side:
  serve    portal + gateway per environment + sandbox API, in one command
  demo     walk the whole flow against a running serve
  edge     the TLS edge (nginx, HAProxy, Envoy) in front of serve --edge: its configuration
  admin    operator tasks on the registry (orgs, users, tokens, products, audit)
  portal   certificates and projects through the portal API (CI pipelines)
  rotate   replace credentials with zero downtime (new key, register, probe, switch, remove old)

\b
Exit codes: 0 ok, 1 refused or failed, 2 usage, 3 TLS/connection failure, 4 HTTP >= 400.

\b
Start here:
  $ twofold init --cn acme-cat
  $ twofold cert show acme-cat/mtls.crt
""",
)
@click.version_option(__version__, prog_name="twofold")
def main() -> None:
    pass


main.add_command(init)
main.add_command(key)
main.add_command(csr)
main.add_command(cert)
main.add_command(jws_group, "jws")
main.add_command(call)
main.add_command(doctor)
main.add_command(serve_command, "serve")
main.add_command(demo)
main.add_command(edge)
main.add_command(admin)
portal.add_command(project)
main.add_command(portal)
main.add_command(rotate)
