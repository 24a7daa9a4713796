"""All files of one message: fetched, read, and turned into what the model gets.

Each file ends in exactly one of: an image part (vision models), text in the
context, or a notice in the reply saying why it was left out. Nothing here raises
for a bad file; a file never stops the message from being answered.
"""

from __future__ import annotations

import asyncio
import logging
import re
from dataclasses import dataclass, field
from typing import Any, Protocol

from core.errors import FileRefusedError
from core.files.download import too_large_text
from core.files.read import ImagePart, TextPart, claims_image, read_file
from core.messages import FileRef, IncomingMessage
from core.settings import Settings

logger = logging.getLogger(__name__)

_UNSAFE = re.compile(r"[\x00-\x1f\x7f`<>\"\u2028\u2029]+")
NAME_CHARS = 80
NO_VISION = "I can't see images with this model, so I left {name} out."


class FileFetcher(Protocol):
    """Downloads a file of a message from its platform (a responder factory does)."""

    async def fetch_file(
        self, msg: IncomingMessage, ref: FileRef, *, max_bytes: int, timeout_s: float
    ) -> bytes:
        """The file's bytes, at most ``max_bytes``.

        Raises:
            FileRefusedError: it cannot be downloaded (too large, gone, no access).
        """
        ...


def display_name(ref: FileRef) -> str:
    """The file's name as notices show it: one short line, in backticks, no markup."""
    name = " ".join(_UNSAFE.sub(" ", ref.name).split()) or "a file"
    if len(name) > NAME_CHARS:
        name = name[: NAME_CHARS - 1] + "…"
    return f"`{name}`"


@dataclass
class Attachments:
    """What the files of one message became."""

    images: list[ImagePart] = field(default_factory=list)
    texts: list[tuple[str, str]] = field(default_factory=list)  # (name, text)
    notices: list[str] = field(default_factory=list)

    @property
    def used(self) -> bool:
        """Whether any file reaches the model."""
        return bool(self.images or self.texts)

    def note(self) -> str:
        """The notices, as the lines that open the reply ("" when there are none)."""
        return "".join(f"_({n})_\n\n" for n in self.notices)

    def user_content(self, text: str) -> str | list[dict[str, Any]]:
        """The user message's ``content``: the text and the files' text, then images."""
        blocks = [text] if text else []
        for name, body in self.texts:
            blocks.append(f'<file name="{name.strip("`")}">\n{body}\n</file>')
        joined = "\n\n".join(blocks)
        if not self.images:
            return joined
        names = "the attached image" if len(self.images) == 1 else "the attached images"
        parts: list[dict[str, Any]] = [{"type": "text", "text": joined or f"(see {names})"}]
        parts.extend(image.content_part() for image in self.images)
        return parts


async def read_attachments(
    fetcher: FileFetcher, msg: IncomingMessage, settings: Settings, *, vision: bool
) -> Attachments:
    """Download and read the files of ``msg`` (one at a time: memory stays bounded)."""
    out = Attachments()
    chars_left = settings.file_max_chars
    files = msg.files[: settings.file_max_count]
    left_out = msg.files[settings.file_max_count :]
    if left_out:
        names = ", ".join(display_name(f) for f in left_out[:5])
        more = f" and {len(left_out) - 5:,} more" if len(left_out) > 5 else ""
        out.notices.append(
            f"I read at most {settings.file_max_count} files per message; I left out {names}{more}."
        )
    for ref in files:
        name = display_name(ref)
        try:
            part = await _read_one(fetcher, msg, ref, name, settings, vision)
        except FileRefusedError as e:
            logger.info(
                "file refused platform=%s message=%s file=%s: %s",
                msg.platform,
                msg.message_id,
                ref.id,
                e,
            )
            out.notices.append(str(e))
            continue
        if isinstance(part, ImagePart):
            out.images.append(part)
            continue
        if not part.text.strip():
            what = "has no text I can read (a scanned PDF?)" if part.kind == "pdf" else "is empty"
            out.notices.append(f"{name} {what}.")
            continue
        if chars_left <= 0:
            out.notices.append(f"I left {name} out: the files' text is over the limit.")
            continue
        body = part.text
        if len(body) > chars_left:
            out.notices.append(f"I read the first {chars_left:,} characters of {name}.")
            body = body[:chars_left]
        chars_left -= len(body)
        out.texts.append((name, body))
    return out


async def _read_one(
    fetcher: FileFetcher,
    msg: IncomingMessage,
    ref: FileRef,
    name: str,
    settings: Settings,
    vision: bool,
) -> ImagePart | TextPart:
    if ref.size > settings.file_max_bytes:
        raise FileRefusedError(too_large_text(name, ref.size, settings.file_max_bytes))
    if not vision and claims_image(ref.name, ref.mimetype):
        raise FileRefusedError(NO_VISION.format(name=name))
    if not ref.url:
        raise FileRefusedError(f"{name} was not shared with me, so I could not open it.")
    data = await fetcher.fetch_file(
        msg,
        ref.model_copy(update={"name": name}),
        max_bytes=settings.file_max_bytes,
        timeout_s=settings.file_download_timeout_s,
    )
    reading = asyncio.to_thread(
        read_file,
        data,
        name=name,
        mimetype=ref.mimetype,
        max_pixels=settings.image_max_pixels,
        max_chars=settings.file_max_chars,
    )
    try:
        # A hostile file can take long to parse: the reply does not wait for it past
        # the download timeout (the thread itself cannot be stopped and ends on its own).
        part = await asyncio.wait_for(reading, settings.file_download_timeout_s)
    except TimeoutError as e:
        raise FileRefusedError(f"{name} took too long to read.") from e
    if isinstance(part, ImagePart) and not vision:
        raise FileRefusedError(NO_VISION.format(name=name))
    return part
