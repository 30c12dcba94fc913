"""The one family of errors the CLI turns into a clean ``Error: ...`` line.

Every message says what went wrong, with which file, and what to do next.
"""

from __future__ import annotations


class PulseEdgeError(Exception):
    """Base class for every error a user can cause or fix."""


class ModelError(PulseEdgeError):
    """A model file is missing, unreadable or does not fit with its partner."""


class ManifestError(PulseEdgeError):
    """A manifest is missing, malformed, or disagrees with the files it lists."""


class ConversionError(PulseEdgeError):
    """A checkpoint cannot be converted."""


class ImageError(PulseEdgeError):
    """An input image cannot be read."""


class InferenceError(PulseEdgeError):
    """llama.cpp failed while reading an image or generating an answer."""
