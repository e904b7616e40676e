"""pocketgpt: a small-GPT experiment framework."""

__version__ = "0.1.0"

__all__ = ["__version__", "load"]


def __getattr__(name: str):
    # pocketgpt.load imports torch; resolve it on first use so `import pocketgpt` stays light.
    if name == "load":
        from pocketgpt.loading import load

        return load
    raise AttributeError(f"module 'pocketgpt' has no attribute {name!r}")
