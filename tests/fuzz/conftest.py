"""The fuzz campaign reuses the fixtures (fakes, settings) of tests/slack and tests/discord."""

from tests.discord.conftest import discord_settings, fake  # noqa: F401
from tests.slack.conftest import fake_slack, slack_settings  # noqa: F401
