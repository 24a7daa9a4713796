"""A FAQ bot: the model answers from a small FAQ file through a tool."""
