"""Logging set-up: one format for every process, optional JSON, secrets masked."""

from __future__ import annotations

import json
import logging
import sys
import time

from core.settings import Settings


class RedactSecrets(logging.Filter):
    """Masks every configured secret in log messages (defence in depth)."""

    def __init__(self, secrets: list[str]) -> None:
        super().__init__()
        self._secrets = [s for s in secrets if len(s) >= 6]

    def filter(self, record: logging.LogRecord) -> bool:
        if not self._secrets:
            return True
        msg = record.getMessage()
        redacted = msg
        for s in self._secrets:
            redacted = redacted.replace(s, "***")
        if redacted != msg:
            record.msg, record.args = redacted, None
        return True


class JsonFormatter(logging.Formatter):
    """One JSON object per line."""

    def format(self, record: logging.LogRecord) -> str:
        out = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname,
            "logger": record.name,
            "msg": record.getMessage(),
        }
        if record.exc_info:
            out["exc"] = self.formatException(record.exc_info)
        return json.dumps(out, ensure_ascii=False)


def secret_values(settings: Settings) -> list[str]:
    """Every secret value in ``settings``."""
    out: list[str] = []
    for name in type(settings).model_fields:
        value = getattr(settings, name)
        if hasattr(value, "get_secret_value"):
            secret = value.get_secret_value()
            if secret:
                out.append(secret)
    return out


def setup_logging(settings: Settings, *, process: str) -> None:
    """Configure the root logger for one Sluice process."""
    handler = logging.StreamHandler(sys.stderr)
    if settings.log_json:
        handler.setFormatter(JsonFormatter())
    else:
        handler.setFormatter(
            logging.Formatter(f"%(asctime)s %(levelname)s {process} %(name)s: %(message)s")
        )
    handler.addFilter(RedactSecrets(secret_values(settings)))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(settings.log_level.upper())
    # Per-request lines from these libraries would drown the ones that matter; Alembic
    # logs its plugins and context at every schema check (core.store logs what it did).
    for noisy in ("httpx", "httpx2", "aiohttp.access", "openai", "alembic"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
