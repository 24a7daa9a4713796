"""The dependency direction of the packages, and no import cycle inside ``core``."""

from __future__ import annotations

import ast
from pathlib import Path

from tests.helpers import ROOT

LAYERS = {
    "core": set(),
    "workers": {"core"},
    "bots": {"core"},
    "sluice": {"core", "bots", "workers"},
}


def _imports(path: Path) -> set[str]:
    """Every module ``path`` imports, lazily or not, outside ``if TYPE_CHECKING:``."""
    tree = ast.parse(path.read_text("utf-8"))
    skip: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            skip.update(id(n) for n in ast.walk(node))
    out: set[str] = set()
    for node in ast.walk(tree):
        if id(node) in skip:
            continue
        if isinstance(node, ast.Import):
            out.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            out.add(node.module)
            out.update(f"{node.module}.{a.name}" for a in node.names)
    return out


def _module(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _graph(package: str) -> dict[str, set[str]]:
    files = {_module(p): p for p in (ROOT / package).rglob("*.py")}
    return {m: {i for i in _imports(p) if i in files and i != m} for m, p in files.items()}


def test_packages_import_only_the_layers_below_them():
    wrong = []
    for package, allowed in LAYERS.items():
        for path in (ROOT / package).rglob("*.py"):
            for name in _imports(path):
                top = name.split(".")[0]
                if top in LAYERS and top != package and top not in allowed:
                    wrong.append(f"{_module(path)} imports {name}")
    assert not wrong, "\n".join(sorted(wrong))


def test_core_has_no_import_cycle():
    graph = _graph("core")
    state: dict[str, int] = {}
    cycles: list[list[str]] = []

    def visit(node: str, path: list[str]) -> None:
        state[node] = 1
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                cycles.append([*path[path.index(nxt) :], nxt])
            elif nxt not in state:
                visit(nxt, [*path, nxt])
        state[node] = 2

    for node in sorted(graph):
        if node not in state:
            visit(node, [node])
    assert not cycles, "\n".join(" -> ".join(c) for c in cycles)


def test_cli_commands_load_only_the_sdks_they_use():
    """Every test and deployment starts many ``sluice`` processes: ``sluice status``
    loads neither the model SDK nor the chat platforms' SDKs, ``sluice worker`` no
    platform SDK; every command is still listed and found."""
    import subprocess
    import sys

    from tests.helpers import base_env

    probe = (
        "import sys, click\n"
        "from sluice.cli import main\n"
        "ctx = click.Context(main)\n"
        "assert main.get_command(ctx, sys.argv[1]) is not None\n"
        "print(sorted(m for m in ('openai', 'slack_sdk', 'slack_bolt', 'discord')"
        " if m in sys.modules))\n"
        "print(','.join(main.list_commands(ctx)))\n"
    )

    def loaded(command: str) -> tuple[str, set[str]]:
        done = subprocess.run(
            [sys.executable, "-c", probe, command],
            env=base_env(),
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert done.returncode == 0, done.stderr
        sdks, commands = done.stdout.splitlines()
        return sdks, set(commands.split(","))

    sdks, commands = loaded("status")
    assert sdks == "[]"
    assert {"worker", "status", "slack", "discord", "db", "history", "bench"} <= commands
    assert loaded("worker")[0] == "[]"
    assert loaded("slack")[0] == "['slack_bolt', 'slack_sdk']"
