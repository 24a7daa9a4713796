"""The simulator takes image parts as the Chat Completions API does (the real openai SDK)."""

from __future__ import annotations

import base64
import json

import openai
import pytest

from tests.files.samples import png
from tests.test_llmsim import Sim, sim  # noqa: F401  (the fixture)


def data_url(data: bytes, kind: str = "png") -> str:
    return f"data:image/{kind};base64," + base64.b64encode(data).decode()


async def test_an_image_part_is_decoded_echoed_counted_and_logged_without_its_data(
    sim: Sim,  # noqa: F811
) -> None:
    url = data_url(png(40, 30))
    before = (await sim.get_json("/_sim/stats"))["images"]
    stream = await sim.client.chat.completions.create(
        model="sim",
        stream=True,
        messages=[
            {
                "role": "user",
                "content": [
                    {"type": "text", "text": "what is in it"},
                    {"type": "image_url", "image_url": {"url": url}},
                ],
            }
        ],
    )
    text = "".join([c.choices[0].delta.content or "" async for c in stream if c.choices])
    assert text.startswith("Echo: what is in it [image 40x30]")
    stats = await sim.get_json("/_sim/stats")
    assert stats["images"] == before + 1
    [logged] = await sim.get_json("/_sim/requests?limit=1")
    shown = logged["messages"][0]["content"][1]["image_url"]["url"]
    assert "40x30" in shown and len(shown) < 100 and url not in json.dumps(logged)


@pytest.mark.parametrize(
    "part",
    [
        {"type": "image_url", "image_url": {"url": "data:image/png;base64,bm90IGFuIGltYWdl"}},
        {"type": "image_url", "image_url": {}},
        {"type": "image_url"},
        {"type": "audio", "data": "x"},
        {"type": "text", "text": 5},
        "just a string",
    ],
)
async def test_malformed_content_parts_get_a_400_not_a_crash(
    sim: Sim,  # noqa: F811
    part: object,
) -> None:
    with pytest.raises(openai.BadRequestError):
        await sim.client.chat.completions.create(
            model="sim",
            messages=[{"role": "user", "content": [part]}],  # type: ignore[list-item]
        )
    ok = await sim.client.chat.completions.create(
        model="sim", messages=[{"role": "user", "content": "still here"}]
    )
    assert (ok.choices[0].message.content or "").startswith("Echo: still here")
