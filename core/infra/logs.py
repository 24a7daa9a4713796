"""Logging set-up: one format for every process, optional JSON, secrets masked.

Every line a Sluice process logs goes through :func:`redact` first: the message, the
traceback (each chained exception's text too) and the stack. Two nets catch secrets:

- **known values**: every secret setting (``SecretStr`` fields, the passwords inside
  ``REDIS_URL``/``DATABASE_URL``), registered by :func:`setup_logging`, and values
  learned at run time (a workspace's Slack token read from the installation store, a
  Discord interaction token) registered with :func:`register_secret`;
- **patterns**: passwords in URLs (``redis://:***@host``,
  ``postgresql://user:***@host/db``), Slack tokens (``xoxb-``, ``xoxp-``, ``xoxe-``,
  ``xapp-``), OpenAI keys (``sk-...``), Discord bot tokens and interaction tokens
  (also inside ``/webhooks/{app}/{token}`` paths), ``Authorization`` headers and
  ``password=``/``token=``-style pairs.

Uncaught exceptions (``sys.excepthook``, threads) and warnings are logged through the
same handler, so a crash's traceback is masked too.
"""

from __future__ import annotations

import json
import logging
import re
import sys
import threading
import time
from collections.abc import Callable, Iterable
from types import TracebackType
from urllib.parse import unquote, urlsplit

from core.settings import Settings

MASK = "***"
# Shorter known values would mask ordinary words; the patterns still catch their forms.
MIN_SECRET_LEN = 6


def _keep_prefix(m: re.Match[str]) -> str:
    return m.group(1) + MASK


# (pattern, replacement, hints): a pattern runs only on text that holds one of its
# hints (lower-cased), which keeps ordinary lines cheap; no hints means always.
_PATTERNS: list[tuple[re.Pattern[str], str | Callable[[re.Match[str]], str], tuple[str, ...]]] = [
    # The password part of a URL: scheme://user:PASSWORD@host, scheme://:PASSWORD@host.
    (
        re.compile(r"(?i)\b([a-z][a-z0-9+.\-]*://[^\s/@:'\"<>]*:)[^\s/@'\"<>]+(?=@)"),
        _keep_prefix,
        ("://",),
    ),
    # Slack bot, user, refresh, rotating and app-level tokens.
    (
        re.compile(r"\b((?:xox[a-z](?:\.xox[a-z])?|xapp)-)[A-Za-z0-9-]{6,}"),
        _keep_prefix,
        ("xox", "xapp-"),
    ),
    # Slack response_url and incoming webhooks carry their own credentials.
    (re.compile(r"(https://hooks\.slack\.com/)\S+"), _keep_prefix, ("hooks.slack.com",)),
    # OpenAI keys: sk-..., sk-proj-..., sk-svcacct-...
    (re.compile(r"\b(sk-)[A-Za-z0-9_\-]{12,}"), _keep_prefix, ("sk-",)),
    # Discord bot tokens (base64 id . timestamp . hmac) and other JWT-shaped tokens.
    (re.compile(r"\b[A-Za-z0-9_\-]{20,}\.[A-Za-z0-9_\-]{6,}\.[A-Za-z0-9_\-]{20,}"), MASK, ()),
    # Discord interaction tokens ("interaction:" in base64) and the paths that hold them.
    (re.compile(r"\baW50ZXJhY3Rpb246[A-Za-z0-9_\-]+"), MASK, ("aw50zxjhy3rpb246",)),
    (
        re.compile(r"(/(?:webhooks|interactions)/\d+/)[^/\s?#'\"]+"),
        _keep_prefix,
        ("/webhooks/", "/interactions/"),
    ),
    # Authorization headers, however they are printed.
    (
        re.compile(
            r"(?i)(authorization['\"]?\s*[:=]\s*['\"]?(?:bearer|bot|basic|token)\s+)[^\s'\",}]+"
        ),
        _keep_prefix,
        ("authorization",),
    ),
    # key=value and "key": "value" pairs whose key names a secret.
    (
        re.compile(
            r"(?i)(\b(?:password|passwd|pwd|secret|client_secret|signing_secret|api_key|apikey"
            r"|access_token|refresh_token|bot_token|token)['\"]?\s*[:=]\s*['\"]?)"
            r"(?!\*\*\*)[^\s'\",&}]+"
        ),
        _keep_prefix,
        ("pass", "pwd", "secret", "api_key", "apikey", "token"),
    ),
]


