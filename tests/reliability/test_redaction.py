"""Log redaction (``core.infra.logs``): known secret values and secret-shaped strings are
masked in messages, tracebacks (chained exceptions too), stacks, JSON lines and
uncaught crashes, with the handler ``setup_logging`` installs.

The end-to-end check over every process, Redis, ``sluice status`` and the replies is
``tests/reliability/test_secrets_everywhere.py``.
"""

from __future__ import annotations

import io
import json
import logging
import subprocess
import sys
import uuid
from collections.abc import Iterator

import pytest
from pydantic import SecretStr

from core.infra.logs import (
    SECRETS,
    JsonFormatter,
    RedactingFormatter,
    RedactSecrets,
    redact,
    register_secret,
    secret_values,
)
from core.settings import Settings
from tests.helpers import ROOT, base_env


def _hex() -> str:
    return uuid.uuid4().hex


@pytest.fixture
def capture() -> Iterator[tuple[logging.Logger, io.StringIO, io.StringIO]]:
    """A logger writing plain text and JSON, each through the masking filter."""
    plain, as_json = io.StringIO(), io.StringIO()
    logger = logging.getLogger(f"test.redaction.{_hex()}")
    logger.propagate = False
    logger.setLevel(logging.DEBUG)
    for stream, formatter in (
        (plain, RedactingFormatter("%(levelname)s %(name)s: %(message)s")),
        (as_json, JsonFormatter()),
    ):
        handler = logging.StreamHandler(stream)
        handler.setFormatter(formatter)
        handler.addFilter(RedactSecrets())
        logger.addHandler(handler)
    yield logger, plain, as_json
    logger.handlers.clear()


def _raise_chained(outer: str, inner: str) -> None:
    try:
        raise ConnectionError(inner)
    except ConnectionError as e:
        raise RuntimeError(outer) from e


def test_traceback_and_chained_exceptions_are_masked(capture):
    logger, plain, as_json = capture
    known = f"known{_hex()}"
    register_secret(known)
    pw = f"pw{_hex()}"
    try:
        try:
            _raise_chained(
                f"lookup failed for postgresql://app:{pw}@db.internal:5432/prod",
                f"auth refused with key {known}",
            )
        except RuntimeError:
            logger.exception("tool raised")
    finally:
        SECRETS.discard(known)
    for out in (plain.getvalue(), as_json.getvalue()):
        assert "ConnectionError" in out and "RuntimeError" in out  # the chain is there
        assert "The above exception was the direct cause" in out
        assert known not in out and pw not in out
        assert "postgresql://app:***@db.internal:5432/prod" in out
        assert "auth refused with key ***" in out


def test_stack_info_and_arguments_are_masked(capture):
    logger, plain, as_json = capture
    token = f"xoxp-1-{_hex()}"
    logger.warning("token %s", token, stack_info=True)
    for out in (plain.getvalue(), as_json.getvalue()):
        assert token not in out and "xoxp-***" in out
    assert "Stack (most recent call last)" in plain.getvalue()
    assert json.loads(as_json.getvalue().splitlines()[0])["stack"]


@pytest.mark.parametrize(
    ("text", "secret", "shown"),
    [
        ("redis://:{s}@cache.internal:6379/0", "s3cr3t-redis", "redis://:***@cache.internal"),
        ("postgresql://app:{s}@db/prod", "pg-Pa55word", "postgresql://app:***@db/prod"),
        ("rediss://default:{s}@r.example:6380", "x" * 4, "rediss://default:***@"),
        ("bot xoxb-{s}", "123-456-abcdefABCDEF", "xoxb-***"),
        ("user xoxp-{s}", "1-2-3-abcdef0123", "xoxp-***"),
        ("rotating xoxe.xoxp-{s}", "1-abcdef0123456", "xoxe.xoxp-***"),
        ("refresh xoxe-{s}", "1-abcdef0123456", "xoxe-***"),
        ("app-level xapp-{s}", "1-A0-123-abcdef", "xapp-***"),
        ("key sk-{s}", "proj-abcdefghijklmnop1234", "sk-***"),
        (
            "discord {s}",
            "MTIzNDU2Nzg5MDEyMzQ1Njc4.GaBcDe.abcdefghijklmnopqrstuvwxyz0123",
            "discord ***",
        ),
        ("interaction aW50ZXJhY3Rpb246{s}", "MTIzNDU2OjE2MzQ1Njc4OTA", "interaction ***"),
        (
            "PATCH https://discord.com/api/v10/webhooks/123456/{s}/messages/@original",
            "itoken-abcdef0123",
            "/webhooks/123456/***/messages/@original",
        ),
        ("POST /interactions/998877/{s}/callback", "tok-abcdef0123", "/interactions/998877/***/"),
        ("headers {{'Authorization': 'Bearer {s}'}}", "opaque-value-123", "Bearer ***"),
        ("Authorization: Bot {s}", "opaque-value-456", "Bot ***"),
        ('{{"client_secret": "{s}"}}', "abc123def456", '"client_secret": "***"'),
        ("password={s}&user=x", "hunter2hunter2", "password=***&user=x"),
        ("response_url https://hooks.slack.com/commands/{s}", "T1/123/abcXYZ", "slack.com/***"),
    ],
)
def test_secret_shaped_strings_are_masked_by_pattern(text, secret, shown):
    line = text.format(s=secret)
    out = redact(line)
    assert secret not in out, out
    assert shown in out, out


