"""A support bot: lane rules, a redaction hook, a refusal hook, commands, DM-aware prompts."""
