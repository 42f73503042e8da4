"""`twofold admin …`: operator tasks, straight on the registry database."""

from __future__ import annotations

from typing import Any

import click

from twofold.cli._common import (
    EXIT_FAILURE,
    err,
    examples,
    out,
    print_json,
    read_passphrase_file,
    table,
)
from twofold.cli._registry import db_options, with_registry
from twofold.errors import UsageError
from twofold.registry.auth import ROLES, SYSTEM, new_password
from twofold.registry.service import Registry


@click.group(
    help="Operator tasks on the registry database (organisations, users, tokens, products, "
    "environments, audit)."
    + examples(
        "twofold admin org add acme --name 'Acme Corp'",
        "twofold admin user invite --org acme --email sec@acme.example --role api_security",
        "twofold admin token new --email sec@acme.example",
        "twofold admin audit verify",
    )
)
def admin() -> None:
    pass


# --- organisations -------------------------------------------------------------------------


@admin.group(help="Client organisations.")
def org() -> None:
    pass


@org.command(
    "add", help="Create an organisation." + examples("twofold admin org add acme --name 'Acme Corp'")
)
@click.argument("slug")
@click.option("--name", help="Display name (default: the id).")
@click.option("--json", "as_json", is_flag=True)
@db_options
def org_add(slug: str, name: str | None, as_json: bool, data: str | None, db: str | None) -> None:
    row = with_registry(data, db, lambda r: r.add_org(SYSTEM, slug, name))
    print_json(row) if as_json else err.print(f"created organisation {row['slug']} ({row['name']})")


@org.command(
    "rm",
    help="Delete an organisation with its users, tokens and projects. It must have no active "
    "certificate; --remove-certificates removes them first (gateways refuse them at once). The audit "
    "log keeps its history." + examples("twofold admin org rm demo-3f2a1c --remove-certificates"),
)
@click.argument("slug")
@click.option("--remove-certificates", is_flag=True, help="Remove its active certificates first.")
@db_options
def org_rm(slug: str, remove_certificates: bool, data: str | None, db: str | None) -> None:
    async def work(registry: Registry) -> tuple[dict[str, Any], int]:
        removed = 0
        if remove_certificates:
            for row in await registry.list_certificates(SYSTEM, None, org=slug):
                await registry.remove_certificate(SYSTEM, row["environment"], row["fingerprint"])
                removed += 1
        return await registry.delete_org(SYSTEM, slug), removed

    row, removed = with_registry(data, db, work)
    certificates = f", after removing {removed} certificate(s)" if removed else ""
    err.print(
        f"deleted organisation {row['slug']} ({row['name']}) and its {row['users']} user(s){certificates}"
    )


@org.command(
    "webhook",
    help="Where the organisation's certificate expiry notices are also POSTed, as a JWS signed by the "
    "portal's notice key (its JWKS: <portal>/.well-known/jwks.json). --off stops them."
    + examples(
        "twofold admin org webhook acme https://ops.acme.example/twofold/notices",
        "twofold admin org webhook acme --off",
    ),
)
@click.argument("slug")
@click.argument("url", required=False)
@click.option("--off", is_flag=True, help="Send no webhook notices to this organisation.")
@db_options
def org_webhook(slug: str, url: str | None, off: bool, data: str | None, db: str | None) -> None:
    if bool(url) == off:
        raise UsageError("give the webhook URL, or --off")
    row = with_registry(data, db, lambda r: r.set_notice_webhook(SYSTEM, slug, None if off else url))
    if row["notice_webhook"]:
        err.print(f"expiry notices of {row['organisation']} are also POSTed to {row['notice_webhook']}")
    else:
        err.print(f"no webhook notices for {row['organisation']}")


@org.command("list", help="List organisations.")
@click.option("--json", "as_json", is_flag=True)
@db_options
def org_list(as_json: bool, data: str | None, db: str | None) -> None:
    rows = with_registry(data, db, lambda r: r.list_orgs(SYSTEM))
    if as_json:
        print_json(rows)
        return
    table(
        ["ORGANISATION", "NAME"], [[row["slug"], row["name"]] for row in rows], empty="no organisations yet"
    )


# --- users and tokens ------------------------------------------------------------------------


@admin.group(help="Users and their roles.")
def user() -> None:
    pass


