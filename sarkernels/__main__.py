"""``python -m sarkernels``: the command line of :mod:`sarkernels.app.cli`."""
import sys

from .app.cli import main

if __name__ == "__main__":
    sys.exit(main())
