"""Turning observations and scraped metrics into the report: numbers, table, JSON, chart."""

from __future__ import annotations

import html
import json
import math
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from prometheus_client.parser import text_string_to_metric_families
from rich.table import Table

from sluice.bench.drivers import Observation
from sluice.bench.scenarios import USER_KINDS

QUANTILES = (0.5, 0.95, 0.99)
LANES = ("high", "default", "bulk")
Sample = tuple[str, dict[str, str], float]


def quantile(values: Sequence[float], q: float) -> float | None:
    """The ``q`` quantile (linear interpolation), ``None`` for no values."""
    if not values:
        return None
    xs = sorted(values)
    pos = (len(xs) - 1) * q
    lo, hi = math.floor(pos), math.ceil(pos)
    return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)


def quantiles(values: Sequence[float]) -> dict[str, float | None]:
    """p50, p95 and p99."""
    return {f"p{round(q * 100)}": quantile(values, q) for q in QUANTILES}


IN_TIME_S = 60.0


def first_visible(obs: Sequence[Observation]) -> dict[str, float | None]:
    """p50/p95/p99 of the first visible response (answer text, queued notice or whole
    reply) over every sent message but the quiet refusals (refused at the door with no
    notice of their own: the 202 said nothing follows): one that showed nothing counts
    as never, so a quantile that falls among those is ``None`` (shown as "never")."""
    values = [
        o.first_visible_s
        for o in obs
        if o.sent_s is not None and not (o.refused and not o.refusal_notice)
    ]
    xs = [math.inf if v is None else v for v in values]
    out = quantiles(xs)
    # Between two "never"s the interpolation gives NaN: never too.
    return {k: None if v is None or math.isinf(v) or math.isnan(v) else v for k, v in out.items()}


def answered_within(obs: Sequence[Observation], limit_s: float = IN_TIME_S) -> int:
    """Messages whose whole answer arrived within ``limit_s`` of sending."""
    return sum(
        1 for o in obs if o.kind == "answer" and o.full_s is not None and o.full_s <= limit_s
    )


def group_numbers(obs: Sequence[Observation]) -> dict[str, Any]:
    """Sent, answered, answered within 60 s, first visible and full reply of a group."""
    answered = [o for o in obs if o.kind == "answer"]
    return {
        "sent": len(obs),
        "answered": len(answered),
        # Answers not from the cache: each one cost an LLM call (retries aside).
        "answered_by_llm": sum(1 for o in answered if not o.cached),
        "notices": sum(1 for o in obs if o.kind == "notice"),
        "answered_within_60s": answered_within(obs),
        "first_visible_s": first_visible(obs),
        "full_reply_s": quantiles([o.full_s for o in answered if o.full_s is not None]),
    }


def by_user_kind(sent: Sequence[Observation]) -> dict[str, dict[str, Any]]:
    """The numbers of light users, heavy users (launch-day's 10x senders), the flooder
    and the heavy tenant's users (the ``flood`` scenario), where there are any."""
    groups: dict[str, list[Observation]] = {}
    for o in sent:
        groups.setdefault(o.planned.kind, []).append(o)
    return {kind: group_numbers(groups[kind]) for kind in USER_KINDS if kind in groups}


def parse_metrics(texts: Iterable[str]) -> list[Sample]:
    """Every sample of several ``/metrics`` scrapes."""
    out: list[Sample] = []
    for text in texts:
        for family in text_string_to_metric_families(text):
            for s in family.samples:
                out.append((s.name, dict(s.labels), float(s.value)))
    return out


def _match(labels: dict[str, str], want: dict[str, str]) -> bool:
    return all(labels.get(k) == v for k, v in want.items())


def metric_total(samples: list[Sample], name: str, **labels: str) -> float:
    """Sum of a metric's samples over processes (and over labels not given)."""
    return sum(v for n, lab, v in samples if n == name and _match(lab, labels))


