"""The Slack adapter: Events API over HTTP or Socket Mode, OAuth installs, streamed replies.

Plugin mode: ``from bots.slack import register; register(app, settings)`` adds Sluice's
listeners to an existing Bolt ``AsyncApp``.
"""

from bots.slack.listeners import register

__all__ = ["register"]
