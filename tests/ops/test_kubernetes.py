"""deploy/kubernetes: every overlay renders with ``kubectl kustomize`` and validates.

Kubernetes objects are checked by ``kubernetes-validate`` (strict: unknown fields are
errors) against the schemas of one Kubernetes version; KEDA's ScaledObject against the
schema vendored in deploy/kubernetes/crds. Then what the schemas cannot know: probes on
the port each process really serves ``/healthz`` on, grace periods, disruption budgets,
secrets as files, the migration Job, and an autoscaler that reads metrics Sluice exports.
A deliberately broken copy of the manifests must fail the same checks.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import jsonschema
import kubernetes_validate
import pytest
import yaml

from core.settings import Settings
from tests.helpers import ROOT
from tests.ops.tools import exported_metric_names, tool

pytestmark = pytest.mark.ops_tools

KUBE = ROOT / "deploy" / "kubernetes"
OVERLAYS = ("dev", "production")
KUBERNETES_VERSION = "1.30.0"
KEDA_SCHEMA = KUBE / "crds" / "keda.sh_scaledobject.schema.json"
WORKLOADS = ("Deployment", "StatefulSet")
# Metric names that Sluice exports (core/infra/metrics.py), as Prometheus stores them.
METRIC_NAME = re.compile(r"\bsluice_[a-z_]+\b")


def render(folder: Path) -> list[dict[str, Any]]:
    """``kubectl kustomize folder``, parsed; a failure raises with kubectl's message."""
    done = subprocess.run(
        [tool("kubectl"), "kustomize", str(folder)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    if done.returncode != 0:
        raise AssertionError(f"kubectl kustomize {folder} failed: {done.stderr.strip()}")
    return [doc for doc in yaml.safe_load_all(done.stdout) if doc]


def validate(docs: list[dict[str, Any]]) -> None:
    """Every object against its schema; raises on the first invalid one, naming it."""
    keda = json.loads(KEDA_SCHEMA.read_text("utf-8"))
    for doc in docs:
        name = f"{doc.get('kind')}/{doc.get('metadata', {}).get('name')}"
        try:
            if doc.get("apiVersion", "").startswith("keda.sh/"):
                jsonschema.validate(doc, keda)
            else:
                kubernetes_validate.validate(doc, KUBERNETES_VERSION, strict=True)
        except (jsonschema.ValidationError, kubernetes_validate.ValidationError) as e:
            where = "/".join(str(p) for p in e.absolute_path)
            raise AssertionError(f"{name} at {where}: {e.message}") from e
        except kubernetes_validate.SchemaNotFoundError as e:
            raise AssertionError(f"{name}: no schema for this kind ({e.message})") from e


def by_kind(docs: list[dict[str, Any]], kind: str) -> list[dict[str, Any]]:
    return [d for d in docs if d["kind"] == kind]


def one(docs: list[dict[str, Any]], kind: str, name: str) -> dict[str, Any]:
    [found] = [d for d in by_kind(docs, kind) if d["metadata"]["name"] == name]
    return found


def config(docs: list[dict[str, Any]]) -> dict[str, str]:
    [cm] = [
        d for d in by_kind(docs, "ConfigMap") if d["metadata"]["name"].startswith("sluice-config")
    ]
    data: dict[str, str] = cm["data"]
    return data


def pods(docs: list[dict[str, Any]]) -> Iterator[tuple[dict[str, Any], dict[str, Any]]]:
    """(object, pod spec) of every workload and Job."""
    for doc in docs:
        if doc["kind"] in (*WORKLOADS, "Job"):
            yield doc, doc["spec"]["template"]["spec"]


@pytest.fixture(scope="module", params=OVERLAYS)
def rendered(request: pytest.FixtureRequest) -> list[dict[str, Any]]:
    return render(KUBE / "overlays" / request.param)


def test_every_overlay_renders_and_validates(rendered: list[dict[str, Any]]) -> None:
    validate(rendered)
    kinds = {d["kind"] for d in rendered}
    assert {"Deployment", "StatefulSet", "Job", "PodDisruptionBudget", "ScaledObject"} <= kinds
    names = {d["metadata"]["name"] for d in by_kind(rendered, "Deployment")}
    assert {"sluice-worker", "sluice-slack"} <= names
    assert one(rendered, "StatefulSet", "sluice-discord")["spec"]["replicas"] == 1


def test_every_object_is_labelled_and_the_web_chat_stays_out_of_production() -> None:
    for overlay in OVERLAYS:
        docs = render(KUBE / "overlays" / overlay)
        for doc in docs:
            if doc["kind"] == "Namespace":
                continue
            labels = doc["metadata"].get("labels", {})
            assert labels.get("app.kubernetes.io/part-of") == "sluice", doc["metadata"]["name"]
        web = [d for d in docs if d["metadata"]["name"] == "sluice-web"]
        # The web chat is a development tool (DESIGN.md): the dev overlay only.
        assert bool(web) is (overlay == "dev"), overlay


def test_the_migration_step_selects_what_the_job_needs(rendered: list[dict[str, Any]]) -> None:
    """docs/deploy.md step 4: ``-l 'app.kubernetes.io/component in (config,migrate)'``."""
    step = {
        (
            d["kind"],
            d["metadata"]["name"].rsplit("-", 1)[0]
            if d["kind"] in ("ConfigMap", "Secret")
            else d["metadata"]["name"],
        )
        for d in rendered
        if d["metadata"].get("labels", {}).get("app.kubernetes.io/component")
        in ("config", "migrate")
    }
    kinds = {kind for kind, _ in step}
    assert {"Namespace", "ServiceAccount", "ConfigMap", "Job"} <= kinds
    assert kinds <= {"Namespace", "ServiceAccount", "ConfigMap", "Secret", "Job"}
    assert ("ConfigMap", "sluice-config") in step and ("Job", "sluice-migrate") in step


def _port_served(container: dict[str, Any]) -> int:
    """The port this Sluice process answers /healthz on, from its command and env."""
    command: list[str] = container["command"]
    assert command[0] == "sluice", command
    if command[1] in ("worker", "discord"):
        env = {e["name"]: e.get("value") for e in container.get("env", [])}
        # Workers and the Discord adapter serve it on SLUICE_METRICS_PORT only.
        assert "SLUICE_METRICS_PORT" in env, f"{command}: SLUICE_METRICS_PORT unset"
        return int(env["SLUICE_METRICS_PORT"])
    assert "--port" in command, f"{command}: no --port"
    return int(command[command.index("--port") + 1])


def test_every_pod_probes_healthz_on_the_port_its_process_serves(
    rendered: list[dict[str, Any]],
) -> None:
    for doc in rendered:
        if doc["kind"] not in WORKLOADS:
            continue
        for container in doc["spec"]["template"]["spec"]["containers"]:
            served = _port_served(container)
            ports = {p["name"]: p["containerPort"] for p in container["ports"]}
            for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
                get = container[probe]["httpGet"]
                assert get["path"] == "/healthz", (doc["metadata"]["name"], probe)
                port = get["port"]
                assert ports.get(port, port) == served, (doc["metadata"]["name"], probe, port)


def test_grace_period_covers_the_shutdown_grace_with_margin(
    rendered: list[dict[str, Any]],
) -> None:
    grace_s = float(config(rendered).get("SLUICE_SHUTDOWN_GRACE_S", Settings().shutdown_grace_s))
    for doc, spec in pods(rendered):
        assert spec["terminationGracePeriodSeconds"] >= grace_s + 10, doc["metadata"]["name"]


def test_every_workload_has_a_disruption_budget(rendered: list[dict[str, Any]]) -> None:
    budgets = [
        d["spec"]["selector"]["matchLabels"] for d in by_kind(rendered, "PodDisruptionBudget")
    ]
    for doc in rendered:
        if doc["kind"] not in WORKLOADS:
            continue
        labels = doc["spec"]["template"]["metadata"]["labels"]
        assert any(sel.items() <= labels.items() for sel in budgets), doc["metadata"]["name"]


def test_secrets_are_files_read_through_secrets_dir(rendered: list[dict[str, Any]]) -> None:
    secrets_dir = config(rendered)["SLUICE_SECRETS_DIR"]
    for doc, spec in pods(rendered):
        volumes = {v["name"]: v for v in spec["volumes"]}
        for container in spec["containers"]:
            # No secret value in the manifests themselves.
            for env in container.get("env", []):
                assert "value" not in env or not re.search(
                    r"KEY|TOKEN|SECRET|PASSWORD|_URL", env["name"]
                ), (doc["metadata"]["name"], env["name"])
            [mount] = [m for m in container["volumeMounts"] if m["mountPath"] == secrets_dir]
            assert mount["readOnly"] is True
            secret = volumes[mount["name"]]["secret"]["secretName"]
            assert secret.startswith("sluice-secrets"), doc["metadata"]["name"]
            assert container["securityContext"]["readOnlyRootFilesystem"] is True
        assert spec["securityContext"]["runAsNonRoot"] is True
        assert spec["automountServiceAccountToken"] is False


def test_migration_job_runs_db_upgrade_as_a_pre_sync_hook(rendered: list[dict[str, Any]]) -> None:
    job = one(rendered, "Job", "sluice-migrate")
    [container] = job["spec"]["template"]["spec"]["containers"]
    assert container["command"] == ["sluice", "db", "upgrade"]
    assert job["spec"]["template"]["spec"]["restartPolicy"] == "Never"
    assert job["metadata"]["annotations"]["argocd.argoproj.io/hook"] == "PreSync"
    # Rollouts never take an old pod down before a new one is ready (the new one waits
    # for the schema: workers refuse an older one).
    worker = one(rendered, "Deployment", "sluice-worker")
    assert worker["spec"]["strategy"]["rollingUpdate"]["maxUnavailable"] == 0


def test_keda_scales_the_worker_on_exported_metrics(rendered: list[dict[str, Any]]) -> None:
    scaled = one(rendered, "ScaledObject", "sluice-worker")
    target = scaled["spec"]["scaleTargetRef"]
    assert target["name"] == "sluice-worker"
    one(rendered, "Deployment", target["name"])
    triggers = {t["name"]: t for t in scaled["spec"]["triggers"]}
    assert set(triggers) == {"queue-depth", "oldest-wait"}
    exported = exported_metric_names()
    for trig in triggers.values():
        assert trig["type"] == "prometheus"
        used = set(METRIC_NAME.findall(trig["metadata"]["query"]))
        assert used and used <= exported, used - exported
    assert "sluice_queue_depth" in triggers["queue-depth"]["metadata"]["query"]
    assert "sluice_llm_budget_rpm_limit" in triggers["queue-depth"]["metadata"]["query"]
    assert "sluice_queue_oldest_wait_seconds" in triggers["oldest-wait"]["metadata"]["query"]
    spec = scaled["spec"]
    assert 1 <= spec["minReplicaCount"] <= spec["maxReplicaCount"]


# --------------------------------------------------------------------------- broken copies


def _copy(tmp_path: Path) -> Path:
    copy = tmp_path / "kubernetes"
    shutil.copytree(KUBE, copy)
    return copy


def _edit(path: Path, old: str, new: str) -> None:
    text = path.read_text("utf-8")
    assert old in text, f"{old!r} not in {path}"
    path.write_text(text.replace(old, new, 1), "utf-8")


@pytest.mark.parametrize(
    ("file", "old", "new", "error"),
    [
        # A misspelt field: Kubernetes would drop it silently; strict validation does not.
        ("base/worker.yaml", "readinessProbe:", "readynessProbe:", "readynessProbe"),
        # A wrong type.
        ("base/worker.yaml", "replicas: 2", "replicas: two", "two"),
        ("base/pdb.yaml", "maxUnavailable: 1", "maxUnavailable: [1]", "maxUnavailable"),
        # KEDA: a number where KEDA wants a string, an unknown field, no target.
        ("base/worker-scaledobject.yaml", 'threshold: "50"', "threshold: 50", "50"),
        ("base/worker-scaledobject.yaml", "cooldownPeriod:", "cooldownPeriods:", "cooldownPeriods"),
        ("base/worker-scaledobject.yaml", "  scaleTargetRef:", "  scaleTarget:", "scaleTarget"),
    ],
)
def test_a_broken_manifest_fails_validation(
    tmp_path: Path, file: str, old: str, new: str, error: str
) -> None:
    copy = _copy(tmp_path)
    _edit(copy / file, old, new)
    with pytest.raises(AssertionError, match=re.escape(error)):
        validate(render(copy / "overlays" / "production"))


def test_a_broken_kustomization_fails_to_render(tmp_path: Path) -> None:
    copy = _copy(tmp_path)
    _edit(copy / "base" / "kustomization.yaml", "  - pdb.yaml", "  - pdbs.yaml")
    with pytest.raises(AssertionError, match=re.escape("pdbs.yaml")):
        render(copy / "overlays" / "dev")


def test_a_probe_on_the_wrong_port_is_caught(tmp_path: Path) -> None:
    copy = _copy(tmp_path)
    _edit(copy / "base" / "discord.yaml", 'value: "9100"', 'value: "9200"')
    docs = render(copy / "overlays" / "production")
    validate(docs)  # valid Kubernetes, wrong for Sluice
    with pytest.raises(AssertionError):
        test_every_pod_probes_healthz_on_the_port_its_process_serves(docs)


def test_a_short_grace_period_is_caught(tmp_path: Path) -> None:
    copy = _copy(tmp_path)
    _edit(
        copy / "base" / "kustomization.yaml",
        "SLUICE_SHUTDOWN_GRACE_S=25",
        "SLUICE_SHUTDOWN_GRACE_S=60",
    )
    with pytest.raises(AssertionError, match="sluice-"):
        test_grace_period_covers_the_shutdown_grace_with_margin(render(copy / "overlays" / "dev"))
