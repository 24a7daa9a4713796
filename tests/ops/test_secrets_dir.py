"""SLUICE_SECRETS_DIR: settings read from a mounted Kubernetes Secret (one file per key).

Precedence, as documented in docs/deploy.md: arguments, then the environment, then
``.env``, then the files. A missing directory is a clear error at start-up.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from core.settings import Settings


@pytest.fixture
def secrets(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.chdir(tmp_path)  # no stray .env
    for name in ("OPENAI_API_KEY", "SLACK_SIGNING_SECRET", "DATABASE_URL", "REDIS_URL"):
        monkeypatch.delenv(name, raising=False)
    folder = tmp_path / "secrets"
    folder.mkdir()
    # A Secret volume: one file per key, often with a trailing newline, plus
    # Kubernetes' own ..data links, which must be ignored.
    (folder / "OPENAI_API_KEY").write_text("sk-from-file\n")
    (folder / "SLACK_SIGNING_SECRET").write_text("signing-from-file")
    (folder / "DATABASE_URL").write_text("postgresql://u:p@db:5432/sluice\n")
    (folder / "SLUICE_LLM_RPM").write_text("600")
    (folder / "..data").mkdir()
    monkeypatch.setenv("SLUICE_SECRETS_DIR", str(folder))
    return folder


def test_settings_are_read_from_secret_files(secrets: Path) -> None:
    settings = Settings()
    assert settings.secrets_dir == str(secrets)
    assert settings.openai_api_key is not None
    assert settings.openai_api_key.get_secret_value() == "sk-from-file"
    assert settings.slack_signing_secret is not None
    assert settings.slack_signing_secret.get_secret_value() == "signing-from-file"
    assert settings.database_url == "postgresql://u:p@db:5432/sluice"
    assert settings.llm_rpm == 600
    # A secret read from a file is still masked when printed.
    assert "sk-from-file" not in repr(settings)


def test_environment_wins_over_a_secret_file(
    secrets: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("OPENAI_API_KEY", "sk-from-env")
    monkeypatch.setenv("SLUICE_LLM_RPM", "60")
    settings = Settings()
    assert settings.openai_api_key is not None
    assert settings.openai_api_key.get_secret_value() == "sk-from-env"
    assert settings.llm_rpm == 60
    # Keys without an environment variable still come from their files.
    assert settings.database_url == "postgresql://u:p@db:5432/sluice"


def test_dotenv_wins_over_a_secret_file(secrets: Path) -> None:
    Path(".env").write_text("OPENAI_API_KEY=sk-from-dotenv\n")
    settings = Settings()
    assert settings.openai_api_key is not None
    assert settings.openai_api_key.get_secret_value() == "sk-from-dotenv"


def test_without_the_setting_no_file_is_read(
    secrets: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("SLUICE_SECRETS_DIR")
    settings = Settings()
    assert settings.openai_api_key is None
    assert settings.database_url == "sqlite:///./sluice.db"


def test_a_missing_secrets_dir_is_a_clear_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("SLUICE_SECRETS_DIR", str(tmp_path / "nowhere"))
    with pytest.raises(ValueError, match=r"SLUICE_SECRETS_DIR=.*nowhere is not a directory"):
        Settings()
