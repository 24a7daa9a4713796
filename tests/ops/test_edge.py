"""The edge and the image: nginx and Caddy configs checked by nginx and Caddy themselves,
and a reproducible image installed from a hashed lock file that matches pyproject.toml.
"""

from __future__ import annotations

import re
import subprocess
import tomllib
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

from tests.helpers import ROOT
from tests.ops.tools import tool

NGINX_CONF = ROOT / "deploy" / "nginx.conf"
CADDYFILE = ROOT / "deploy" / "Caddyfile"
LOCK = ROOT / "requirements.lock"
# `resolve` on an upstream server, in open-source nginx.
NGINX_RESOLVE_SINCE = Version("1.27.3")


# --------------------------------------------------------------------------- nginx


def _nginx_version(nginx: str) -> Version:
    done = subprocess.run([nginx, "-v"], capture_output=True, text=True, timeout=30)
    found = re.search(r"nginx/(\d+\.\d+\.\d+)", done.stderr + done.stdout)
    assert found, done.stderr
    return Version(found.group(1))


def nginx_check(conf_text: str, tmp_path: Path) -> subprocess.CompletedProcess[str]:
    """``nginx -t`` on ``conf_text`` as this machine's nginx can read it.

    Compose's service name does not resolve here, so the upstream points at loopback; an
    nginx older than 1.27.3 does not know ``resolve``, so it is taken out (the test below
    checks it is there, and that Compose runs an nginx that has it).
    """
    nginx = tool("nginx")
    text = conf_text.replace("slack-replica:3000", "127.0.0.1:3000")
    text = text.replace("pid /tmp/nginx.pid;", f"pid {tmp_path}/nginx.pid;")
    if _nginx_version(nginx) < NGINX_RESOLVE_SINCE:
        text = re.sub(r"(\n\s*server\s+\S+)\s+resolve\b", r"\1", text)
    conf = tmp_path / "nginx.conf"
    conf.write_text(text, "utf-8")
    return subprocess.run(
        [nginx, "-t", "-q", "-p", str(tmp_path), "-e", "stderr", "-c", str(conf)],
        capture_output=True,
        text=True,
        timeout=30,
    )


@pytest.mark.ops_tools
def test_nginx_conf_passes_nginx_t(tmp_path: Path) -> None:
    done = nginx_check(NGINX_CONF.read_text("utf-8"), tmp_path)
    assert done.returncode == 0, done.stderr


@pytest.mark.ops_tools
def test_a_broken_nginx_conf_fails_nginx_t(tmp_path: Path) -> None:
    text = NGINX_CONF.read_text("utf-8").replace("proxy_next_upstream_tries 2;", "proxy_tries 2;")
    done = nginx_check(text, tmp_path)
    assert done.returncode != 0 and "proxy_tries" in done.stderr


def test_nginx_retries_posts_and_re_resolves_the_replicas() -> None:
    conf = NGINX_CONF.read_text("utf-8")
    retry = re.search(r"^\s*proxy_next_upstream\s+([^;]+);", conf, flags=re.M)
    assert retry is not None
    assert {"error", "timeout", "non_idempotent"} <= set(retry.group(1).split())
    upstream = re.search(r"upstream slack_adapters \{(.*?)\}", conf, flags=re.S)
    assert upstream is not None
    assert re.search(r"^\s*zone\s+\S+\s+\d+k;", upstream.group(1), flags=re.M)
    assert re.search(r"^\s*server\s+slack-replica:3000\s+resolve\b", upstream.group(1), flags=re.M)
    assert re.search(r"^\s*resolver\s+127\.0\.0\.11\b", conf, flags=re.M)
    # The nginx Compose runs knows `resolve`.
    compose = (ROOT / "docker-compose.yml").read_text("utf-8")
    image = re.search(r"image: nginx:(\d+\.\d+)(?:\.(\d+))?-alpine", compose)
    assert image is not None
    version = Version(f"{image.group(1)}.{image.group(2) or 999}")
    assert version >= NGINX_RESOLVE_SINCE, version


# --------------------------------------------------------------------------- Caddy


def caddy_check(text: str, tmp_path: Path) -> subprocess.CompletedProcess[str]:
    path = tmp_path / "Caddyfile"
    path.write_text(text, "utf-8")
    return subprocess.run(
        [tool("caddy"), "validate", "--adapter", "caddyfile", "--config", str(path)],
        capture_output=True,
        text=True,
        timeout=60,
        env={"PATH": "/usr/bin:/bin", "HOME": str(tmp_path), "TLS_DOMAIN": "bots.example.com"},
    )


