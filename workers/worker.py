"""``WorkerSettings`` for arq's own CLI: ``arq workers.worker.WorkerSettings``.

This runs exactly the worker that ``sluice worker`` runs: every keyword argument comes
from :func:`workers.settings.worker_settings` (jobs, crons such as the history flush,
heartbeat, reaper, timeouts, serializer), and the worker class is
:class:`workers.settings.SluiceWorker` (its poll starts the best-scored jobs that are not
running yet). arq's CLI always builds its own ``Worker`` class from a settings class, so
importing this module points arq's ``create_worker`` at :func:`create_arq_worker` for
this settings class only; any other settings class gets arq's own worker.

Importing this module reads the settings (``REDIS_URL``, ``SLUICE_APP``, ...): a wrong
setting stops arq at start-up with the same message ``sluice worker`` gives. Logging
goes through Sluice's redacting handler, as with ``sluice worker``.

What ``sluice worker`` adds on top: a graceful drain on SIGTERM
(``SLUICE_SHUTDOWN_GRACE_S``) and a reconnect loop when Redis goes away. Under arq's
CLI, arq handles signals itself and exits when Redis is lost, so run it under a
supervisor that restarts it (Kubernetes, systemd).
"""

from __future__ import annotations

import logging
from typing import Any

import arq.cli
import arq.worker

from core.infra.logs import setup_logging
from core.settings import get_settings
from workers.settings import SluiceWorker, worker_settings

_SETTINGS = get_settings()
_KWARGS: dict[str, Any] = worker_settings(_SETTINGS)
_STARTUP = _KWARGS["on_startup"]


async def _on_startup(ctx: dict[str, Any]) -> None:
    # arq's CLI configured its own handler on the ``arq`` logger after importing this
    # module; send everything through Sluice's redacting handler instead.
    setup_logging(_SETTINGS, process="worker")
    arq_logger = logging.getLogger("arq")
    arq_logger.handlers.clear()
    arq_logger.propagate = True
    await _STARTUP(ctx)


# ``handle_signals`` stays arq's default (True): under arq's CLI arq handles SIGTERM.
WorkerSettings: type = type(
    "WorkerSettings",
    (),
    {
        "__doc__": "The worker that ``sluice worker`` runs, as an arq settings class.",
        **{k: v for k, v in _KWARGS.items() if k != "on_startup"},
        "on_startup": _on_startup,
    },
)

_arq_create_worker = arq.worker.create_worker


def create_arq_worker(settings_cls: Any, **kwargs: Any) -> arq.worker.Worker:
    """arq's ``create_worker``, but a :class:`SluiceWorker` for :data:`WorkerSettings`."""
    if settings_cls is WorkerSettings:
        # arq passes on only its own Worker's arguments; the idle block is Sluice's.
        return SluiceWorker(
            **{
                **arq.worker.get_kwargs(settings_cls),
                "idle_block_s": _KWARGS["idle_block_s"],
                **kwargs,
            }
        )
    return _arq_create_worker(settings_cls, **kwargs)


# ``arq.worker.run_worker`` looks ``create_worker`` up in its module; ``arq.cli`` (the
# ``--watch`` mode) imported it by name.
arq.worker.create_worker = create_arq_worker
arq.cli.create_worker = create_arq_worker  # type: ignore[attr-defined]
