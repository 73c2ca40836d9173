"""The one exception type of :mod:`llmio_native.pack`."""
from __future__ import annotations


class PackError(Exception):
    """An expected failure of a pack (bad input, refused output, a dead worker): its message
    is one line naming the file (and line or byte) concerned. ``llmio`` prints it and exits 1."""
