"""The model side: the OpenAI-compatible client and the one LLM budget that every worker shares."""
