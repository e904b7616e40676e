"""``python -m pocketgpt.export``: the same command as ``pocketgpt-export``."""

from pocketgpt.cli.export import main

if __name__ == "__main__":
    main()
