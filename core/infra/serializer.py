"""arq job (de)serialization with msgpack instead of arq's default pickle.

Pickle lets whoever can write to Redis run code in every worker; msgpack carries
only data. Measured against JSON on the reply job payload (docs/benchmarks.md):
msgpack is smaller and faster to serialize and parse.
"""

from __future__ import annotations

from typing import Any

import msgpack

from core.infra.logs import redact


def serialize(obj: dict[str, Any]) -> bytes:
    """Serialize an arq job or result dict."""
    data: bytes = msgpack.packb(obj, use_bin_type=True, default=_default)
    return data


def deserialize(data: bytes) -> dict[str, Any]:
    """Parse what :func:`serialize` wrote."""
    obj: dict[str, Any] = msgpack.unpackb(data, raw=False, strict_map_key=False)
    return obj


def _default(obj: object) -> object:
    # arq puts exceptions into failed job results, which it keeps in Redis: keep their
    # text, not the object, with secrets masked (a driver's error can quote its DSN).
    if isinstance(obj, BaseException):
        return redact(f"{type(obj).__name__}: {obj}")
    raise TypeError(f"cannot serialize {type(obj).__name__} for a job")
