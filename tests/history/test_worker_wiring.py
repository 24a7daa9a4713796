"""How the history jobs are wired into the arq worker."""

from __future__ import annotations

from core.settings import Settings
from workers.settings import _cron_times, worker_settings


def test_history_jobs_never_delay_the_rerun_of_a_killed_reply_job(redis_url: str) -> None:
    # arq holds a killed worker's job for the longest timeout of all functions + 10 s.
    settings = Settings(_env_file=None, redis_url=redis_url, job_timeout_s=5)  # type: ignore[call-arg]
    kw = worker_settings(settings)
    timeouts = [f.timeout_s for f in kw["functions"]] + [c.timeout_s for c in kw["cron_jobs"]]
    assert max(t for t in timeouts if t is not None) <= settings.job_timeout_s
    names = {c.name for c in kw["cron_jobs"]}
    assert {"cron:flush_history", "cron:apply_retention"} <= names


def test_flush_interval_becomes_cron_times_that_fit_an_hour() -> None:
    assert _cron_times(5) == {"second": set(range(0, 60, 5))}
    assert _cron_times(7) == {"second": set(range(0, 60, 6))}
    assert _cron_times(120) == {"minute": set(range(0, 60, 2)), "second": 0}
