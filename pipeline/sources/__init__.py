"""Frame sources, chosen by the form of the URI: one module per kind, one small interface (`base.Source`)."""

from __future__ import annotations

from pathlib import Path

from .base import Source, SourceError, SourceFrame
from .dicom import DicomSource, dicom_files, is_dicom_path
from .images import ImageFolderSource, is_image_folder
from .phantom import PhantomSource, parse_phantom
from .screen import Roi, SectorSource
from .stack import StackSource, is_stack_path, stack_files
from .stream import STREAM_SCHEMES, StreamSource
from .synthetic import SyntheticSource, parse_synthetic
from .v4l2 import V4l2Source, is_v4l2, parse_v4l2
from .video import VideoSource

LIVE_SCHEMES = (*STREAM_SCHEMES, "v4l2://", "/dev/video")

__all__ = ["LIVE_SCHEMES", "Roi", "Source", "SourceError", "SourceFrame", "check_uri", "is_phantom",
           "open_source", "source_class"]


def is_phantom(uri: str) -> bool:
    """`phantom` (the default case) or `phantom://SEED?...`."""
    return uri == "phantom" or uri.startswith("phantom:")


def source_class(uri: str) -> type[Source]:
    """The source kind a URI names (checked in this order: a DICOM folder is not an image folder)."""
    if uri.startswith("synthetic:"):
        return SyntheticSource
    if is_phantom(uri):
        return PhantomSource
    if is_v4l2(uri):
        return V4l2Source
    if uri.startswith(STREAM_SCHEMES):
        return StreamSource
    if is_dicom_path(uri):
        return DicomSource
    if is_image_folder(uri):
        return ImageFolderSource
    if is_stack_path(uri):
        return StackSource
    return VideoSource


def check_uri(uri: str) -> None:
    """Fail early, before any process starts, on a source that cannot exist."""
    kind = source_class(uri)
    if kind is SyntheticSource:
        parse_synthetic(uri)
    elif kind is PhantomSource:
        parse_phantom(uri)
    elif kind is V4l2Source and not Path(device := parse_v4l2(uri).device).exists():
        raise SourceError(f"source {uri}: no such device {device} (tools/list_devices.py lists them)")
    elif kind is DicomSource:
        dicom_files(uri)
    elif kind is StackSource:
        stack_files(uri)
    elif kind is VideoSource and not Path(uri).is_file():
        raise SourceError(f"source {uri}: no such file")


def open_source(uri: str, pixel_format: str, roi: Roi = None) -> Source:
    """The opened source; with `roi` (`auto`, a box or None) its frames cut to the imaging sector
    (`screen.SectorSource`)."""
    source = source_class(uri)(uri, pixel_format)
    source.open()
    box = source.region if roi == "auto" else roi
    if box is None and not (roi == "auto" and source.screen):
        return source
    cut = SectorSource(source, box)
    cut.open()
    return cut
