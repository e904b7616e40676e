"""``python -m pocketgpt.compare``: the same command as ``pocketgpt-compare``."""

from pocketgpt.cli.compare import main

if __name__ == "__main__":
    raise SystemExit(main())
