"""Network streams through PyAV (FFmpeg): RTSP over TCP or UDP, RTP and UDP MPEG-TS, SRT, HTTP(S) and HLS,
opened with low-delay demuxer options and read by the newest-frame reader, which reconnects when the
stream drops or stalls."""

from __future__ import annotations

from urllib.parse import parse_qsl, urlencode, urlparse, urlunparse

import av

from .live import STALL_S, LiveSource

STREAM_SCHEMES = ("rtsp://", "rtsps://", "rtp://", "udp://", "tcp://", "srt://", "http://", "https://",
                  "rtmp://")
# Demuxer settings for the least delay: no input buffering, and probing bounded (an MPEG-TS stream needs a
# keyframe's parameters before decoding can start).
LOW_DELAY = {"fflags": "nobuffer", "flags": "low_delay", "probesize": "500000", "analyzeduration": "500000"}
# UDP: a large socket FIFO, and a full one is not fatal (frames are lost and counted downstream, the run
# goes on).
UDP = {"overrun_nonfatal": "1", "fifo_size": "100000", "buffer_size": str(8 << 20),
       "timeout": str(int(STALL_S * 1e6))}  # a silent socket is an error after STALL_S (FFmpeg's udp: µs)
RTSP_TRANSPORTS = ("tcp", "udp")


def stream_options(uri: str) -> tuple[str, dict[str, str]]:
    """The URL FFmpeg opens and its options. RTSP takes this project's `transport=tcp|udp` query key
    (default tcp: no packet loss on a busy network), removed from the URL the server sees."""
    options = dict(LOW_DELAY)
    if uri.startswith(("udp://", "rtp://")):
        options.update(UDP)
    if uri.startswith(("rtsp://", "rtsps://")):
        parsed = urlparse(uri)
        query = parse_qsl(parsed.query)
        transport = next((value for key, value in query if key == "transport"), "tcp")
        if transport not in RTSP_TRANSPORTS:
            raise ValueError(f"transport must be tcp or udp, got {transport!r}")
        options["rtsp_transport"] = transport
        uri = urlunparse(parsed._replace(query=urlencode([(k, v) for k, v in query if k != "transport"])))
    return uri, options


class StreamSource(LiveSource):
    def _open_container(self, timeout: tuple[float, float]) -> av.container.InputContainer:
        url, options = stream_options(self.uri)
        return av.open(url, options=options, timeout=timeout)
