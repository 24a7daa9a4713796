"""Prometheus: the alert rules, their unit tests, every PromQL expression we ship, and a
real Prometheus server scraping a real worker.

``promtool`` and ``prometheus`` come from Debian's ``prometheus`` package; the tests are
marked ``ops_tools`` so that CI (``SLUICE_TEST_REQUIRE_OPS_TOOLS=1``) fails, not skips,
when they are missing.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from prometheus_client import REGISTRY
from redis.asyncio import Redis

from core.infra.redis import Keys
from core.messages import IncomingMessage
from core.settings import Settings
from tests.helpers import ROOT, free_port, wait_until
from tests.ops.tools import exported_metric_names, tool
from workers.delivery import log_given_up

pytestmark = pytest.mark.ops_tools

PROM = ROOT / "deploy" / "prometheus"
RULES = PROM / "alerts.yml"
RULE_TESTS = PROM / "alerts_test.yml"
DASHBOARD = ROOT / "deploy" / "grafana" / "sluice-dashboard.json"
SCALEDOBJECT = ROOT / "deploy" / "kubernetes" / "base" / "worker-scaledobject.yaml"
METRIC_NAME = re.compile(r"\bsluice_[a-z_]+\b")


def promtool(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [tool("promtool"), *args], capture_output=True, text=True, timeout=120, cwd=cwd
    )


def _alert_names(rules: dict[str, Any]) -> set[str]:
    return {r["alert"] for g in rules["groups"] for r in g["rules"] if "alert" in r}


# --------------------------------------------------------------------------- alert rules


def test_alert_rules_pass_promtool_check() -> None:
    done = promtool("check", "rules", str(RULES))
    assert done.returncode == 0, done.stdout + done.stderr
    assert "SUCCESS" in done.stdout


def test_alert_rules_pass_their_unit_tests() -> None:
    done = promtool("test", "rules", str(RULE_TESTS))
    assert done.returncode == 0, done.stdout + done.stderr


def test_every_alert_is_unit_tested_and_the_required_ones_exist() -> None:
    alerts = _alert_names(yaml.safe_load(RULES.read_text("utf-8")))
    assert {
        "SluiceQueueWaitHigh",
        "SluiceLLMRequestBudgetSaturated",
        "SluiceLLMBreakerOpen",
        "SluiceHistoryFlushBacklog",
        "SluiceDeliveryGivenUp",
    } <= alerts
    tests = yaml.safe_load(RULE_TESTS.read_text("utf-8"))
    tested = {
        case["alertname"]
        for t in tests["tests"]
        for case in t.get("alert_rule_test", [])
        if case.get("exp_alerts")
    }
    assert alerts == tested, alerts ^ tested


def _copy_rules(tmp_path: Path) -> Path:
    for f in (RULES, RULE_TESTS):
        shutil.copy(f, tmp_path / f.name)
    return tmp_path


def test_a_changed_threshold_fails_the_rule_unit_tests(tmp_path: Path) -> None:
    copy = _copy_rules(tmp_path)
    rules = copy / "alerts.yml"
    text = rules.read_text("utf-8")
    assert "(sluice_queue_oldest_wait_seconds) > 60" in text
    rules.write_text(text.replace("(sluice_queue_oldest_wait_seconds) > 60", "(x) > 600"))
    assert promtool("check", "rules", str(rules)).returncode == 0  # still valid PromQL
    done = promtool("test", "rules", str(copy / "alerts_test.yml"))
    assert done.returncode != 0 and "SluiceQueueWaitHigh" in done.stdout + done.stderr


def test_a_syntax_error_fails_promtool_check(tmp_path: Path) -> None:
    copy = _copy_rules(tmp_path)
    rules = copy / "alerts.yml"
    text = rules.read_text("utf-8")
    rules.write_text(text.replace("max(sluice_llm_breaker_open_seconds) > 0", "max(sluice_llm_"))
    done = promtool("check", "rules", str(rules))
    assert done.returncode != 0, done.stdout


# --------------------------------------------------------------------------- every expression


def shipped_expressions() -> dict[str, str]:
    """Every PromQL expression in deploy/: the dashboard, the rules, the KEDA triggers."""
    out: dict[str, str] = {}
    dashboard = json.loads(DASHBOARD.read_text("utf-8"))
    for panel in dashboard["panels"]:
        for target in panel.get("targets", []):
            out[f"dashboard '{panel['title']}' {target['refId']}"] = target["expr"]
    for group in yaml.safe_load(RULES.read_text("utf-8"))["groups"]:
        for rule in group["rules"]:
            out[f"rule {rule.get('alert') or rule.get('record')}"] = rule["expr"]
    scaled = yaml.safe_load(SCALEDOBJECT.read_text("utf-8"))
    for trigger in scaled["spec"]["triggers"]:
        out[f"keda trigger {trigger['name']}"] = trigger["metadata"]["query"]
    return out


def check_expressions(exprs: dict[str, str], folder: Path) -> None:
    """Each expression parses (promtool, as a recording rule) and names exported metrics."""
    exported = exported_metric_names()
    for where, expr in exprs.items():
        used = set(METRIC_NAME.findall(expr))
        assert used, f"{where}: no Sluice metric in {expr!r}"
        assert used <= exported, f"{where}: Sluice exports no {sorted(used - exported)}"
    rules = {
        "groups": [
            {
                "name": "shipped-expressions",
                "rules": [
                    {"record": f"sluice_check:expr_{i}", "expr": expr}
                    for i, expr in enumerate(exprs.values())
                ],
            }
        ]
    }
    path = folder / "expressions.yml"
    path.write_text(yaml.safe_dump(rules), "utf-8")
    done = promtool("check", "rules", str(path))
    assert done.returncode == 0, done.stdout + done.stderr


def test_every_shipped_expression_parses_and_names_exported_metrics(tmp_path: Path) -> None:
    exprs = shipped_expressions()
    dashboard = [k for k in exprs if k.startswith("dashboard")]
    # Queue depth per lane, waits, quota use, cache hits, errors.
    titles = " ".join(dashboard)
    for panel in ("Queue depth per lane", "wait", "Quota use", "Cache hit ratio", "Errors"):
        assert panel in titles, panel
    check_expressions(exprs, tmp_path)


def test_an_unknown_metric_or_a_bad_expression_is_caught(tmp_path: Path) -> None:
    with pytest.raises(AssertionError, match="sluice_queue_length"):
        check_expressions({"typo": "max(sluice_queue_length)"}, tmp_path)
    with pytest.raises(AssertionError, match=r"parse error|could not parse|unexpected"):
        check_expressions({"broken": "sum(rate(sluice_replies_total[5m])"}, tmp_path)


def test_keda_queries_follow_the_queue_and_stop_at_the_budget(tmp_path: Path) -> None:
    """The triggers' queries on synthetic series, through promtool's rule unit tests."""
    queries = {
        t["name"]: t["metadata"]["query"]
        for t in yaml.safe_load(SCALEDOBJECT.read_text("utf-8"))["spec"]["triggers"]
    }
    rules = {
        "groups": [
            {
                "name": "keda",
                "rules": [
                    {"record": "keda:queue_depth", "expr": queries["queue-depth"]},
                    {"record": "keda:oldest_wait", "expr": queries["oldest-wait"]},
                ],
            }
        ]
    }
    (tmp_path / "keda.yml").write_text(yaml.safe_dump(rules), "utf-8")

    def case(name: str, series: dict[str, str], depth: float, wait: float | None) -> dict[str, Any]:
        exp_wait = [] if wait is None else [{"labels": "keda:oldest_wait", "value": wait}]
        return {
            "name": name,
            "interval": "1m",
            "input_series": [{"series": s, "values": v} for s, v in series.items()],
            "promql_expr_test": [
                {
                    "expr": "keda:queue_depth",
                    "eval_time": "10m",
                    "exp_samples": [{"labels": "keda:queue_depth", "value": depth}],
                },
                {"expr": "keda:oldest_wait", "eval_time": "10m", "exp_samples": exp_wait},
            ],
        }

    queue = {
        # Two processes (a worker and an adapter) report the same shared queue.
        'sluice_queue_depth{lane="default",instance="w1"}': "400x20",
        'sluice_queue_depth{lane="default",instance="a1"}': "400x20",
        'sluice_queue_depth{lane="high",instance="w1"}': "100x20",
        'sluice_queue_oldest_wait_seconds{lane="default",instance="w1"}': "45x20",
    }
    # Calls take 2 s each (120 s of call time per minute over 60 calls).
    timed = {
        'sluice_llm_seconds_sum{outcome="ok",instance="w1"}': "0+120x20",
        'sluice_llm_seconds_count{outcome="ok",instance="w1"}': "0+60x20",
        'sluice_llm_calls_total{outcome="ok",instance="w1"}': "0+60x20",
    }
    tests = {
        "rule_files": ["keda.yml"],
        "evaluation_interval": "1m",
        "tests": [
            # No budget set: the whole queue (max per lane, summed over lanes).
            case("no budget", queue, 500, 45),
            # 600 rpm and 2 s per call: 20 calls can run at once, so no more than
            # 20 jobs' worth of workers; 60 calls a minute is far from saturation.
            case(
                "budget bound",
                {**queue, **timed, 'sluice_llm_budget_rpm_limit{instance="w1"}': "600x20"},
                20,
                45,
            ),
            # 60 rpm, 60 calls a minute: saturated, so the wait trigger says nothing.
            case(
                "budget saturated",
                {**queue, **timed, 'sluice_llm_budget_rpm_limit{instance="w1"}': "60x20"},
                2,
                None,
            ),
        ],
    }
    (tmp_path / "keda_test.yml").write_text(yaml.safe_dump(tests), "utf-8")
    done = promtool("test", "rules", str(tmp_path / "keda_test.yml"))
    assert done.returncode == 0, done.stdout + done.stderr


# --------------------------------------------------------------------------- given-up counter


def test_a_given_up_delivery_is_counted_per_platform() -> None:
    def value() -> float:
        got = REGISTRY.get_sample_value("sluice_delivery_given_up_total", {"platform": "slack"})
        return got or 0.0

    before = value()
    msg = IncomingMessage(
        platform="slack", tenant="T1", channel="C1", user="U1", message_id="m1", text="hi"
    )
    log_given_up(msg, "job-1", 5, RuntimeError("channel_not_found"))
    assert value() == before + 1


# --------------------------------------------------------------------------- a real server


def _query(base: str, promql: str) -> list[dict[str, Any]]:
    url = f"{base}/api/v1/query?" + urllib.parse.urlencode({"query": promql})
    with urllib.request.urlopen(url, timeout=5) as resp:
        body = json.load(resp)
    assert body["status"] == "success", body
    result: list[dict[str, Any]] = body["data"]["result"]
    return result


def _safe_query(base: str, promql: str) -> list[dict[str, Any]]:
    try:
        return _query(base, promql)
    except OSError:
        return []  # Prometheus not listening yet


def _alerts(base: str) -> list[dict[str, Any]]:
    try:
        with urllib.request.urlopen(f"{base}/api/v1/alerts", timeout=5) as resp:
            alerts: list[dict[str, Any]] = json.load(resp)["data"]["alerts"]
            return alerts
    except OSError:
        return []


@pytest.fixture
def prometheus_server(tmp_path: Path) -> Iterator[Callable[[list[str]], str]]:
    """Factory: a real Prometheus on a loopback port scraping ``targets`` every second,
    with deploy/prometheus/alerts.yml loaded; returns its base URL."""
    procs: list[tuple[subprocess.Popen[bytes], Path]] = []

    def start(targets: list[str]) -> str:
        port = free_port()
        config = {
            "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
            "rule_files": [str(RULES)],
            "scrape_configs": [{"job_name": "sluice", "static_configs": [{"targets": targets}]}],
        }
        (tmp_path / "prometheus.yml").write_text(yaml.safe_dump(config), "utf-8")
        log = tmp_path / "prometheus.log"
        with open(log, "wb") as out:
            popen = subprocess.Popen(
                [
                    tool("prometheus"),
                    f"--config.file={tmp_path / 'prometheus.yml'}",
                    f"--storage.tsdb.path={tmp_path / 'tsdb'}",
                    f"--web.listen-address=127.0.0.1:{port}",
                ],
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        procs.append((popen, log))
        return f"http://127.0.0.1:{port}"

    try:
        yield start
    finally:
        for popen, log in procs:
            popen.terminate()
            try:
                popen.wait(15)
            except subprocess.TimeoutExpired:
                popen.kill()
                popen.wait(5)
            if popen.returncode not in (0, -15):
                print(log.read_text("utf-8", errors="replace")[-3000:])


async def test_a_real_prometheus_scrapes_a_worker_and_loads_the_alerts(
    settings: Settings,
    worker_process: Callable[..., Any],
    prometheus_server: Callable[[list[str]], str],
    redis: Redis,
) -> None:
    metrics_port = free_port()
    worker_process({"SLUICE_METRICS_PORT": str(metrics_port), "SLUICE_LLM_RPM": "600"})
    base = prometheus_server([f"127.0.0.1:{metrics_port}"])

    def value(promql: str) -> float | None:
        result = _safe_query(base, promql)
        return float(result[0]["value"][1]) if result else None

    await wait_until(lambda: value("sluice_llm_budget_rpm_limit") == 600, 60, "a scraped budget")
    assert value('up{job="sluice"}') == 1
    assert value('sluice_queue_depth{lane="default"}') == 0
    assert value("sluice_llm_breaker_open_seconds") == 0

    # Open the shared breaker as the workers do: the next scrape shows it, and the
    # SluiceLLMBreakerOpen rule (loaded from deploy/prometheus/alerts.yml) goes pending.
    await redis.set(Keys(settings.key_prefix).llm("breaker:open"), "1", px=120_000)
    await wait_until(
        lambda: (value("sluice_llm_breaker_open_seconds") or 0) > 0, 60, "the open breaker"
    )
    await wait_until(
        lambda: any(a["labels"]["alertname"] == "SluiceLLMBreakerOpen" for a in _alerts(base)),
        60,
        "the breaker alert",
    )
