"""Frame sources, chosen by the form of the URI."""

from __future__ import annotations

from pathlib import Path

from .base import Source, SourceError, SourceFrame
from .phantom import PhantomSource, parse_phantom
from .stack import StackSource, is_stack_path, stack_files
from .synthetic import SyntheticSource, parse_synthetic
from .video import LIVE_SCHEMES, VideoSource

__all__ = ["LIVE_SCHEMES", "Source", "SourceError", "SourceFrame", "open_source", "check_uri"]


def check_uri(uri: str) -> None:
    """Fail early, before any process starts, on a source that cannot exist."""
    if uri.startswith("synthetic:"):
        parse_synthetic(uri)
    elif uri.startswith("phantom:"):
        parse_phantom(uri)
    elif is_stack_path(uri):
        stack_files(uri)
    elif not uri.startswith(LIVE_SCHEMES) and not Path(uri).is_file():
        raise SourceError(f"source {uri}: no such file")


def open_source(uri: str, pixel_format: str) -> Source:
    kinds = {"synthetic:": SyntheticSource, "phantom:": PhantomSource}
    cls = next((kind for prefix, kind in kinds.items() if uri.startswith(prefix)), None)
    if cls is None:
        cls = StackSource if is_stack_path(uri) else VideoSource
    source = cls(uri, pixel_format)
    source.open()
    return source
