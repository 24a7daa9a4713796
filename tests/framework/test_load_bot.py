"""SLUICE_APP: loading the bot, and the messages a wrong path or a broken module gives."""

from __future__ import annotations

import subprocess
import sys
import uuid
from pathlib import Path

import pytest

from core.errors import BotDefinitionError
from core.framework.bot import DEFAULT_BOT, Bot, load_bot
from tests.helpers import ROOT, base_env


def _module(tmp_path: Path, source: str) -> str:
    """Write a module into the current folder (the test's tmp_path); return its name."""
    name = f"userbot_{uuid.uuid4().hex[:8]}"
    (tmp_path / f"{name}.py").write_text(source)
    return name


def test_examples_load_by_import_path():
    assert load_bot("examples.faq_bot.bot:bot").name == "faq"
    support = load_bot("examples.support_bot.bot:bot")
    assert support.name == "support"
    assert {"ticket", "status", "help"} <= set(support.commands)


def test_no_path_gives_the_default_bot():
    assert load_bot(None) is DEFAULT_BOT
    assert load_bot("") is DEFAULT_BOT


def test_module_in_the_current_folder_and_a_factory_function(tmp_path):
    name = _module(
        tmp_path, "from core.framework.bot import Bot\ndef make():\n    return Bot(name='made')\n"
    )
    assert load_bot(f"{name}:make").name == "made"


@pytest.mark.parametrize(
    ("path", "message"),
    [
        (
            "mybot",
            "SLUICE_APP='mybot' is not an import path: write it as 'module:attribute', "
            "for example SLUICE_APP=mybot:bot.",
        ),
        (
            "no_such_module_xyz:bot",
            "SLUICE_APP='no_such_module_xyz:bot': cannot import module 'no_such_module_xyz' "
            "(No module named 'no_such_module_xyz'). Run Sluice from the folder that holds "
            "it, or install it, so that Python can import it.",
        ),
        (
            "examples.faq_bot.bot:robot",
            "SLUICE_APP='examples.faq_bot.bot:robot': module 'examples.faq_bot.bot' has no "
            "attribute 'robot'. Define it there, e.g. `bot = Bot(...)`.",
        ),
        (
            "examples.faq_bot.bot:FAQ",
            "SLUICE_APP='examples.faq_bot.bot:FAQ' names a list, not a core.framework.bot.Bot: "
            "point it at a Bot instance or a function returning one.",
        ),
    ],
)
def test_bad_sluice_app_path_names_the_fix(path, message):
    with pytest.raises(BotDefinitionError) as err:
        load_bot(path)
    assert str(err.value) == message


def test_module_that_fails_to_import_is_reported_with_its_error(tmp_path):
    name = _module(tmp_path, "from core.framework.bot import Bot\nbot = Bot(name=undefined_name)\n")
    with pytest.raises(BotDefinitionError) as err:
        load_bot(f"{name}:bot")
    assert str(err.value) == (
        f"SLUICE_APP='{name}:bot': importing '{name}' failed with NameError: name "
        "'undefined_name' is not defined. Fix that error in your bot module."
    )


def test_module_with_a_missing_dependency_says_to_install_it(tmp_path):
    name = _module(tmp_path, "import not_installed_pkg_xyz\n")
    with pytest.raises(BotDefinitionError) as err:
        load_bot(f"{name}:bot")
    assert "imports 'not_installed_pkg_xyz', which is not installed" in str(err.value)


def test_definition_mistake_in_the_module_is_prefixed_with_the_path():
    with pytest.raises(BotDefinitionError) as err:
        load_bot("tests.framework.broken_duplicate:bot")
    assert str(err.value) == (
        "SLUICE_APP='tests.framework.broken_duplicate:bot': Bot 'dup': two commands are "
        "named 'status' (status_a() and status_b()). Give one of them another name: "
        '@bot.command("other-name").'
    )


def test_worker_with_a_broken_bot_stops_at_start_up_with_the_message(settings):
    env = {
        **base_env(),
        "REDIS_URL": settings.redis_url or "",
        "SLUICE_APP": "tests.framework.broken_duplicate:bot",
    }
    proc = subprocess.run(
        [sys.executable, "-m", "sluice", "worker"],
        env=env,
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 2
    assert "two commands are named 'status'" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_bot_name_must_not_be_empty():
    with pytest.raises(BotDefinitionError, match="must not be empty"):
        Bot(name=" ")
