"""`twofold edge config nginx|haproxy|envoy`: the TLS edge's configuration for `serve --edge`."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import click

from twofold.cli._common import examples
from twofold.cli._registry import with_registry
from twofold.edge_config import Plan, Site, render
from twofold.errors import UsageError
from twofold.gateway.edge import socket_path
from twofold.registry.service import Registry
from twofold.settings import ServeConfig


@click.group(help="The TLS edge in front of `twofold serve --edge` (nginx, HAProxy, Envoy).")
def edge() -> None:
    pass


def _ports(values: tuple[str, ...]) -> dict[str, int]:
    ports = {}
    for value in values:
        env, sep, port = value.partition("=")
        if not sep or not port.isdigit() or not 0 < int(port) < 65536:
            raise UsageError(f"--port takes ENV=PORT (e.g. cat=443), not {value!r}")
        ports[env] = int(port)
    return ports


def plan_for(
    config: ServeConfig,
    edge_name: str,
    envs: list[dict[str, Any]],
    *,
    ports: dict[str, int],
    listen: str | None = None,
    cert: Path | None = None,
    key: Path | None = None,
    ca: Path | None = None,
    run_dir: Path | None = None,
    user: str | None = None,
    pem: Path | None = None,
) -> Plan:
    """Where the edge listens (each environment's port, or ``ports``) and where twofold
    listens for it (the unix sockets of every gateway process, or the environments' ports
    when twofold listens on ports for ``edge_proxies``)."""
    sockets = config.edge_sockets if config.edge else config.data / "edge"
    twofold_host = "127.0.0.1" if config.host in ("0.0.0.0", "::", "") else config.host  # noqa: S104
    sites = []
    for env in envs:
        port = config.gateway_port(env)
        if not port:
            continue
        if sockets is not None:
            upstreams = tuple(str(socket_path(sockets, env["id"], i)) for i in range(config.workers))
            public = ports.get(env["id"], port)
        else:
            upstreams = (f"{twofold_host}:{port}",)
            if env["id"] not in ports:
                raise UsageError(
                    f"twofold listens on port {port} for environment {env['id']} (edge_proxies): give the "
                    f"edge's own port, e.g. --port {env['id']}={port + 10000}"
                )
            public = ports[env["id"]]
        sites.append(Site(env["id"], public, upstreams))
    if not sites:
        raise UsageError("no environment has a gateway port: nothing for the edge to serve")
    comments = []
    if config.edge != edge_name:
        comments.append(
            f'twofold must run with --edge {edge_name} (or edge = "{edge_name}" in its settings) behind it.'
        )
    return Plan(
        edge=edge_name,
        sites=tuple(sites),
        listen=listen or config.host,
        cert=cert or config.data / "tls" / "server.crt",
        key=key or config.data / "tls" / "server.key",
        ca=ca or config.data / "ca" / "ca.crt",
        run_dir=run_dir or Path(f"/run/twofold-{edge_name}"),
        max_body=config.max_body,
        upstream_timeout=config.upstream_timeout,
        user=user,
        pem=pem,
        comments=comments,
    )


@edge.command(
    "config",
    help="Print a working configuration of the TLS edge for this twofold (its settings and "
    "environments): mutual TLS that passes every client certificate on for twofold to judge, "
    "the certificate forwarded in the edge's header, keep-alive connections to twofold.",
    epilog=examples(
        "twofold edge config nginx --config twofold.toml > /etc/nginx/nginx.conf",
        "twofold edge config haproxy --data /var/lib/twofold --user haproxy",
        "twofold edge config envoy --port cat=443 --port prod=8443",
    ),
)
@click.argument("name", type=click.Choice(["nginx", "haproxy", "envoy"]))
@click.option("--config", "config_file", type=click.Path(dir_okay=False), help="twofold's TOML settings.")
@click.option("--data", help="twofold's data directory (default ./data).")
@click.option(
    "--db", envvar="TWOFOLD_DB", help="Registry database URL (default: SQLite in the data directory)."
)
@click.option("--port", "ports", multiple=True, help="ENV=PORT: the edge's port for an environment.")
@click.option("--listen", help="Address the edge listens on (default: twofold's host setting).")
@click.option(
    "--cert", type=click.Path(path_type=Path), help="Server certificate (default <data>/tls/server.crt)."
)
@click.option("--key", type=click.Path(path_type=Path), help="Its key (default <data>/tls/server.key).")
@click.option(
    "--ca",
    type=click.Path(path_type=Path),
    help="A CA file for HAProxy and Envoy, which need one to ask for client certificates; it "
    "decides nothing (default <data>/ca/ca.crt).",
)
@click.option("--pem", type=click.Path(path_type=Path), help="HAProxy: certificate and key in one file.")
@click.option(
    "--run-dir", type=click.Path(path_type=Path), help="The edge's pid file, logs, temporary files."
)
@click.option("--user", help="The user the edge's workers run as (nginx, HAProxy).")
def config_command(
    name: str,
    config_file: str | None,
    data: str | None,
    db: str | None,
    ports: tuple[str, ...],
    listen: str | None,
    cert: Path | None,
    key: Path | None,
    ca: Path | None,
    pem: Path | None,
    run_dir: Path | None,
    user: str | None,
) -> None:
    config = ServeConfig.load(config_file, data=data, db=db)
    envs = with_registry(str(config.data), config.db, Registry.list_environments)  # never creates one
    plan = plan_for(
        config,
        name,
        envs,
        ports=_ports(ports),
        listen=listen,
        cert=cert,
        key=key,
        ca=ca,
        run_dir=run_dir,
        user=user,
        pem=pem,
    )
    click.echo(render(plan), nl=False)
