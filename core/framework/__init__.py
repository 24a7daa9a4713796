"""What a user writes: the bot, its commands, tools, hooks, MCP servers and lane rules."""
