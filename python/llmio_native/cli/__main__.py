"""``python -m llmio_native.cli``: the ``llmio`` command."""
import sys

from . import main

if __name__ == "__main__":
    sys.exit(main())
