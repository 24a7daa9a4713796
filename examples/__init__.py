"""Example bots that run as they are: ``SLUICE_APP=examples.faq_bot.bot:bot sluice dev``."""
