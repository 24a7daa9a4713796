"""Plumbing every process shares: Redis, Lua scripts, clocks, logs, metrics, traces, heartbeats."""
