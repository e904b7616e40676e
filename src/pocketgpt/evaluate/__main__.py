"""``python -m pocketgpt.evaluate``: the same command as ``pocketgpt-evaluate``."""

from pocketgpt.cli.evaluate import main

if __name__ == "__main__":
    main()