def histogram_quantiles(samples: list[Sample], name: str, **labels: str) -> dict[str, float | None]:
    """p50/p95/p99 of a histogram merged over processes, interpolated within buckets."""
    buckets: dict[float, float] = {}
    for n, lab, v in samples:
        if n == f"{name}_bucket" and _match(lab, labels):
            le = float(lab["le"])
            buckets[le] = buckets.get(le, 0.0) + v
    total = buckets.get(math.inf, 0.0)
    out: dict[str, float | None] = {}
    for q in QUANTILES:
        key = f"p{round(q * 100)}"
        if total <= 0:
            out[key] = None
            continue
        rank, prev_le, prev_count = q * total, 0.0, 0.0
        value = None
        for le in sorted(buckets):
            count = buckets[le]
            if count >= rank:
                if math.isinf(le):
                    value = prev_le
                else:
                    span = count - prev_count
                    frac = (rank - prev_count) / span if span > 0 else 1.0
                    value = prev_le + (le - prev_le) * frac
                break
            prev_le, prev_count = le, count
        out[key] = value
    return out


def summarize(
    obs: list[Observation],
    *,
    samples: list[Sample],
    platform: str,
    sim_stats: dict[str, Any],
    memory_mb: dict[str, float | None],
    workers: int,
) -> dict[str, Any]:
    """One design's numbers."""
    sent = [o for o in obs if o.sent_s is not None]
    kinds = [o.kind for o in sent]
    answered = [o for o in sent if o.kind == "answer"]
    ttft = [o.ttft_s for o in answered if o.ttft_s is not None]
    full = [o.full_s for o in answered if o.full_s is not None]
    acks = [o.ack_s for o in sent if o.ack_s is not None]
    ends = [o.done_s for o in sent if o.done_s is not None]
    starts = [o.sent_s for o in sent if o.sent_s is not None]
    span = (max(ends) - min(starts)) if ends and starts else 0.0
    return {
        "sent": len(sent),
        "accepted": sum(1 for k in kinds if k != "rejected"),
        "answered": len(answered),
        "errors": sum(1 for k in kinds if k in ("error", "rejected")),
        "rejected": sum(1 for k in kinds if k == "rejected"),
        "notices": sum(1 for k in kinds if k == "notice"),
        # Refused at the door (the 202 said so); those with no notice of their own
        # (told earlier in the window) are not "unanswered": nothing was accepted.
        "refused_at_door": sum(1 for o in sent if o.refused),
        "refused_quietly": sum(1 for o in sent if o.refused and o.kind is None),
        "unanswered": sum(1 for o in sent if o.kind is None and not o.refused),
        "provider_429s": int(sim_stats.get("rate_limited", 0)),
        "llm_calls": int(sim_stats.get("requests", 0)),
        "llm_completions": int(sim_stats.get("completions", 0)),
        "cache_hits": sum(1 for o in sent if o.cached),
        "cache_hit_full_reply_s": quantiles(
            [o.full_s for o in answered if o.cached and o.full_s is not None]
        ),
        "ack_s": quantiles(acks),
        "ttft_s": quantiles(ttft),
        "full_reply_s": quantiles(full),
        "first_visible_s": first_visible(sent),
        "answered_within_60s": answered_within(sent),
        "lanes": by_lane(sent),
        "users": by_user_kind(sent),
        "overhead_s": histogram_quantiles(
            samples, "sluice_job_overhead_seconds", platform=platform
        ),
        "queue_wait_s": histogram_quantiles(samples, "sluice_queue_wait_seconds"),
        "delivery_s": histogram_quantiles(samples, "sluice_delivery_seconds", platform=platform),
        "db_transactions": int(metric_total(samples, "sluice_db_transactions_total")),
        "peak_memory_mb": memory_mb,
        "workers": workers,
        "span_s": span,
        "answered_per_s": len(answered) / span if span > 0 else 0.0,
        "timeline": [
            [
                round(o.sent_s, 3),
                None if o.ttft_s is None else round(o.ttft_s, 3),
                None if o.full_s is None else round(o.full_s, 3),
                o.kind,
            ]
            for o in sent
            if o.sent_s is not None
        ],
    }


