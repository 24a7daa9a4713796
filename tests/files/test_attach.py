"""All files of one message (core.files.attach): what reaches the model, the notices,
the limits; and how adapters turn platform payloads into file references."""

from __future__ import annotations

from typing import Any

import pytest

from bots.slack.convert import files_from_event, message_from_event
from core.errors import FileRefusedError
from core.files.attach import read_attachments
from core.llm.budget import IMAGE_TOKENS, estimate_tokens
from core.messages import FileRef, IncomingMessage
from core.settings import Settings
from tests.files.samples import png, text_pdf


class BytesFetcher:
    """A FileFetcher serving bytes from memory (the seam the responder factories fill)."""

    def __init__(self, files: dict[str, bytes]) -> None:
        self.files = files
        self.fetched: list[str] = []

    async def fetch_file(
        self, msg: IncomingMessage, ref: FileRef, *, max_bytes: int, timeout_s: float
    ) -> bytes:
        self.fetched.append(ref.id)
        if ref.id not in self.files:
            raise FileRefusedError(f"{ref.name} could not be downloaded (HTTP 404).")
        return self.files[ref.id]


def settings(**changes: Any) -> Settings:
    return Settings(_env_file=None, **changes)


def msg_with(*refs: FileRef, text: str = "hi") -> IncomingMessage:
    return IncomingMessage(
        platform="slack",
        tenant="T1",
        channel="C1",
        user="U1",
        message_id="C1:1.0",
        text=text,
        files=list(refs),
    )


def ref(i: int, name: str, mimetype: str = "", size: int = 10) -> FileRef:
    return FileRef(id=f"F{i}", name=name, mimetype=mimetype, size=size, url=f"https://x/{i}")


async def test_text_and_pdf_become_file_blocks_and_images_image_parts_after_the_text() -> None:
    fetcher = BytesFetcher({"F1": b"alpha notes", "F2": text_pdf("beta page"), "F3": png(20, 10)})
    refs = [ref(1, "a.txt", "text/plain"), ref(2, "b.pdf"), ref(3, "c.png", "image/png")]
    got = await read_attachments(fetcher, msg_with(*refs), settings(), vision=True)
    assert got.notices == [] and got.used
    content = got.user_content("question")
    assert isinstance(content, list)
    assert content[0]["text"] == (
        'question\n\n<file name="a.txt">\nalpha notes\n</file>\n\n'
        '<file name="b.pdf">\nbeta page\n</file>'
    )
    assert content[1]["type"] == "image_url"
    # What the shared budget counts for it: the text, plus one image.
    with_image = estimate_tokens([{"role": "user", "content": content}], 0)
    assert with_image == IMAGE_TOKENS + -(-len(content[0]["text"]) // 4)


async def test_text_over_the_limit_is_cut_with_a_note_and_later_files_left_out() -> None:
    fetcher = BytesFetcher({"F1": b"x" * 500, "F2": b"y" * 500})
    refs = [ref(1, "one.txt"), ref(2, "two.txt")]
    got = await read_attachments(
        fetcher, msg_with(*refs), settings(file_max_chars=300), vision=False
    )
    assert got.texts == [("`one.txt`", "x" * 300)]
    assert got.notices == [
        "I read the first 300 characters of `one.txt`.",
        "I left `two.txt` out: the files' text is over the limit.",
    ]
    assert got.note().startswith("_(I read the first 300 characters")


async def test_files_beyond_the_count_are_named_in_a_notice_and_not_downloaded() -> None:
    fetcher = BytesFetcher({f"F{i}": b"text" for i in range(4)})
    refs = [ref(i, f"f{i}.txt") for i in range(4)]
    got = await read_attachments(fetcher, msg_with(*refs), settings(file_max_count=2), vision=False)
    assert fetcher.fetched == ["F0", "F1"]
    assert got.notices == ["I read at most 2 files per message; I left out `f2.txt`, `f3.txt`."]


async def test_hostile_names_are_shown_inert_and_empty_or_missing_files_get_notices() -> None:
    fetcher = BytesFetcher({"F1": b"", "F2": text_pdf("")})
    refs = [
        ref(1, "<@U123> `rm -rf`\n<!channel>.txt"),
        ref(2, "scan.pdf"),
        ref(3, "gone.txt"),
        FileRef(id="F4", name="connect.txt", size=3),  # no URL: not shared with the app
    ]
    got = await read_attachments(fetcher, msg_with(*refs), settings(), vision=False)
    assert got.notices == [
        "`@U123 rm -rf !channel .txt` is empty.",
        "`scan.pdf` has no text I can read (a scanned PDF?).",
        "`gone.txt` could not be downloaded (HTTP 404).",
        "`connect.txt` was not shared with me, so I could not open it.",
    ]
    assert not got.used and got.user_content("") == ""


def test_slack_file_objects_become_references_and_malformed_ones_do_not_crash() -> None:
    event: dict[str, Any] = {
        "files": [
            {
                "id": "F1",
                "name": "a.png",
                "mimetype": "image/png",
                "size": 12,
                "url_private": "https://files.slack.com/files-pri/T1-F1/a.png",
            },
            "not an object",
            {"id": "F2", "name": "n" * 5000, "size": "12", "url_private": "javascript:x"},
            {"id": "F3", "title": "Connect file", "file_access": "check_file_info", "size": -4},
        ]
    }
    refs = files_from_event(event)
    assert [(r.id, r.size, r.url != "") for r in refs] == [
        ("F1", 12, True),
        ("F2", 0, False),
        ("F3", 0, False),
    ]
    assert len(refs[1].name) == 1024 and refs[2].name == "Connect file"
    assert files_from_event({"files": "nope"}) == []
    body = {
        "team_id": "T1",
        "event": {
            "type": "app_mention",
            "user": "U1",
            "text": "<@UBOT> see",
            "ts": "1.1",
            "channel": "C1",
            **event,
        },
    }
    msg = message_from_event(body, "UBOT", kind="mention")
    assert [f.id for f in msg.files] == ["F1", "F2", "F3"]
    # References only: the job payload carries no bytes.
    assert len(msg.model_dump_json()) < 8000


@pytest.mark.parametrize("count", [0, 1])
def test_a_user_turn_records_file_references_without_the_url(count: int) -> None:
    from workers.jobs import _user_turn

    msg = msg_with(*[ref(i, f"f{i}.txt") for i in range(count)])
    turn = _user_turn(msg)
    if count == 0:
        assert turn.files is None
    else:
        assert turn.files is not None and "url" not in turn.files[0].model_dump()


async def test_a_merged_burst_keeps_the_files_of_every_message_it_absorbs(
    redis: Any, settings: Settings
) -> None:
    from core.infra.redis import Keys
    from core.traffic.ordering import absorb_burst, register_arrival

    keys = Keys(settings.key_prefix)
    first = msg_with(ref(1, "a.txt"), text="first").model_copy(update={"ts": 1000.0})
    second = msg_with(ref(2, "b.png"), ref(3, "c.pdf"), text="second").model_copy(
        update={"message_id": "C1:2.0", "ts": 1000.5}
    )
    for m in (first, second):
        assert await register_arrival(redis, keys, m, keep_text=True)
    merged = await absorb_burst(redis, keys, first, window_s=1.0)
    assert merged.text == "first\nsecond"
    assert [f.id for f in merged.files] == ["F1", "F2", "F3"]
    assert merged.files[1] == second.files[0]  # url and all, ready to download
