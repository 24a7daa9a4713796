"""``@bot.on_feedback``: only ``async def`` hooks, each run even if another raises."""

from __future__ import annotations

import pytest

from sluice import Bot, BotDefinitionError, Feedback


def _vote(vote: str = "up") -> Feedback:
    return Feedback(
        platform="slack", tenant="T1", channel="C1", message_id="C1:1.1", user="U1", vote=vote
    )


def test_a_plain_function_is_refused_with_the_shape_it_needs() -> None:
    bot = Bot()
    with pytest.raises(BotDefinitionError, match="async def nope"):

        @bot.on_feedback
        def nope(feedback: Feedback) -> None:  # type: ignore[arg-type]
            return None


async def test_every_hook_runs_and_a_failing_one_is_logged(
    caplog: pytest.LogCaptureFixture,
) -> None:
    bot = Bot()
    seen: list[str] = []

    @bot.on_feedback
    async def broken(feedback: Feedback) -> None:
        raise KeyError("boom")

    @bot.on_feedback
    async def keeps(feedback: Feedback) -> None:
        seen.append(feedback.vote)

    await bot.run_feedback_hooks(_vote("down"))
    assert seen == ["down"]
    assert "on_feedback hook broken failed" in caplog.text
