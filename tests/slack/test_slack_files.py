"""Files shared in Slack: signed events with ``files`` -> adapter -> a `sluice worker`
process that downloads each ``url_private`` from the fake Slack (with the bot token)
-> the simulator gets image parts and file text -> one reply with a notice for each
refused file. History keeps references, never bytes."""

from __future__ import annotations

import asyncio
import json
import re
import time
from typing import Any

import pytest
from redis.asyncio import Redis

from bots.slack.responder import SlackResponderFactory
from core.errors import FileRefusedError
from core.history.hot import unpack_turn
from core.infra.redis import Keys
from core.messages import FileRef, IncomingMessage
from core.settings import Settings
from tests.fakes.slack_api import FakeSlackAPI
from tests.files.samples import BROKEN_PDF, NOT_AN_IMAGE, png, text_pdf
from tests.slack.conftest import BOT_TOKEN, mention, message, worker_env


def final_replies(fake: FakeSlackAPI, marker: str) -> list[Any]:
    return [m for m in fake.replies() if marker in m.text and not m.streaming]


async def reply_with(fake: FakeSlackAPI, marker: str) -> str:
    await fake.wait_for(lambda: final_replies(fake, marker), timeout_s=40)
    [reply] = final_replies(fake, marker)
    return str(reply.text)


def user_contents(sim_requests: list[dict[str, Any]], marker: str) -> list[Any]:
    """The last user message's content of each model request whose text has ``marker``."""
    found = []
    for body in sim_requests:
        users = [m for m in body.get("messages", []) if m.get("role") == "user"]
        if users and marker in json.dumps(users[-1].get("content")):
            found.append(users[-1]["content"])
    return found


async def stored_user_turn(redis: Redis, settings: Settings, cid: str, message_id: str) -> Any:
    """The user's turn in the hot window (written just after the reply), and every entry."""
    deadline = time.monotonic() + 30
    while True:
        raw = await redis.lrange(Keys(settings.key_prefix).history(cid), 0, -1)
        turns = [t for t in map(unpack_turn, raw) if t.message_id == message_id]
        if turns or time.monotonic() > deadline:
            [turn] = turns
            return turn, raw
        await asyncio.sleep(0.05)


async def test_a_mention_with_an_image_a_text_file_and_a_pdf_reaches_the_model_with_all_three(
    slack_settings: Settings, adapter, worker_process, fake_slack: FakeSlackAPI, llm_sim, redis
) -> None:
    settings = slack_settings.model_copy(update={"vision": True})
    worker_process(worker_env(settings))
    files = [
        fake_slack.add_file("chart.png", png(640, 480), "image/png"),
        fake_slack.add_file("notes.txt", b"the launch is on Tuesday", "text/plain"),
        fake_slack.add_file("report.pdf", text_pdf("Revenue grew nine percent"), "application/pdf"),
    ]
    event = {**mention("files-marker-1 what do these say", "500.1"), "files": files}
    async with adapter(settings) as a:
        assert (await a.send.event(event))[0] == 200
        text = await reply_with(fake_slack, "Echo: files-marker-1")
    assert "[image 640x480]" in text  # the simulator decoded the image part it received
    [content] = user_contents(llm_sim.requests(), "files-marker-1")
    assert isinstance(content, list)
    [text_part] = [p for p in content if p["type"] == "text"]
    assert "the launch is on Tuesday" in text_part["text"]
    assert "Revenue grew nine percent" in text_part["text"]
    [image_part] = [p for p in content if p["type"] == "image_url"]
    assert image_part["image_url"]["url"].startswith("data:image/jpeg;base64,")
    # Downloaded with the workspace's bot token, each file once.
    assert sorted(f.key for f in fake_slack.file_server.fetches) == sorted(f["id"] for f in files)
    assert {f.authorization for f in fake_slack.file_server.fetches} == {f"Bearer {BOT_TOKEN}"}
    # History keeps references (id, name, type, size), never bytes or URLs.
    turn, raw = await stored_user_turn(redis, settings, "slack:T1:C1:500.1", "C1:500.1")
    assert [(f.id, f.name, f.mimetype, f.size) for f in turn.files] == [
        (f["id"], f["name"], f["mimetype"], f["size"]) for f in files
    ]
    assert all(b"files-pri" not in r and len(r) < 4000 for r in raw)