@pytest.mark.ops_tools
def test_caddyfile_is_valid(tmp_path: Path) -> None:
    done = caddy_check(CADDYFILE.read_text("utf-8"), tmp_path)
    assert done.returncode == 0, done.stdout + done.stderr


@pytest.mark.ops_tools
def test_a_broken_caddyfile_fails_validation(tmp_path: Path) -> None:
    text = CADDYFILE.read_text("utf-8").replace("lb_try_duration 2s", "lb_try_duration soon")
    done = caddy_check(text, tmp_path)
    assert done.returncode != 0 and "soon" in done.stdout + done.stderr


def test_caddy_serves_tls_in_its_own_compose_profile() -> None:
    from compose_spec import PyCompose

    compose = PyCompose.from_yaml((ROOT / "docker-compose.yml").read_text("utf-8"))
    caddy = compose.get_service("caddy")
    assert set(caddy.profiles or ()) == {"tls"}
    mounts = [str(v) for v in caddy.volumes or []]
    assert any(m.startswith("./deploy/Caddyfile:/etc/caddy/Caddyfile") for m in mounts), mounts
    ports = " ".join(str(p) for p in caddy.ports or [])
    assert "443:443" in ports and "80:80" in ports
    # Only Slack's paths go through; the web chat stays off the internet.
    text = CADDYFILE.read_text("utf-8")
    assert "/slack/events" in text and "8080" not in text


# --------------------------------------------------------------------------- lock file


def lock_problems(pyproject_text: str, lock_text: str) -> list[str]:
    """What makes the lock not current with pyproject.toml (empty: current).

    Every runtime dependency must be pinned (``==``) at a version its range allows, and
    every pinned package must carry hashes.
    """
    project = tomllib.loads(pyproject_text)["project"]
    pins: dict[str, Version] = {}
    problems: list[str] = []
    for block in re.split(r"\n(?=[A-Za-z0-9])", lock_text):
        head = re.match(r"([A-Za-z0-9_.\-]+)==([^\s\\;]+)", block)
        if not head:
            continue
        name = canonicalize_name(head.group(1))
        pins[name] = Version(head.group(2))
        if "--hash=sha256:" not in block:
            problems.append(f"{name} has no hash")
    for line in project["dependencies"]:
        req = Requirement(line)
        name = canonicalize_name(req.name)
        if req.marker is not None and not req.marker.evaluate():
            continue
        if name not in pins:
            problems.append(f"{name} is not in the lock")
        elif not req.specifier.contains(pins[name], prereleases=True):
            problems.append(f"{name}=={pins[name]} is outside {req.specifier}")
    return problems


def test_lock_is_current_with_pyproject() -> None:
    lock = LOCK.read_text("utf-8")
    assert "pip-compile" in lock and "--generate-hashes" in lock and "pyproject.toml" in lock
    assert lock_problems((ROOT / "pyproject.toml").read_text("utf-8"), lock) == []


def test_a_stale_lock_is_caught() -> None:
    pyproject = (ROOT / "pyproject.toml").read_text("utf-8")
    lock = LOCK.read_text("utf-8")
    # A dependency added to pyproject but not locked, and a range moved past the pin.
    added = pyproject.replace('"msgpack>=1.0,<2",', '"msgpack>=1.0,<2",\n    "tomli-w>=1",')
    assert lock_problems(added, lock) == ["tomli-w is not in the lock"]
    moved = pyproject.replace('"click>=8.1,<9"', '"click>=9"')
    [problem] = lock_problems(moved, lock)
    assert problem.startswith("click==") and ">=9" in problem
    unhashed = re.sub(r"(click==\S+) \\\n(\s+--hash=\S+ \\\n)*\s+--hash=\S+", r"\1", lock)
    assert lock_problems(pyproject, unhashed) == ["click has no hash"]


def test_image_installs_the_lock_with_hashes_then_sluice_without_deps() -> None:
    text = (ROOT / "Dockerfile").read_text("utf-8")
    lock_install = text.index("--require-hashes -r requirements.lock")
    assert text.index("COPY requirements.lock") < lock_install
    # The lock layer comes before the sources, so a code change reuses it.
    assert lock_install < text.index("COPY core ./core")
    assert re.search(r"pip install --no-cache-dir --no-deps \.", text)
    ignored = (ROOT / ".dockerignore").read_text("utf-8").split()
    assert "requirements.lock" not in ignored and "*.lock" not in ignored