@user.command(
    "add",
    help="Create a user. Roles: api_security (may add and remove certificates), developer "
    "(sees them, manages projects), operator (no organisation). Without --password-file a one-time "
    "password is generated and printed."
    + examples(
        "twofold admin user invite --org acme --email sec@acme.example --role api_security",
        "twofold admin user add --org acme --email dev@acme.example --role developer --password-file pw.txt",
        "twofold admin user add --email ops@bank.example --role operator",
    ),
)
@click.option("--email", required=True)
@click.option("--org", "org_slug", help="Organisation id (not for operators).")
@click.option("--role", "roles", multiple=True, required=True, type=click.Choice(ROLES), help="Repeatable.")
@click.option("--password-file", type=click.Path(exists=True, dir_okay=False))
@click.option("--json", "as_json", is_flag=True)
@db_options
def user_add(
    email: str,
    org_slug: str | None,
    roles: tuple[str, ...],
    password_file: str | None,
    as_json: bool,
    data: str | None,
    db: str | None,
) -> None:
    generated = None if password_file else new_password()
    password = read_passphrase_file(password_file).decode() if password_file else generated
    row = with_registry(
        data,
        db,
        lambda r: r.add_user(
            SYSTEM, email, org=org_slug, roles=list(roles), password=password, one_time=generated is not None
        ),
    )
    if as_json:
        print_json({**row, "one_time_password": generated} if generated else row)
        return
    err.print(
        f"created {row['email']} ({', '.join(row['role_labels'])}"
        f"{' in ' + row['organisation'] if row['organisation'] else ''})"
    )
    if generated:
        out.print(f"one-time password: {generated}")


@user.command(
    "invite",
    help="Invite a user: an e-mail with a single-use activation link (valid link_lifetime_hours, "
    "default 72) to choose a password — and, for API Security users and operators, to set up a "
    "second factor. Mail goes through the serve settings' SMTP server, or into <data>/outbox/ "
    "when none is configured. Inviting a user who has not activated yet sends a new link."
    + examples(
        "twofold admin user invite --org acme --email sec@acme.example --role api_security --role developer",
        "twofold admin user invite --email ops@bank.example --role operator --config twofold.toml",
    ),
)
@click.option("--email", required=True)
@click.option("--org", "org_slug", help="Organisation id (not for operators).")
@click.option("--role", "roles", multiple=True, required=True, type=click.Choice(ROLES), help="Repeatable.")
@click.option(
    "--config",
    "config_file",
    type=click.Path(dir_okay=False),
    help="The serve's TOML settings (mail, portal_url).",
)
@click.option("--json", "as_json", is_flag=True)
@db_options
def user_invite(
    email: str,
    org_slug: str | None,
    roles: tuple[str, ...],
    config_file: str | None,
    as_json: bool,
    data: str,
    db: str | None,
) -> None:
    from twofold.mail import make_mailer
    from twofold.portal.mails import send_link
    from twofold.settings import ServeConfig

    explicit = click.get_current_context().get_parameter_source("data") != click.core.ParameterSource.DEFAULT
    config = ServeConfig.load(config_file, data=data if explicit or not config_file else None, db=db)
    mailer = make_mailer(config.mail_settings(), config.data)

    async def work(registry: Registry) -> tuple[Any, str]:
        link = await registry.invite(
            SYSTEM, email, org=org_slug, roles=list(roles), lifetime=config.link_lifetime
        )
        return link, await send_link(mailer, config.public_url, link)

    link, where = with_registry(str(config.data), config.db, work)
    if as_json:
        print_json(
            {
                "email": link.email,
                "organisation": org_slug,
                "roles": list(link.roles),
                "expires_at": link.expires_at.isoformat(timespec="seconds"),
                "mail": where,
            }
        )
        return
    err.print(
        f"invited {link.email}: the link works once, until {link.expires_at:%Y-%m-%d %H:%M} UTC; "
        f"mail {'written to ' + where if not where.startswith('smtp://') else 'sent via ' + where[7:]}"
    )


@user.command(
    "reset-mfa",
    help="Remove a user's lost second factor (and recovery codes): they are signed out everywhere "
    "and set up a new one at their next sign-in. Audited."
    + examples("twofold admin user reset-mfa --email sec@acme.example"),
)
@click.option("--email", required=True)
@db_options
def user_reset_mfa(email: str, data: str, db: str | None) -> None:
    done = with_registry(data, db, lambda r: r.mfa_reset(SYSTEM, email))
    if done["had_second_factor"]:
        err.print(
            f"second factor of {email} reset: signed out everywhere; a new one is set up at the next sign-in"
        )
    else:
        err.print(f"{email} had no second factor; signed out everywhere")