def test_ordinary_lines_are_left_alone():
    for line in (
        "job done platform=web tenant=web message=m1 job=reply:web:web:m1 kind=answer in 0.20s",
        "redis://127.0.0.1:6379/0 and http://host:8080/path@x",
        "tokens_in=12 tokens_out=40 max_tokens=100",
        'File "/work/workers/jobs.py", line 10, in answer_message',
    ):
        assert redact(line) == line


def test_known_values_registered_at_run_time_are_masked_wherever_they_appear(capture):
    logger, plain, _ = capture
    token = f"itoken-{_hex()}"  # no recognisable shape: only registration catches it
    logger.info("before %s", token)
    register_secret(token)
    try:
        logger.info("after %s and again%s", token, token)
    finally:
        SECRETS.discard(token)
    before, after = plain.getvalue().splitlines()
    assert token in before  # shows the test can see an unmasked value
    assert token not in after and after.endswith("after *** and again***")


def test_settings_secrets_and_url_passwords_are_known_values():
    s = Settings(
        _env_file=None,
        redis_url="redis://sluice:redispass123@127.0.0.1:6379/0",
        database_url="postgresql://app:pg%2Fpass123@db/prod",
        openai_api_key=SecretStr("k" * 20),
        slack_signing_secret=SecretStr("signing-secret-1"),
        encryption_key=SecretStr("fernet-key-value"),
    )
    values = secret_values(s)
    for v in ("redispass123", "pg/pass123", "k" * 20, "signing-secret-1", "fernet-key-value"):
        assert v in values


def test_a_crash_and_a_warning_in_a_process_with_sluice_logging_are_masked(tmp_path):
    pw, key = f"pw{_hex()}", f"signing{_hex()}"
    code = (
        "from core.infra.logs import setup_logging\n"
        "from core.settings import Settings\n"
        f"s = Settings(_env_file=None, slack_signing_secret={key!r})\n"
        "setup_logging(s, process='test')\n"
        "def boom():\n"
        f"    raise ValueError('signing with ' + {key!r})\n"
        "import warnings\n"
        f"warnings.warn('retrying with password={key}')\n"
        "try:\n"
        "    boom()\n"
        "except ValueError as e:\n"
        f"    raise RuntimeError('cannot reach redis://:{pw}@10.0.0.9:6379') from e\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code],
        cwd=ROOT,
        env=base_env(),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 1
    err = result.stderr
    assert "CRITICAL test sluice: uncaught exception" in err, err
    assert "ValueError: signing with ***" in err and "redis://:***@10.0.0.9:6379" in err
    assert "WARNING test py.warnings:" in err and "retrying with password=***" in err
    assert pw not in err + result.stdout and key not in err + result.stdout


async def test_a_workspace_token_read_from_the_installation_store_is_masked(tmp_path):
    from cryptography.fernet import Fernet
    from slack_sdk.oauth.installation_store import Installation

    from bots.slack.installations import SQLInstallationStore

    s = Settings(
        _env_file=None,
        database_url=f"sqlite:///{tmp_path}/installs.db",
        encryption_key=SecretStr(Fernet.generate_key().decode()),
    )
    bot_token, user_token = f"wstoken-{_hex()}", f"wsuser-{_hex()}"  # shapes no pattern knows
    saver = SQLInstallationStore(s)
    await saver.async_save(
        Installation(team_id="TW1", bot_token=bot_token, user_token=user_token, user_id="U1")
    )
    await saver.close()
    assert redact(bot_token) == "***"  # the adapter that stored it masks it
    # Another process (a worker) that only reads it from the store masks it too.
    SECRETS.discard(bot_token, user_token)
    assert redact(bot_token) == bot_token
    reader = SQLInstallationStore(s)
    try:
        found = await reader.async_find_bot(enterprise_id=None, team_id="TW1")
        assert found is not None and found.bot_token == bot_token
        line = f"chat.postMessage with {bot_token} for {user_token} failed"
        assert redact(line) == "chat.postMessage with *** for *** failed"
    finally:
        await reader.close()
        SECRETS.discard(bot_token, user_token)


def test_a_failed_jobs_exception_is_kept_in_its_arq_result_masked():
    from core.infra.serializer import deserialize, serialize

    pw = f"pw{_hex()}"
    error = RuntimeError(f"connect to postgresql://app:{pw}@db.internal/prod failed")
    stored = serialize({"s": False, "r": error, "t": 1})  # what arq writes for a failed job
    assert pw.encode() not in stored
    assert deserialize(stored)["r"] == (
        "RuntimeError: connect to postgresql://app:***@db.internal/prod failed"
    )


def test_run_time_tokens_are_masked_in_any_context_and_the_oldest_forgotten_past_the_bound():
    from core.infra.logs import MAX_RUNTIME_SECRETS

    tokens = [f"rt-{i}-{_hex()}" for i in range(MAX_RUNTIME_SECRETS + 1)]
    register_secret(*tokens)
    try:
        first, last = tokens[0], tokens[-1]
        for line, shown in (
            (f"PATCH /webhooks/1/{last}/messages/@original", "/webhooks/1/***/messages"),
            (f"token={last}&x=1", "token=***&x=1"),
            (f"it was {last}.", "it was ***."),
            (f"('{last}', 3)", "('***', 3)"),
        ):
            out = redact(line)
            assert last not in out and shown in out, out
        assert redact(f"old {first}") == f"old {first}"  # forgotten: the bound holds
        assert redact(f"{tokens[1]} and {tokens[-2]}") == "*** and ***"
    finally:
        SECRETS.discard(*tokens)