async def test_bad_files_each_get_a_clear_notice_and_the_message_is_still_answered(
    slack_settings: Settings, adapter, worker_process, fake_slack: FakeSlackAPI, llm_sim
) -> None:
    settings = slack_settings.model_copy(
        update={"vision": True, "file_max_bytes": 1_000_000, "file_max_count": 10}
    )
    worker = worker_process(worker_env(settings))
    files = [
        # Declares 200 MB: refused from the declared size, never downloaded.
        fake_slack.add_file("huge.zip", b"PK", "application/zip", size=200_000_000),
        fake_slack.add_file("photo.png", NOT_AN_IMAGE, "image/png"),
        fake_slack.add_file("broken.pdf", BROKEN_PDF, "application/pdf"),
        # Declares 1 KB but streams 3 MB without a length: stopped at the limit.
        fake_slack.add_file("liar.txt", b"z" * 3_000_000, "text/plain", size=1000, chunked=True),
        # Another workspace's file: Slack answers the bot token with its sign-in page.
        fake_slack.add_file("theirs.txt", b"not for you", "text/plain", team_id="T9"),
        # Not on Slack's file host: the token is never sent there.
        {
            "id": "F9",
            "name": "elsewhere.txt",
            "mimetype": "text/plain",
            "size": 5,
            "url_private": "https://files.example.com/steal.txt",
        },
    ]
    event = {**mention("files-marker-2 check these", "510.1"), "files": files}
    async with adapter(settings) as a:
        assert (await a.send.event(event))[0] == 200
        text = await reply_with(fake_slack, "Echo: files-marker-2")
    assert re.search(r"huge\.zip`? is too large \(200\.0 MB; the limit is 1\.0 MB\)", text), text
    assert re.search(r"photo\.png`? is not an image", text), text
    assert re.search(r"broken\.pdf`? could not be read", text), text
    assert re.search(r"liar\.txt`? is too large \(more than 1\.0 MB", text), text
    assert re.search(r"Slack did not let me download `?theirs\.txt", text), text
    assert re.search(r"elsewhere\.txt`? is not a Slack file", text), text
    assert files[0]["id"] not in {f.key for f in fake_slack.file_server.fetches}
    [content] = user_contents(llm_sim.requests(), "files-marker-2")
    assert content == "files-marker-2 check these"  # nothing of the refused files
    assert "Traceback" not in worker.output()


async def test_an_image_when_the_model_has_no_vision_gets_a_notice_and_is_not_downloaded(
    slack_settings: Settings, adapter, worker_process, fake_slack: FakeSlackAPI, llm_sim
) -> None:
    worker_process(worker_env(slack_settings))  # SLUICE_VISION is off by default
    image = fake_slack.add_file("cat.jpg", png(), "image/jpeg")
    event = {**mention("files-marker-3 what is this", "520.1"), "files": [image]}
    only_file = {
        **message("", "521.1", channel="D1", channel_type="im"),
        "subtype": "file_share",
        "files": [fake_slack.add_file("dog.png", png(), "image/png")],
    }
    async with adapter(slack_settings) as a:
        assert (await a.send.event(event))[0] == 200
        text = await reply_with(fake_slack, "Echo: files-marker-3")
        assert re.search(r"can't see images with this model, so I left `?cat\.jpg`? out", text)
        # A message of only refused files is answered with the notice, without the model.
        assert (await a.send.event(only_file))[0] == 200
        notice = await reply_with(fake_slack, "dog.png")
    assert "can't see images" in notice and "Echo:" not in notice
    assert fake_slack.file_server.fetches == []
    assert not [c for c in user_contents(llm_sim.requests(), "dog.png")]


async def test_the_bot_token_goes_only_to_slacks_file_host_over_https(
    slack_settings: Settings,
) -> None:
    factory = SlackResponderFactory(slack_settings, redis=None)  # type: ignore[arg-type]
    await factory.start()
    msg = IncomingMessage(
        platform="slack", tenant="T1", channel="C1", user="U1", message_id="C1:9.9", text=""
    )
    try:
        for url in (
            "http://files.slack.com/files-pri/T1-F1/a.txt",  # the token in clear text
            "https://files.slack.com.example.net/files-pri/T1-F1/a.txt",
            "https://example.net/files.slack.com/a.txt",
            "ftp://files.slack.com/a.txt",
        ):
            ref = FileRef(id="F1", name="`a.txt`", mimetype="text/plain", size=3, url=url)
            with pytest.raises(FileRefusedError, match="is not a Slack file"):
                await factory.fetch_file(msg, ref, max_bytes=1000, timeout_s=5)
    finally:
        await factory.close()
