"""Dependency floors: versions with published advisories cannot be installed."""

from __future__ import annotations

import tomllib
from importlib.metadata import version
from pathlib import Path

import pytest
from packaging.requirements import Requirement

PYPROJECT = Path(__file__).resolve().parents[2] / "pyproject.toml"


def _requirements() -> dict[str, Requirement]:
    data = tomllib.loads(PYPROJECT.read_text())
    reqs = (Requirement(r) for r in data["project"]["dependencies"])
    return {r.name.lower(): r for r in reqs}


@pytest.mark.parametrize(
    ("name", "refused", "admitted"),
    [
        # aiohttp < 3.13.3: HTTP parser advisories.
        ("aiohttp", ["3.10.11", "3.13.2"], ["3.13.3"]),
        # cryptography < 44.0.1: advisories in the bundled OpenSSL.
        ("cryptography", ["42.0.8", "44.0.0"], ["44.0.1"]),
        # sqlmodel is 0.0.x; a 0.1 may break its API.
        ("sqlmodel", ["0.1.0"], ["0.0.22"]),
    ],
)
def test_dependency_ranges_refuse_vulnerable_and_untested_versions(
    name: str, refused: list[str], admitted: list[str]
) -> None:
    spec = _requirements()[name].specifier
    assert [v for v in refused if spec.contains(v)] == []
    assert all(spec.contains(v) for v in admitted)


def test_the_installed_versions_satisfy_the_declared_ranges() -> None:
    reqs = _requirements()
    for name in ("aiohttp", "cryptography", "sqlmodel"):
        installed = version(name)
        assert reqs[name].specifier.contains(installed), f"{name} {installed} vs {reqs[name]}"