def by_lane(sent: list[Observation]) -> dict[str, dict[str, Any]]:
    """Per lane (high, default, bulk first): messages sent, answered, errors users saw,
    and p50/p95/p99 time to first token and to the full reply of the answered ones."""
    lanes: dict[str, list[Observation]] = {}
    for o in sent:
        lanes.setdefault(o.lane or o.planned.lane, []).append(o)
    order = [lane for lane in LANES if lane in lanes] + sorted(set(lanes) - set(LANES))
    out: dict[str, dict[str, Any]] = {}
    for lane in order:
        obs = lanes[lane]
        answered = [o for o in obs if o.kind == "answer"]
        out[lane] = {
            "sent": len(obs),
            "answered": len(answered),
            "errors": sum(1 for o in obs if o.kind in ("error", "rejected")),
            "ttft_s": quantiles([o.ttft_s for o in answered if o.ttft_s is not None]),
            "full_reply_s": quantiles([o.full_s for o in answered if o.full_s is not None]),
            "first_visible_s": first_visible(obs),
            "answered_within_60s": answered_within(obs),
        }
    return out


def consistent(summary: dict[str, Any]) -> bool:
    """Every sent message is accounted for exactly once, overall and over the lanes."""
    lanes = summary.get("lanes", {}).values()
    return bool(
        summary["answered"]
        + summary["errors"]
        + summary["notices"]
        + summary["unanswered"]
        + summary.get("refused_quietly", 0)
        == summary["sent"]
        == sum(lane["sent"] for lane in lanes)
        and sum(lane["answered"] for lane in lanes) == summary["answered"]
        and sum(lane["errors"] for lane in lanes) == summary["errors"]
    )


# --------------------------------------------------------------------------- table


def _ms(v: float | None) -> str:
    return "-" if v is None else f"{v * 1000:,.0f} ms"


def _q(d: dict[str, float | None]) -> str:
    return " / ".join(_ms(d.get(k)) for k in ("p50", "p95", "p99"))


def _qv(d: dict[str, float | None]) -> str:
    # First visible: None means the quantile fell among messages that showed nothing.
    return " / ".join("never" if d.get(k) is None else _ms(d.get(k)) for k in ("p50", "p95", "p99"))


def _mem(d: dict[str, float | None]) -> str:
    parts = [f"{k} {v:.0f}" for k, v in d.items() if v is not None]
    return ", ".join(parts) + " MiB" if parts else "-"


def _quota(s: dict[str, Any]) -> str:
    if "quota_use_in_backlog" not in s:
        return "n/a"  # the naive design has no budget to measure
    v = s["quota_use_in_backlog"]
    return "no budget backlog" if v is None else f"{v:.0%}"


def _providers(s: dict[str, Any]) -> str:
    pool = s.get("providers")
    if not pool:
        return "-"
    return ", ".join(
        f"{name} {p['completions']:,}" + (" (killed)" if p.get("killed") else "")
        for name, p in pool.items()
    )


def _lane(lane: str, field: str) -> Any:
    def fmt(s: dict[str, Any]) -> str:
        row = s.get("lanes", {}).get(lane)
        if row is None:
            return "-"
        if field == "count":
            return (
                f"{row['sent']:,} / {row['answered']:,} / {row['errors']:,}"
                f" / {row.get('answered_within_60s', 0):,}"
            )
        if field == "first_visible_s":
            return _qv(row[field]) if field in row else "-"
        return _q(row[field])

    return fmt


