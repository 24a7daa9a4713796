"""Bad input in the door's settings and in ids in settings: a clear error at start-up."""

from __future__ import annotations

import subprocess
import sys

import pytest
from pydantic import ValidationError

from core.messages import queued_text
from core.settings import Settings, describe_settings_error
from tests.helpers import base_env

ODD_IDS = [
    "U" * 10_000,  # 10 kB
    "U1\u202e",  # bidi override
    "U\u200b1",  # zero width space
    "U 1",
    "U1\x00",
    "\ufeffU1",  # byte order mark
    "e\u0301",  # not NFC
    "",
]


@pytest.mark.parametrize("value", [-1, 0, 5, 86_401, 1e12, float("inf")])
def test_absurd_max_wait_is_refused_with_its_name(value):
    with pytest.raises(ValidationError) as e:
        Settings(_env_file=None, max_wait_s=value)
    text = describe_settings_error(e.value)
    assert "SLUICE_MAX_WAIT_S: must be between 10 and 86400 seconds" in text


@pytest.mark.parametrize("value", [10, 600, 86_400])
def test_sane_max_wait_is_taken(value):
    assert Settings(_env_file=None, max_wait_s=value).max_wait_s == value


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("max_queued", 0),
        ("max_queued", 10**12),
        ("notice_max_jobs", 0),
        ("notice_refresh_every_s", 1),
        ("notice_refresh_after_s", -3),
    ],
)
def test_the_other_door_settings_have_bounds(field, value):
    with pytest.raises(ValidationError) as e:
        Settings(_env_file=None, **{field: value})
    assert f"SLUICE_{field.upper()}:" in describe_settings_error(e.value)


@pytest.mark.parametrize("ident", ODD_IDS)
@pytest.mark.parametrize("field", ["admin_users", "admin_tenants", "discord_allow_users"])
def test_odd_or_huge_ids_in_settings_are_refused_clearly(field, ident):
    with pytest.raises(ValidationError) as e:
        Settings(_env_file=None, **{field: ["U1", ident]})
    text = describe_settings_error(e.value)
    assert text.startswith(f"invalid settings:\n  SLUICE_{field.upper()}: the id ")
    assert len(text) < 300  # a 10 kB id is not echoed whole


def test_plain_ids_are_taken():
    ids = ["U012AB", "T0001", "123456789012345678", "web", "ユーザー1", "a-b_c.d"]
    s = Settings(_env_file=None, admin_users=ids, admin_tenants=ids)
    assert s.admin_users == ids


def test_a_command_with_bad_settings_stops_with_one_line_each_and_no_secret():
    env = {
        **base_env(),
        "SLUICE_MAX_WAIT_S": "0",
        "SLUICE_ADMIN_TENANTS": '["T1", "T\u202e2"]',
        "OPENAI_API_KEY": "sk-never-print-this-0123456789",
    }
    out = subprocess.run(
        [sys.executable, "-m", "sluice", "worker"],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 2
    assert "SLUICE_MAX_WAIT_S: must be between 10 and 86400 seconds (1 day), not 0" in out.stderr
    assert "SLUICE_ADMIN_TENANTS: the id 'T\\u202e2' contains the character U+202E" in out.stderr
    assert "Traceback" not in out.stderr
    assert "sk-never-print-this" not in out.stderr + out.stdout


def test_queued_notice_says_the_place_in_line():
    assert queued_text(40, 37) == "⏳ Queued: #37 in line, about 40 s"
    assert queued_text(150, 1200) == "⏳ Queued: #1,200 in line, about 2 min"
    assert queued_text(40) == "⏳ Queued: about 40 s"
