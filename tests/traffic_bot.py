"""A bot with lane rules, for the traffic tests (``SLUICE_APP=tests.traffic_bot:bot``)."""

from core.bot import Bot
from core.lanes import LaneRule

bot = Bot(
    name="traffic-test",
    lane_rules=[
        LaneRule("high", words=("billing", "urgent")),
        LaneRule("bulk", words=("digest",)),
    ],
    no_cache_channels=frozenset({"nocache"}),
)

burst_bot = Bot(name="burst-test", merge_burst_s=0.4)
