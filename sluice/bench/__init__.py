"""``sluice bench``: the whole pipeline under simulated users, beside the naive design.

Modules: :mod:`~sluice.bench.scenarios` (named loads and the schedule),
:mod:`~sluice.bench.drivers` (the simulated users), :mod:`~sluice.bench.naive` (the
naive server), :mod:`~sluice.bench.procs` (subprocesses, memory),
:mod:`~sluice.bench.run` (one benchmark end to end), :mod:`~sluice.bench.report`
(numbers, table, JSON, chart), :mod:`~sluice.bench.cli` (the command).
"""
