"""Sluice's command line and tools (the LLM simulator, ``sluice dev``, benchmarks)."""
