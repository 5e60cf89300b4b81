"""The one exception type users see: its message is a single line that names the problem."""
from __future__ import annotations


class LayerwiseError(Exception):
    """A problem with the user's input or environment, explained in one line.

    The CLI prints it without a traceback and exits non-zero; anything else that escapes
    is a bug in layerwise and keeps its traceback.
    """
