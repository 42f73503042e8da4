"""`twofold portal project …`: projects and their API products, through the portal's API —
what a Developer does on the Projects page, for CLI-only users and CI."""

from __future__ import annotations

from typing import Any
from urllib.parse import quote

import click

from twofold.cli._common import err, examples, print_json, table
from twofold.cli.portal import Portal, connect, portal_options
from twofold.errors import TwofoldError


def find_project(portal: Portal, ref: str) -> dict[str, Any]:
    """A project by its name (exact, else the one whose name matches ignoring case) or id."""
    projects: list[dict[str, Any]] = portal.call("GET", "/api/v1/projects")
    for match in (
        [p for p in projects if p["name"] == ref],
        [p for p in projects if p["name"].casefold() == ref.strip().casefold()],
        [p for p in projects if ref.isdigit() and p["id"] == int(ref)],
    ):
        if len(match) == 1:
            return match[0]
    names = ", ".join(repr(p["name"]) for p in projects) or "none yet"
    raise TwofoldError(
        f"your organisation has no project {ref!r} (its projects: {names}); "
        f"`twofold portal project add {ref!r}` creates it",
        code="project_not_found",
    )


def _products(project: dict[str, Any]) -> str:
    by_env: dict[str, list[str]] = {}
    for link in project["products"]:
        by_env.setdefault(link["environment"], []).append(link["product"])
    return "; ".join(f"{env}: {', '.join(names)}" for env, names in sorted(by_env.items())) or "-"


@click.group(
    help="Projects of your organisation and the API products in them, per environment: the gateway "
    "lets your organisation call a product only if one of its projects has it in that environment. "
    "Changing them needs the Developer role."
    + examples(
        "twofold portal project add treasury",
        "twofold portal project product add treasury --env cat balance payments",
        "twofold portal project list",
    )
)
def project() -> None:
    pass


@project.command("list", help="List your organisation's projects and their API products.")
@click.option("--json", "as_json", is_flag=True)
@portal_options
def project_list(as_json: bool, portal_url: str, token: str | None, cacert: str | None) -> None:
    rows = connect(portal_url, token, cacert).call("GET", "/api/v1/projects")
    if as_json:
        print_json(rows)
        return
    table(
        ["PROJECT", "ID", "API PRODUCTS"],
        [[row["name"], str(row["id"]), _products(row)] for row in rows],
        empty="no projects yet: `twofold portal project add NAME` creates one",
    )


@project.command("add", help="Create a project." + examples("twofold portal project add treasury"))
@click.argument("name")
@click.option("--json", "as_json", is_flag=True)
@portal_options
def project_add(name: str, as_json: bool, portal_url: str, token: str | None, cacert: str | None) -> None:
    row = connect(portal_url, token, cacert).call("POST", "/api/v1/projects", json={"name": name})
    if as_json:
        print_json(row)
        return
    err.print(f"created project {row['name']} (id {row['id']})", markup=False)


@project.command(
    "rm", help="Delete a project (by name or id)." + examples("twofold portal project rm treasury")
)
@click.argument("project_ref", metavar="PROJECT")
@portal_options
def project_rm(project_ref: str, portal_url: str, token: str | None, cacert: str | None) -> None:
    portal = connect(portal_url, token, cacert)
    found = find_project(portal, project_ref)
    portal.call("DELETE", f"/api/v1/projects/{found['id']}")
    err.print(f"deleted project {found['name']}", markup=False)


@project.group("product", help="API products of a project, per environment.")
def product() -> None:
    pass


def _change(
    portal_url: str,
    token: str | None,
    cacert: str | None,
    project_ref: str,
    env_id: str,
    products: tuple[str, ...],
    method: str,
    as_json: bool,
) -> None:
    portal = connect(portal_url, token, cacert)
    found = find_project(portal, project_ref)
    row = found
    for product_id in products:
        row = portal.call(
            method,
            f"/api/v1/projects/{found['id']}/products/{quote(env_id, safe='')}/{quote(product_id, safe='')}",
        )
    if as_json:
        print_json(row)
        return
    verb = "added to" if method == "PUT" else "removed from"
    err.print(
        f"{', '.join(products)} {verb} project {row['name']} in {env_id}; it now has: {_products(row)}",
        markup=False,
    )


def _product_command(name: str, method: str, help_text: str, example: str) -> click.Command:
    """`product add` and `product rm`: the same command, PUT or DELETE per product."""

    @product.command(name, help=help_text + examples(example))
    @click.argument("project_ref", metavar="PROJECT")
    @click.argument("products", nargs=-1, required=True, metavar="PRODUCT...")
    @click.option("--env", "env_id", required=True, help="Environment id, e.g. cat or prod.")
    @click.option("--json", "as_json", is_flag=True)
    @portal_options
    def command(
        project_ref: str,
        products: tuple[str, ...],
        env_id: str,
        as_json: bool,
        portal_url: str,
        token: str | None,
        cacert: str | None,
    ) -> None:
        _change(portal_url, token, cacert, project_ref, env_id, products, method, as_json)

    return command


product_add = _product_command(
    "add",
    "PUT",
    "Add API products to a project in an environment (which there are: `twofold portal product list`).",
    "twofold portal project product add treasury --env cat balance payments",
)
product_rm = _product_command(
    "rm",
    "DELETE",
    "Remove API products from a project in an environment; calls to them are refused at once.",
    "twofold portal project product rm treasury --env cat payments",
)

__all__ = ["project"]
