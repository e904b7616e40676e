"""``python -m pocketgpt.generate``: the same command as ``pocketgpt-generate``."""

from pocketgpt.cli.generate import main

if __name__ == "__main__":
    main()