LANE_ROWS: list[tuple[str, Any]] = [
    row
    for lane in LANES
    for row in (
        (f"{lane} lane: sent / answered / errors / in 60 s", _lane(lane, "count")),
        ("  first visible p50/p95/p99", _lane(lane, "first_visible_s")),
        ("  first token p50/p95/p99", _lane(lane, "ttft_s")),
        ("  full reply p50/p95/p99", _lane(lane, "full_reply_s")),
    )
]


def _users(kind: str, field: str) -> Any:
    def fmt(s: dict[str, Any]) -> str:
        row = s.get("users", {}).get(kind)
        if row is None:
            return "-"
        if field == "count":
            return (
                f"{row['sent']:,} / {row['answered']:,} ({row.get('answered_by_llm', 0):,})"
                f" / {row['answered_within_60s']:,} / {row.get('notices', 0):,}"
            )
        return _qv(row[field]) if field == "first_visible_s" else _q(row[field])

    return fmt


USER_ROWS: list[tuple[str, Any]] = [
    row
    for kind in USER_KINDS
    for row in (
        (
            f"{kind} users: sent / answered (by the LLM) / in 60 s / notices",
            _users(kind, "count"),
        ),
        ("  first visible p50/p95/p99", _users(kind, "first_visible_s")),
        ("  full reply p50/p95/p99", _users(kind, "full_reply_s")),
    )
]

ROWS: list[tuple[str, Any]] = [
    ("messages sent / accepted", lambda s: f"{s['sent']:,} / {s.get('accepted', s['sent']):,}"),
    ("answered", lambda s: f"{s['answered']:,}"),
    ("answered within 60 s", lambda s: f"{s.get('answered_within_60s', 0):,}"),
    (
        "errors users saw",
        lambda s: f"{s['errors']:,}" + (f" ({s['rejected']} refused)" if s["rejected"] else ""),
    ),
    ("rate-limit notices", lambda s: f"{s['notices']:,}"),
    (
        "refused at the door (of which quietly)",
        lambda s: f"{s.get('refused_at_door', 0):,} ({s.get('refused_quietly', 0):,})",
    ),
    ("no reply by the end", lambda s: f"{s['unanswered']:,}"),
    ("provider 429s", lambda s: f"{s['provider_429s']:,}"),
    ("LLM calls (completed)", lambda s: f"{s['llm_calls']:,} ({s['llm_completions']:,})"),
    ("cache hits", lambda s: f"{s['cache_hits']:,}"),
    (
        "  cache hits: full reply p50/p95/p99",
        lambda s: _q(s["cache_hit_full_reply_s"]) if "cache_hit_full_reply_s" in s else "-",
    ),
    ("quota use while backlog", _quota),
    ("answers per provider (pool)", lambda s: _providers(s)),
    ("platform ack p50/p95/p99", lambda s: _q(s["ack_s"])),
    ("first visible p50/p95/p99", lambda s: _qv(s["first_visible_s"])),
    ("first token p50/p95/p99", lambda s: _q(s["ttft_s"])),
    ("full reply p50/p95/p99", lambda s: _q(s["full_reply_s"])),
    *LANE_ROWS,
    *USER_ROWS,
    ("framework overhead p50/p95/p99", lambda s: _q(s["overhead_s"])),
    ("  of which queue wait", lambda s: _q(s["queue_wait_s"])),
    ("  of which delivery", lambda s: _q(s["delivery_s"])),
    ("database transactions", lambda s: f"{s['db_transactions']:,}"),
    (
        "Redis commands per message",
        lambda s: (
            f"{s['redis_commands_per_message']:.1f}" if "redis_commands_per_message" in s else "-"
        ),
    ),
    (
        "  top commands (per message)",
        lambda s: _top_commands(s),
    ),
    (
        "Redis CPU per message",
        lambda s: (
            f"{s['redis_cpu_us_per_message']:.0f} µs" if "redis_cpu_us_per_message" in s else "-"
        ),
    ),
    (
        "worker CPU per message",
        lambda s: (
            f"{s['worker_cpu_ms_per_message']:.2f} ms" if "worker_cpu_ms_per_message" in s else "-"
        ),
    ),
    (
        "Redis used_memory growth (peak)",
        lambda s: (
            f"{s['redis_memory_growth_mb']:.1f} MiB" if "redis_memory_growth_mb" in s else "-"
        ),
    ),
    ("answered per second", lambda s: f"{s['answered_per_s']:.1f}"),
    ("peak memory", lambda s: _mem(s["peak_memory_mb"])),
]


