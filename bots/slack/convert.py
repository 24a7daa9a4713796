"""Slack payloads to :class:`core.messages.IncomingMessage` (pure functions, no I/O)."""

from __future__ import annotations

import re
from typing import Any

from core.messages import FileRef, IncomingMessage, Platform

# Message subtypes that are a person writing something new; every other subtype
# (message_changed, message_deleted, bot_message, channel_join, …) is ignored.
USER_SUBTYPES = frozenset({None, "file_share", "thread_broadcast"})


_EVENT_STRINGS = (
    "type",
    "user",
    "channel",
    "ts",
    "thread_ts",
    "text",
    "channel_type",
    "subtype",
    "bot_id",
    "team",
    "event_ts",
)


_SLACK_TS = re.compile(r"\d{1,12}(\.\d{1,9})?")


# Fields Bolt reads to build its context, before any listener runs: each must be a
# string or an object (Bolt tests "id" in value), and the objects named below are
# read the same way, one level down (slack_bolt/request/internals.py).
_BOLT_IDS = ("enterprise", "team", "user", "channel")
_BOLT_NESTED = ("event", "item", "assistant_thread", "message", "previous_message")


def _bolt_shape_problem(obj: dict[str, Any], where: str, *, nested: int = 2) -> str | None:
    """Why Bolt would crash reading ``obj`` (``None``: it would not).

    ``authorizations[0]`` is read like the payload itself, as deep as it goes (as Bolt
    does); the objects of ``_BOLT_NESTED`` down to ``nested`` levels.
    """
    for key in _BOLT_IDS:
        value = obj.get(key)
        if value is not None and not isinstance(value, str | dict):
            return f"{where}'{key}' must be a string or an object"
    auths = obj.get("authorizations")
    if auths is not None:
        if not isinstance(auths, list) or not all(isinstance(a, dict) for a in auths[:1]):
            return f"{where}'authorizations' must be a list of objects"
        if auths and (why := _bolt_shape_problem(auths[0], f"{where}authorization ", nested=0)):
            return why
    for key in _BOLT_NESTED if nested > 0 else ():
        value = obj.get(key)
        if isinstance(value, dict) and (
            why := _bolt_shape_problem(value, f"{where}{key} ", nested=nested - 1)
        ):
            return why
    return None


def payload_problem(body: dict[str, Any]) -> str | None:
    """Why a signed JSON payload cannot be handled (``None``: it can).

    Slack's payloads are trusted once signed, but a malformed one must get a 400,
    not crash a listener into a 500 that Slack would retry.
    """
    kind = body.get("type")
    if not isinstance(kind, str):
        return "the payload has no 'type'"
    if "event" in body and not isinstance(body["event"], dict):
        # Bolt's own middleware reads body["event"] as an object whatever the type.
        return "'event' must be an object"
    if why := _bolt_shape_problem(body, ""):
        return why
    if kind != "event_callback":
        return None
    event = body.get("event")
    if not isinstance(event, dict) or not isinstance(event.get("type"), str):
        return "an event_callback needs an 'event' object with a 'type'"
    for key in ("team_id", "event_id", "api_app_id"):
        if body.get(key) is not None and not isinstance(body[key], str):
            return f"'{key}' must be a string"
    if event["type"] not in ("message", "app_mention"):
        return None  # other events carry objects in these fields (e.g. team_join's user)
    for key in _EVENT_STRINGS:
        if event.get(key) is not None and not isinstance(event[key], str):
            return f"event '{key}' must be a string"
    for key in ("ts", "thread_ts", "event_ts"):
        if event.get(key) is not None and not _SLACK_TS.fullmatch(event[key]):
            return f"event '{key}' is not a Slack timestamp"
    return None


def unescape(text: str) -> str:
    """Slack's ``&amp;``/``&lt;``/``&gt;`` back to the characters the user typed.

    Lone surrogates (valid in JSON, not in UTF-8) become ``?`` so that the message
    can be queued and sent to the model.
    """
    text = text.encode("utf-8", "replace").decode("utf-8")
    return text.replace("&lt;", "<").replace("&gt;", ">").replace("&amp;", "&")


def strip_mention(text: str, bot_user_id: str | None) -> str:
    """The text without the bot's own ``<@U…>`` mentions."""
    if bot_user_id:
        text = re.sub(rf"<@{re.escape(bot_user_id)}(\|[^>]*)?>", "", text)
    return unescape(re.sub(r"[ \t]{2,}", " ", text)).strip()


def is_from_bot(event: dict[str, Any], bot_user_id: str | None) -> bool:
    """The event was written by a bot (this one or any other)."""
    return bool(
        event.get("bot_id")
        or event.get("bot_profile")
        or event.get("subtype") == "bot_message"
        or (bot_user_id and event.get("user") == bot_user_id)
    )


