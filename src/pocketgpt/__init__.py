"""pocketgpt: a small-GPT experiment framework."""

__version__ = "0.1.0"