def _top_commands(s: dict[str, Any], n: int = 5) -> str:
    by_command: dict[str, int] = s.get("redis_commands_by_command") or {}
    sent = max(1, int(s.get("sent", 0)))
    top = list(by_command.items())[:n]
    return ", ".join(f"{k} {v / sent:.1f}" for k, v in top) if top else "-"


def table(report: dict[str, Any]) -> Table:
    """The side-by-side table."""
    sc = report["scenario"]
    t = Table(
        title=f"sluice bench {sc['name']}: {sc['total_messages']:,} messages from "
        f"{sc['users']:,} users in {sc['duration_s']:.0f} s; provider {sc['rpm'] or '∞'} rpm"
    )
    designs = report["designs"]
    t.add_column("")
    for name in designs:
        t.add_column(name, justify="right")
    for label, fmt in ROWS:
        t.add_row(label, *(fmt(designs[n]) for n in designs))
    return t


# --------------------------------------------------------------------------- chart

COLORS = {"sluice": "#1f77b4", "naive": "#d62728"}
W, H, PAD = 720, 300, 48


def _scatter(designs: dict[str, Any]) -> str:
    pts = [
        (name, x, y)
        for name, s in designs.items()
        for x, _ttft, y, kind in s["timeline"]
        if y is not None and kind == "answer"
    ]
    if not pts:
        return "<p>No answered messages.</p>"
    xmax = max(p[1] for p in pts) or 1.0
    ymax = max(p[2] for p in pts) or 1.0
    out = [f'<svg width="{W}" height="{H}" xmlns="http://www.w3.org/2000/svg">']
    out += _axes(xmax, ymax, "message sent at (s)", "full reply (s)")
    for name, x, y in pts:
        cx = PAD + (W - 2 * PAD) * x / xmax
        cy = H - PAD - (H - 2 * PAD) * y / ymax
        out.append(
            f'<circle cx="{cx:.1f}" cy="{cy:.1f}" r="1.6" fill="{COLORS.get(name, "#555")}" '
            'fill-opacity="0.5"/>'
        )
    out.append("</svg>")
    return "\n".join(out)


