"""The operations tools some tests run: kubectl, promtool, prometheus, nginx, caddy.

They are Debian packages (``kubernetes-client``, ``prometheus``, ``nginx-light``,
``caddy``), not Python ones. A test marked ``ops_tools`` skips when its tool is missing, and CI
(``.ci/run``, which installs them) sets ``SLUICE_TEST_REQUIRE_OPS_TOOLS=1`` so that the
skip fails the run instead (tests/conftest.py).
"""

from __future__ import annotations

import shutil

import pytest

PACKAGES = {
    "kubectl": "kubernetes-client",
    "promtool": "prometheus",
    "prometheus": "prometheus",
    "nginx": "nginx-light",
    "caddy": "caddy",
}


def tool(name: str) -> str:
    """The path of ``name``, or skip the test naming the Debian package to install."""
    found = shutil.which(name) or shutil.which(name, path="/usr/sbin:/usr/bin:/sbin:/bin")
    if found is None:
        pytest.skip(f"{name} is not installed (apt-get install {PACKAGES.get(name, name)})")
    return found


def exported_metric_names() -> set[str]:
    """Every series name a Sluice process can export (core/infra/metrics.py), as scraped.

    Read from the metric objects themselves, not from samples: a labelled metric with
    no label values yet has no samples but is still exported once used.
    """
    from prometheus_client import REGISTRY

    import core.infra.metrics  # noqa: F401  (registers Sluice's metrics)

    suffixes = {
        "counter": ("_total", "_created"),
        "gauge": ("",),
        "histogram": ("_bucket", "_sum", "_count", "_created"),
        "summary": ("_sum", "_count", "_created"),
    }
    names: set[str] = set()
    for family in REGISTRY.collect():
        if family.name.startswith("sluice_"):
            names.update(family.name + s for s in suffixes.get(family.type, ("",)))
    return names
