"""The README, run: its shell blocks in order, as one person's shell session in a fresh
directory beside a real `twofold serve` (what `make run` starts), then its Python block. The
test makes only the substitution a person with another configuration would make — the ports
of that serve, which are free ones here — and fails on the first step that fails.

Afterwards, the repository's .gitignore covers every file the walkthrough wrote."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from conftest import require_binary
from servekit import Shell, serve_beside

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
FENCE = re.compile(r"^```([\w-]*)\n(.*?)^```$", re.DOTALL | re.MULTILINE)
QUICK_START = "make run"

pytestmark = pytest.mark.xdist_group("readme")


@dataclass(frozen=True)
class Block:
    language: str
    text: str
    line: int  # where it starts in README.md

    def where(self) -> str:
        return f"README.md line {self.line}"


def blocks(markdown: str) -> list[Block]:
    return [
        Block(m.group(1), m.group(2), markdown.count("\n", 0, m.start()) + 1)
        for m in FENCE.finditer(markdown)
    ]


def as_a_person_would(text: str, served: Shell) -> str:
    """The README names the default ports; this serve listens elsewhere."""
    for default, port in (
        ("localhost:8000", served.portal_port),
        ("localhost:8443", served.cat_port),
        ("localhost:9443", served.prod_port),
        ("127.0.0.1:9100", served.admin_port),
    ):
        text = text.replace(
            default, f"localhost:{port}" if default.startswith("localhost") else f"127.0.0.1:{port}"
        )
    return text


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Shell]:
    for tool in ("openssl", "curl", "jq", "git"):
        require_binary(tool)
    base = tmp_path_factory.mktemp("readme")
    with serve_beside(base / "clone", base / "aside") as served:
        yield served


def test_the_blocks_are_what_this_test_expects() -> None:
    """The first shell block is the quick start (`make run` is the serve this test starts);
    there is a Python block; every block is a language the test knows."""
    found = blocks(README.read_text())
    shell = [b for b in found if b.language == "sh"]
    assert shell[0].text.splitlines()[0].startswith(QUICK_START)
    assert len(shell) >= 6
    assert [b.language for b in found if b.language == "python"] == ["python"]
    assert {b.language for b in found} <= {"sh", "python", "toml", "nginx", "haproxy", ""}


def _statements(config: str, edge: str) -> set[str]:
    """A configuration's statements, comments dropped and spaces collapsed (nginx: split at
    ``;``, ``{`` and ``}``; HAProxy: one per line)."""
    text = re.sub(r"#[^\n']*", "", config)  # the JSON bodies of `return 401 '…'` hold no #
    parts = re.split(r"[;{}\n]", text) if edge == "nginx" else text.splitlines()
    return {" ".join(part.split()) for part in parts if part.strip()}


@pytest.mark.parametrize("edge", ["nginx", "haproxy"])
def test_the_edge_excerpts_are_what_twofold_edge_config_prints(edge: str) -> None:
    """Each statement of the README's nginx and HAProxy excerpts (but the ones shortened with
    "…") is one that `twofold edge config` prints for the paths the README uses."""
    from twofold.edge_config import Plan, Site, render

    data = Path("/var/lib/twofold")
    plan = Plan(
        edge=edge,
        sites=(Site("cat", 8443, (str(data / "edge" / "cat-0.sock"),)),),
        listen="0.0.0.0",
        cert=data / "tls" / "server.crt",
        key=data / "tls" / "server.key",
        ca=data / "ca" / "ca.crt",
        run_dir=data / "edge-run",
        pem=Path("/etc/haproxy/twofold.pem") if edge == "haproxy" else None,
    )
    printed = _statements(render(plan), edge)
    excerpts = [b for b in blocks(README.read_text()) if b.language == edge]
    assert len(excerpts) == 1
    shown = {s for s in _statements(excerpts[0].text, edge) if "…" not in s}
    assert len(shown) >= 6
    assert shown - printed == set(), f"the README shows what `twofold edge config {edge}` does not print"


def test_the_readme_runs_top_to_bottom(served: Shell) -> None:
    root = served.root
    env_file = served.process.work / "shell.env"  # the session's variables, block to block
    env_file.write_text("")
    found = blocks(README.read_text())
    quick_start = next(b for b in found if b.language == "sh")
    transcript: list[str] = []
    for block in found:
        if block is quick_start or block.language not in ("sh", "python"):
            continue  # `make run` is the serve running; the others are output and settings
        text = as_a_person_would(block.text, served)
        if block.language == "python":
            for _ in range(2):  # twice: each run makes an endToEndId of its own
                done = subprocess.run(
                    [sys.executable, "-c", text], cwd=root, env=served.env, capture_output=True, text=True,
                    timeout=120, check=False,
                )  # fmt: skip
                assert done.returncode == 0, (
                    f"the block at {block.where()} failed:\n{done.stdout}\n{done.stderr}"
                )
                assert "202 {'paymentInitiationResponse'" in done.stdout, done.stdout
            continue
        script = f"set -euo pipefail\nsource {env_file}\ncd {root}\n{text}\nexport -p > {env_file}\n"
        done = subprocess.run(
            ["bash", "-c", script], env=served.env, capture_output=True, text=True, timeout=300, check=False
        )
        transcript.append(f"--- {block.where()}\n{done.stdout}{done.stderr}")
        assert done.returncode == 0, (
            f"the block at {block.where()} failed (exit {done.returncode}):\n{block.text}\n"
            f"{done.stdout}\n{done.stderr}\n\nserve log:\n{served.log()[-2000:]}"
        )
        assert "Traceback" not in done.stderr, done.stderr
    output = "\n".join(transcript)
    # What the steps say they do, they did.
    assert output.count('"paymentInitiationResponse"') >= 2, output  # twofold call and curl
    assert "refused, as it should be (exit 3)" in output, output
    assert "the replay was refused (exit 4)" in output, output  # 409 replay_detected
    assert "replay_detected" in output, output
    assert "audit log intact" in output, output
    gitignore_covers_what_it_wrote(root)


def gitignore_covers_what_it_wrote(root: Path) -> None:
    """The clone's `git status` shows nothing the walkthrough wrote: credentials, payments,
    the password file, the stand-in CA, the data directory."""
    git = shutil.which("git")
    assert git is not None
    shutil.copyfile(ROOT / ".gitignore", root / ".gitignore")
    subprocess.run([git, "init", "-q"], cwd=root, check=True)
    status = subprocess.run(
        [git, "status", "--porcelain", "--untracked-files=all"],
        cwd=root,
        capture_output=True,
        text=True,
        check=True,
    ).stdout.splitlines()
    assert status == ["?? .gitignore"], status