def _cdf(designs: dict[str, Any]) -> str:
    series = {
        name: sorted(y for _x, _t, y, kind in s["timeline"] if y is not None and kind == "answer")
        for name, s in designs.items()
    }
    xmax = max((v[-1] for v in series.values() if v), default=1.0) or 1.0
    out = [f'<svg width="{W}" height="{H}" xmlns="http://www.w3.org/2000/svg">']
    out += _axes(xmax, 1.0, "full reply (s)", "share of answers")
    for name, ys in series.items():
        if not ys:
            continue
        step = max(1, len(ys) // 400)
        coords = []
        for i in range(0, len(ys), step):
            cx = PAD + (W - 2 * PAD) * ys[i] / xmax
            cy = H - PAD - (H - 2 * PAD) * (i + 1) / len(ys)
            coords.append(f"{cx:.1f},{cy:.1f}")
        out.append(
            f'<polyline fill="none" stroke="{COLORS.get(name, "#555")}" stroke-width="2" '
            f'points="{" ".join(coords)}"/>'
        )
    out.append("</svg>")
    return "\n".join(out)


def _axes(xmax: float, ymax: float, xlabel: str, ylabel: str) -> list[str]:
    out = [
        f'<line x1="{PAD}" y1="{H - PAD}" x2="{W - PAD}" y2="{H - PAD}" stroke="#333"/>',
        f'<line x1="{PAD}" y1="{PAD}" x2="{PAD}" y2="{H - PAD}" stroke="#333"/>',
        f'<text x="{W / 2}" y="{H - 10}" text-anchor="middle" font-size="12">{xlabel}</text>',
        f'<text x="12" y="{H / 2}" font-size="12" transform="rotate(-90 12 {H / 2})" '
        f'text-anchor="middle">{ylabel}</text>',
    ]
    for i in range(5):
        fx, fy = xmax * i / 4, ymax * i / 4
        x = PAD + (W - 2 * PAD) * i / 4
        y = H - PAD - (H - 2 * PAD) * i / 4
        out.append(
            f'<text x="{x:.0f}" y="{H - PAD + 16}" font-size="10" '
            f'text-anchor="middle">{fx:.3g}</text>'
        )
        out.append(
            f'<text x="{PAD - 6}" y="{y:.0f}" font-size="10" text-anchor="end">{fy:.3g}</text>'
        )
    return out


def html_report(report: dict[str, Any]) -> str:
    """A self-contained HTML page: the table and two inline SVG charts."""
    designs = report["designs"]
    legend = " ".join(
        f'<span style="color:{COLORS.get(n, "#555")}">&#9679; {html.escape(n)}</span>'
        for n in designs
    )
    rows = "".join(
        "<tr><th>"
        + html.escape(label)
        + "</th>"
        + "".join(f"<td>{html.escape(fmt(designs[n]))}</td>" for n in designs)
        + "</tr>"
        for label, fmt in ROWS
    )
    head = "".join(f"<th>{html.escape(n)}</th>" for n in designs)
    name = html.escape(report["scenario"]["name"])
    return f"""<!doctype html>
<html><head><meta charset="utf-8"><title>sluice bench {name}</title>
<style>body{{font-family:sans-serif;margin:2em}}td,th{{padding:2px 10px;text-align:right}}
th:first-child{{text-align:left}}</style></head><body>
<h1>sluice bench: {html.escape(report["scenario"]["name"])}</h1>
<p><code>{html.escape(report["command"])}</code> &mdash; {html.escape(report["started_at"])}</p>
<table><tr><th></th>{head}</tr>{rows}</table>
<h2>Latency over time (answered messages)</h2><p>{legend}</p>{_scatter(designs)}
<h2>Distribution of full-reply time</h2><p>{legend}</p>{_cdf(designs)}
</body></html>
"""


def write(report: dict[str, Any], out_dir: Path) -> tuple[Path, Path]:
    """Write ``<scenario>.json`` and ``<scenario>.html``; returns their paths."""
    out_dir.mkdir(parents=True, exist_ok=True)
    name = report["scenario"]["name"]
    json_path = out_dir / f"{name}.json"
    html_path = out_dir / f"{name}.html"
    json_path.write_text(json.dumps(report, indent=1), "utf-8")
    html_path.write_text(html_report(report), "utf-8")
    return json_path, html_path


def lanes_table(rows: list[dict[str, Any]]) -> Table:
    """``--scenario lanes``: p95 wait per lane and time until all answered, per mode."""
    t = Table(title="score ordering vs one queue per lane (same load, same worker slots)")
    for col in ("mode", "workers x slots", "p95 wait high", "default", "bulk", "all answered in"):
        t.add_column(col)

    def s(v: float | None) -> str:
        return "-" if v is None else f"{v:.2f} s"

    for r in rows:
        w = r["p95_wait_s"]
        slots = f"{r['workers']} x {r['slots'] // r['workers']}"
        t.add_row(
            r["mode"], slots, s(w["high"]), s(w["default"]), s(w["bulk"]), s(r["all_answered_s"])
        )
    return t
