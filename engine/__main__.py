"""``python -m engine``: the same entry point as the ``parablock`` console script."""
from engine.cli.main import entry

if __name__ == "__main__":  # spawned worker processes import this module as __mp_main__
    entry()
