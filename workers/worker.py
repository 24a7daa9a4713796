"""``WorkerSettings`` for arq's own CLI: ``arq workers.worker.WorkerSettings``.

Importing this module reads the settings (``REDIS_URL`` must be set); ``sluice worker``
is the usual way to run a worker and needs no such import.
"""

from __future__ import annotations

from typing import Any

from core.settings import get_settings
from workers.settings import worker_settings

_kwargs: dict[str, Any] = worker_settings(get_settings())


class WorkerSettings:
    """The worker that ``sluice worker`` runs, as an arq settings class."""

    functions = _kwargs["functions"]
    queue_name = _kwargs["queue_name"]
    redis_settings = _kwargs["redis_settings"]
    on_startup = _kwargs["on_startup"]
    on_shutdown = _kwargs["on_shutdown"]
    max_jobs = _kwargs["max_jobs"]
    poll_delay = _kwargs["poll_delay"]
    job_timeout = _kwargs["job_timeout"]
    max_tries = _kwargs["max_tries"]
    keep_result = _kwargs["keep_result"]
    health_check_interval = _kwargs["health_check_interval"]
    job_serializer = _kwargs["job_serializer"]
    job_deserializer = _kwargs["job_deserializer"]