# A value made only of these characters is matched as a whole run of them (cheap for
# thousands of run-time tokens); any other value goes into one regular expression.
_RUN = re.compile(r"[A-Za-z0-9_.\-]+")
# Run-time values kept (oldest forgotten first): interaction tokens live 15 minutes,
# and the patterns still catch the shapes of Slack and Discord tokens.
MAX_RUNTIME_SECRETS = 10_000


class SecretRegistry:
    """The known secret values of this process; thread-safe.

    Values set at start-up (settings) are kept for the life of the process. Values
    registered at run time (tokens) are kept up to :data:`MAX_RUNTIME_SECRETS`,
    oldest forgotten first, and matched without recompiling anything per value.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._values: set[str] = set()
        self._regex: re.Pattern[str] | None = None
        self._tokens: dict[str, None] = {}  # insertion-ordered: the oldest first
        self._length_counts: dict[int, int] = {}
        self._lengths: tuple[int, ...] = ()  # of the tokens, longest first

    def add(self, *values: str | None, runtime: bool = False) -> None:
        """Remember values to mask (empty and very short ones are ignored)."""
        wanted = [v for v in values if v and len(v) >= MIN_SECRET_LEN]
        if not wanted:
            return
        with self._lock:
            fresh: set[str] = set()
            for v in wanted:
                if runtime and _RUN.fullmatch(v):
                    self._forget_token(v)
                    self._tokens[v] = None
                    self._length_counts[len(v)] = self._length_counts.get(len(v), 0) + 1
                elif v not in self._values:
                    fresh.add(v)
            while len(self._tokens) > MAX_RUNTIME_SECRETS:
                self._forget_token(next(iter(self._tokens)))
            self._lengths = tuple(sorted(self._length_counts, reverse=True))
            if fresh:
                self._values |= fresh
                self._compile()

    def discard(self, *values: str) -> None:
        """Forget values (tests; a secret stays masked for the life of a process)."""
        with self._lock:
            self._values -= set(values)
            for v in values:
                self._forget_token(v)
            self._lengths = tuple(sorted(self._length_counts, reverse=True))
            self._compile()

    def _forget_token(self, value: str) -> None:
        if value in self._tokens:
            del self._tokens[value]
            left = self._length_counts[len(value)] - 1
            if left:
                self._length_counts[len(value)] = left
            else:
                del self._length_counts[len(value)]

    def _compile(self) -> None:
        # Longest first, so a secret that contains another is masked whole.
        ordered = sorted(self._values, key=len, reverse=True)
        self._regex = re.compile("|".join(re.escape(v) for v in ordered)) if ordered else None

    def mask(self, text: str) -> str:
        """``text`` with every known value replaced by ``***``."""
        regex = self._regex
        if regex is not None:
            text = regex.sub(MASK, text)
        if self._tokens:
            text = _RUN.sub(self._mask_run, text)
        return text

    def _mask_run(self, m: re.Match[str]) -> str:
        run, tokens, lengths = m.group(0), self._tokens, self._lengths
        if run in tokens:
            return MASK
        n = len(run)
        if not lengths or n <= lengths[-1]:
            return run
        # A token glued to other characters ("again<token>", "<token>."): look at each
        # position for each token length, longest first (a few lengths in practice).
        out: list[str] = []
        i = last = 0
        while i < n:
            for length in lengths:
                if length <= n - i and run[i : i + length] in tokens:
                    out += [run[last:i], MASK]
                    i = last = i + length
                    break
            else:
                i += 1
        if not out:
            return run
        out.append(run[last:])
        return "".join(out)


SECRETS = SecretRegistry()


def register_secret(*values: str | None) -> None:
    """Mask these values in every log line from now on (a token learned at run time)."""
    SECRETS.add(*values, runtime=True)


def redact(text: str) -> str:
    """``text`` with known secret values and secret-shaped strings replaced by ``***``."""
    if not text:
        return text
    out = SECRETS.mask(text)
    lowered = out.lower()
    for pattern, repl, hints in _PATTERNS:
        if not hints or any(h in lowered for h in hints):
            out = pattern.sub(repl, out)
    return out


def redact_url(url: str | None) -> str:
    """A URL with its password masked (``postgresql://app:***@db/prod``), for display."""
    return redact(url or "")


def url_password(url: str | None) -> str | None:
    """The password inside a URL's userinfo, if any (percent-decoded)."""
    if not url or "@" not in url:
        return None
    try:
        password = urlsplit(url).password
    except ValueError:
        return None
    return unquote(password) if password else None


class RedactSecrets(logging.Filter):
    """Masks secrets in a record's message, traceback and stack (see :func:`redact`).

    Attached to a handler, it rewrites the record once, so every formatter after it
    (and every handler the record reaches later) sees the masked text. ``secrets``
    are added to the process's known values.
    """

    def __init__(self, secrets: Iterable[str] = ()) -> None:
        super().__init__()
        SECRETS.add(*secrets)

    def filter(self, record: logging.LogRecord) -> bool:
        try:
            msg = record.getMessage()
        except Exception as e:  # a bad %-format: keep the line, say so
            msg = f"{record.msg!r} (unformattable log arguments: {type(e).__name__})"
        record.msg, record.args = redact(msg), None
        # Formatters print a record's cached exc_text instead of formatting again.
        if record.exc_info and not record.exc_text:
            record.exc_text = _FORMATTER.formatException(record.exc_info)
        if record.exc_text:
            record.exc_text = redact(record.exc_text)
        if record.stack_info:
            record.stack_info = redact(record.stack_info)
        return True


_FORMATTER = logging.Formatter()


class RedactingFormatter(logging.Formatter):
    """A plain-text formatter whose whole output (prefix, message, traceback) is masked."""

    def format(self, record: logging.LogRecord) -> str:
        return redact(super().format(record))


class JsonFormatter(logging.Formatter):
    """One JSON object per line, every field masked."""

    def format(self, record: logging.LogRecord) -> str:
        out = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname,
            "logger": record.name,
            "msg": redact(record.getMessage()),
        }
        exc = record.exc_text or (self.formatException(record.exc_info) if record.exc_info else "")
        if exc:
            out["exc"] = redact(exc)
        if record.stack_info:
            out["stack"] = redact(record.stack_info)
        return json.dumps(out, ensure_ascii=False)


