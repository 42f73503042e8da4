"""`twofold serve`: portal + gateways + sandbox in one command."""

from __future__ import annotations

from typing import Any

import click

from twofold.cli._common import err, examples, self_command


def _announce(message: str) -> None:
    err.print(f"[cyan]twofold:[/] {message}")


@click.command(
    "serve",
    help="Run the portal, one gateway per environment and the sandbox API in one process. "
    "The first start creates the data directory, a local CA and a server certificate for localhost, "
    "the environments cat (8443) and prod (9443), the sandbox products and an operator account whose "
    "one-time password is printed."
    + examples(
        "twofold serve",
        "twofold serve --data /var/lib/twofold --workers 2",
        "twofold serve --db postgresql://twofold@db.internal/twofold --host 0.0.0.0",
        "twofold serve --config twofold.toml",
        "twofold serve --edge nginx   # behind nginx: twofold edge config nginx",
    ),
)
@click.option("--data", help="Data directory (database, CA, server certificate). Default ./data.")
@click.option("--db", envvar="TWOFOLD_DB", help="Database URL (default: SQLite in the data directory).")
@click.option(
    "--config", "config_file", type=click.Path(dir_okay=False), help="TOML file with these settings."
)
@click.option("--host", help="Address the portal and gateways listen on (default 127.0.0.1).")
@click.option("--portal-port", type=click.IntRange(1, 65535), help="Portal port (default 8000).")
@click.option(
    "--admin-port", type=click.IntRange(1, 65535), help="Health/metrics port on loopback (default 9100)."
)
@click.option(
    "--workers", type=click.IntRange(1, 64), help="Gateway processes sharing the ports (default 1)."
)
@click.option("--no-access-log", is_flag=True, help="Do not print one JSON line per gateway request.")
@click.option(
    "--edge",
    type=click.Choice(["nginx", "haproxy", "envoy"]),
    help="TLS terminates at this edge: the gateways take plain HTTP and the client certificate "
    "header from it, on unix sockets (see `twofold edge config`).",
)
def serve_command(
    data: str | None,
    db: str | None,
    config_file: str | None,
    host: str | None,
    portal_port: int | None,
    admin_port: int | None,
    workers: int | None,
    no_access_log: bool,
    edge: str | None,
) -> None:
    from twofold.serve import serve  # the servers' modules, only for the command that runs them
    from twofold.settings import ServeConfig

    config = ServeConfig.load(
        config_file,
        data=data,
        db=db,
        host=host,
        portal_port=portal_port,
        admin_port=admin_port,
        workers=workers,
        access_log=False if no_access_log else None,
        edge=edge,
    )

    def ready(facts: dict[str, Any]) -> None:
        err.print()
        err.print(
            f"[bold green]twofold is running[/] (database {facts['db']}, {facts['workers']} gateway process(es))"
        )
        err.print(f"  portal    {facts['portal']}")
        edge = facts.get("edge")
        for env, url in facts["gateways"].items():
            if edge:
                err.print(f"  gateway   {edge['listen'].get(env, '-')}  ({env}, behind {edge['edge']})")
            else:
                err.print(f"  gateway   {url}  ({env})")
        if edge:
            err.print(f"            the edge's configuration: twofold edge config {edge['edge']}")
        err.print(f"  admin     {facts['admin']}/metrics  /healthz  /readyz")
        if facts["workers"] > 1:
            err.print(f"            (for all {facts['workers']} gateway processes of this node)")
        err.print(f"  CA        {facts['ca']}   (clients: --cacert {facts['ca']})")
        err.print(f"  next      in another terminal: {self_command()} demo    — Ctrl-C stops")

    serve(config, _announce, ready)