def is_user_message(event: dict[str, Any], bot_user_id: str | None) -> bool:
    """A new message written by a person (not an edit, a deletion or a bot)."""
    return (
        event.get("subtype") in USER_SUBTYPES
        and bool(event.get("user"))
        and bool(event.get("channel"))
        and bool(event.get("ts"))
        and not is_from_bot(event, bot_user_id)
    )


def team_of(body: dict[str, Any]) -> str:
    """The workspace an event or command came from."""
    event = body.get("event") or {}
    team = body.get("team")
    return str(
        body.get("team_id")
        or event.get("team")
        or (team.get("id", "") if isinstance(team, dict) else team)
        or (body.get("authorizations") or [{}])[0].get("team_id", "")
    )


# Files taken into one job payload (Slack allows 10 per message); the worker reads at
# most SLUICE_FILE_MAX_COUNT of them and names the rest in a notice.
MAX_FILE_REFS = 20


def _str(value: Any, limit: int) -> str:
    return value[:limit] if isinstance(value, str) else ""


def files_from_event(event: dict[str, Any]) -> list[FileRef]:
    """References to the files shared with a message (``event["files"]``), never bytes.

    A file Slack did not share with the app in full (Slack Connect's
    ``file_access: check_file_info``, no ``url_private``) keeps an empty URL: the
    worker refuses it with a notice. Entries that are not objects are ignored.
    """
    files = event.get("files")
    if not isinstance(files, list):
        return []
    refs = []
    for f in files[:MAX_FILE_REFS]:
        if not isinstance(f, dict):
            continue
        url = _str(f.get("url_private"), 4097)
        size = f.get("size")
        if not isinstance(size, int) or isinstance(size, bool) or size < 0:
            size = 0
        refs.append(
            FileRef(
                id=_str(f.get("id"), 255),
                name=_str(f.get("name"), 1024) or _str(f.get("title"), 1024) or "file",
                mimetype=_str(f.get("mimetype"), 255),
                size=size,
                url=url if len(url) <= 4096 and url.startswith(("https://", "http://")) else "",
            )
        )
    return refs


def message_from_event(
    body: dict[str, Any], bot_user_id: str | None, *, kind: str
) -> IncomingMessage:
    """An accepted ``app_mention`` or ``message`` event as a neutral message.

    ``kind`` is ``mention``, ``dm``, ``assistant`` or ``thread``; mentions are
    answered in their thread (a new one under the message if it was top level).
    """
    event: dict[str, Any] = body["event"]
    channel = str(event["channel"])
    ts = str(event["ts"])
    thread_ts = event.get("thread_ts")
    is_dm = event.get("channel_type") == "im" or kind in ("dm", "assistant")
    if kind == "mention":
        thread: str | None = str(thread_ts or ts)
    else:
        thread = str(thread_ts) if thread_ts else None
    meta = {"kind": kind, "ts": ts, "recipient_user_id": str(event["user"])}
    if thread:
        meta["reply_thread"] = thread
    if kind == "assistant":
        meta["assistant"] = "1"
    enterprise = body.get("enterprise_id") or event.get("enterprise")
    if enterprise:
        meta["enterprise_id"] = str(enterprise)
    if body.get("is_enterprise_install"):
        meta["is_enterprise_install"] = "1"
    return IncomingMessage(
        platform=Platform.SLACK,
        tenant=team_of(body),
        channel=channel,
        thread=thread,
        user=str(event["user"]),
        message_id=f"{channel}:{ts}",
        text=strip_mention(str(event.get("text") or ""), bot_user_id),
        ts=float(ts),
        is_dm=is_dm,
        meta=meta,
        files=files_from_event(event),
    )


def message_from_command(body: dict[str, Any], command: str | None = None) -> IncomingMessage:
    """A slash command as a neutral message (answered in the channel).

    ``command`` names the bot command it runs (``meta["command"]``); ``None`` for
    ``/ask``, whose text goes to the model.
    """
    channel = str(body["channel_id"])
    meta = {"kind": "command", "recipient_user_id": str(body["user_id"])}
    if command:
        meta["command"] = command
    if body.get("response_url"):
        meta["response_url"] = str(body["response_url"])
    if body.get("enterprise_id"):
        meta["enterprise_id"] = str(body["enterprise_id"])
    return IncomingMessage(
        platform=Platform.SLACK,
        tenant=str(body.get("team_id") or ""),
        channel=channel,
        thread=None,
        user=str(body["user_id"]),
        user_name=body.get("user_name"),
        message_id=f"{channel}:cmd:{body['trigger_id']}",
        text=unescape(str(body.get("text") or "")).strip(),
        is_dm=str(channel).startswith("D"),
        meta=meta,
    )