def secret_values(settings: Settings) -> list[str]:
    """Every secret value in ``settings``: ``SecretStr`` fields and passwords in URLs."""
    out: list[str] = []
    for name in type(settings).model_fields:
        value = getattr(settings, name)
        if hasattr(value, "get_secret_value"):
            secret = value.get_secret_value()
            if secret:
                out.append(secret)
        elif isinstance(value, str) and "://" in value:
            password = url_password(value)
            if password:
                out.append(password)
    # The pool's keys (SLUICE_PROVIDERS) and passwords in its URLs.
    for provider in settings.providers:
        if provider.api_key is not None and provider.api_key.get_secret_value() != "none":
            out.append(provider.api_key.get_secret_value())
        password = url_password(provider.base_url)
        if password:
            out.append(password)
    return out


def _log_uncaught(
    kind: type[BaseException], value: BaseException, tb: TracebackType | None
) -> None:
    if issubclass(kind, KeyboardInterrupt):
        sys.__excepthook__(kind, value, tb)
        return
    logging.getLogger("sluice").critical("uncaught exception", exc_info=(kind, value, tb))


def _log_uncaught_in_thread(args: threading.ExceptHookArgs) -> None:
    if args.exc_value is None:
        return
    thread = args.thread.name if args.thread else "?"
    logging.getLogger("sluice").critical(
        "uncaught exception in thread %s",
        thread,
        exc_info=(args.exc_type, args.exc_value, args.exc_traceback),
    )


def setup_logging(settings: Settings, *, process: str) -> None:
    """Configure the root logger for one Sluice process, secrets masked (see the module)."""
    handler = logging.StreamHandler(sys.stderr)
    if settings.log_json:
        handler.setFormatter(JsonFormatter())
    else:
        handler.setFormatter(
            RedactingFormatter(f"%(asctime)s %(levelname)s {process} %(name)s: %(message)s")
        )
    handler.addFilter(RedactSecrets(secret_values(settings)))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(settings.log_level.upper())
    # Per-request lines from these libraries would drown the ones that matter; Alembic
    # logs its plugins and context at every schema check (core.history.store logs what it did).
    for noisy in ("httpx", "httpx2", "aiohttp.access", "openai", "alembic"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    # A crash's traceback and library warnings go through the same masking, not
    # straight to stderr.
    sys.excepthook = _log_uncaught
    threading.excepthook = _log_uncaught_in_thread
    logging.captureWarnings(True)