@user.command("list", help="List users.")
@click.option("--org", "org_slug")
@click.option("--json", "as_json", is_flag=True)
@db_options
def user_list(org_slug: str | None, as_json: bool, data: str | None, db: str | None) -> None:
    rows = with_registry(data, db, lambda r: r.list_users(SYSTEM, org_slug))
    if as_json:
        print_json(rows)
        return
    table(
        ["EMAIL", "ORGANISATION", "ROLES", "STATUS", "2FA"],
        [
            [
                row["email"],
                row["organisation"] or "-",
                ", ".join(row["role_labels"]),
                "invited" if row["pending_activation"] else ("active" if row["active"] else "deactivated"),
                "on" if row["second_factor"] else "-",
            ]
            for row in rows
        ],
        empty="no users",
    )


@user.command("password", help="Set a user's password: ends their sessions and revokes their API tokens.")
@click.option("--email", required=True)
@click.option(
    "--password-file",
    type=click.Path(exists=True, dir_okay=False),
    help="Without it, a new one-time password is generated and printed.",
)
@db_options
def user_password(email: str, password_file: str | None, data: str | None, db: str | None) -> None:
    password = read_passphrase_file(password_file).decode() if password_file else new_password()
    with_registry(data, db, lambda r: r.set_password(SYSTEM, email, password, one_time=not password_file))
    err.print(f"password of {email} changed")
    if not password_file:
        out.print(f"one-time password: {password}")


@user.command("deactivate", help="Take access away: sessions end and API tokens are revoked at once.")
@click.option("--email", required=True)
@db_options
def user_deactivate(email: str, data: str | None, db: str | None) -> None:
    with_registry(data, db, lambda r: r.set_active(SYSTEM, email, active=False))
    err.print(f"deactivated {email}: signed out everywhere, API tokens revoked")


@user.command("activate", help="Give a deactivated user sign-in back (their old tokens stay revoked).")
@click.option("--email", required=True)
@db_options
def user_activate(email: str, data: str | None, db: str | None) -> None:
    with_registry(data, db, lambda r: r.set_active(SYSTEM, email, active=True))
    err.print(f"activated {email}")


@admin.group(help="Personal API tokens.")
def token() -> None:
    pass


@token.command("revoke", help="Revoke every API token of a user.")
@click.option("--email", required=True)
@db_options
def token_revoke(email: str, data: str | None, db: str | None) -> None:
    count = with_registry(data, db, lambda r: r.revoke_user_tokens(SYSTEM, email))
    err.print(f"revoked {count} token(s) of {email}")


@token.command(
    "new",
    help="Create an API token for a user and print it (shown once)."
    + examples("export TWOFOLD_TOKEN=$(twofold admin token new --email sec@acme.example)"),
)
@click.option("--email", required=True)
@click.option("--name", default="cli", show_default=True)
@db_options
def token_new(email: str, name: str, data: str | None, db: str | None) -> None:
    click.echo(with_registry(data, db, lambda r: r.create_token(SYSTEM, name, for_email=email)))


# --- audit -----------------------------------------------------------------------------------


@admin.group(help="The hash-chained audit log.")
def audit() -> None:
    pass


@audit.command(
    "verify",
    help="Check the audit log's hash chain: exits 1 if an entry was altered or removed. "
    "Record the printed head hash somewhere safe; --expect-head then also detects entries removed "
    "from the end."
    + examples("twofold admin audit verify", "twofold admin audit verify --expect-head 9f2c…"),
)
@click.option("--expect-head", help="The head hash recorded earlier.")
@click.option("--json", "as_json", is_flag=True)
@db_options
def audit_verify(expect_head: str | None, as_json: bool, data: str | None, db: str | None) -> None:
    report = with_registry(data, db, lambda r: r.verify_audit(expect_head))
    if as_json:
        print_json(report.to_dict())
    elif report.ok:
        out.print(f"[green]audit log intact[/]: {report.entries} entries, head {report.head}")
    else:
        for problem in report.problems:
            err.print(f"[bold red]tampered:[/] {problem}")
    if not report.ok:
        raise SystemExit(EXIT_FAILURE)


@audit.command("log", help="Show recent audit entries.")
@click.option("--limit", type=click.IntRange(1, 1000), default=50, show_default=True)
@click.option("--org", "org_slug")
@click.option("--json", "as_json", is_flag=True)
@db_options
def audit_log(limit: int, org_slug: str | None, as_json: bool, data: str | None, db: str | None) -> None:
    rows = with_registry(data, db, lambda r: r.audit_entries(SYSTEM, limit=limit, org=org_slug))
    if as_json:
        print_json(rows)
        return
    table(
        ["TIME (UTC)", "ACTOR", "ACTION", "OBJECT"],
        [
            [
                row["at"][:19].replace("T", " "),
                row["actor"],
                row["action"],
                f"{row['object_type']} {row['object_id'][:24]}",
            ]
            for row in reversed(rows)
        ],
        empty="no audit entries",
    )


__all__ = ["admin"]
