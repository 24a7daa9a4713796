"""Bots for the traffic tests (``SLUICE_APP=tests.traffic_bot:bot``)."""

from core.framework.bot import Bot, LaneRule

bot = Bot(
    name="traffic-test",
    lanes=[
        LaneRule("high", words=["billing", "urgent"]),
        LaneRule("bulk", words=["digest"]),
    ],
    no_cache_channels=frozenset({"nocache"}),
)

burst_bot = Bot(name="burst-test", merge_burst_s=0.4)
