"""The viewer's web server (aiohttp): the page, its WebSocket, the best-frame pictures, operator commands and
Prometheus `/metrics`. It follows the pipeline from the outside, as any subscriber does: the events PUB and
postprocess's preview PUB in, the control REP for the buttons, so it never sits on the frame path.

WebSocket messages to the page: JSON text (`state` on connect, then `score`, `sweep`, `best`, `card`,
`exam`, `health`) and binary previews: a 4-byte big-endian header length, the JSON header (frame id, capture
time, score, mask outline), then the JPEG. A page acknowledges each preview it has drawn (text `ack`) and
is sent no other until then; meanwhile its one pending slot is replaced by each newer preview, so a slow
page sees fewer frames, never older ones, and no socket buffer fills with pictures.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import re
import struct
import time
from collections import deque
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import zmq
import zmq.asyncio
from aiohttp import WSMsgType, web
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest

from ..console import local_endpoint
from ..preview import PREVIEW_TOPIC
from ..prometheus import RunCollector
from ..security import ClientKeys
from .state import ViewerState

log = logging.getLogger("sweepstream")
STATIC = Path(__file__).parent / "static"
PICTURE_NAME = re.compile(r"^[A-Za-z0-9_.-]+\.png$")
JPEG_QUALITY = 80
COMMAND_TIMEOUT_MS = 2000
MAX_PENDING_MESSAGES = 2000  # JSON messages a page may fall behind by before it is closed (it reconnects)
COMMANDS = ("start", "stop", "exam_end")


class _Page:
    """One connected page: its pending messages and newest preview, sent by one task in order."""

    def __init__(self, socket: web.WebSocketResponse) -> None:
        self.socket = socket
        self.messages: deque[str] = deque()
        self.preview: bytes | None = None
        self.drawing = False  # a preview was sent and the page has not acknowledged it yet
        self.wake = asyncio.Event()

    def push(self, message: str) -> bool:
        self.messages.append(message)
        self.wake.set()
        return len(self.messages) <= MAX_PENDING_MESSAGES

    def push_preview(self, payload: bytes) -> None:
        self.preview = payload
        self.wake.set()

    def drawn(self) -> None:
        self.drawing = False
        self.wake.set()

    async def pump(self) -> None:
        while not self.socket.closed:
            await self.wake.wait()
            self.wake.clear()
            while self.messages:
                await self.socket.send_str(self.messages.popleft())
            if self.preview is not None and not self.drawing:
                payload, self.preview, self.drawing = self.preview, None, True
                await self.socket.send_bytes(payload)


class ViewerServer:
    """The app and its subscriptions, all on one asyncio loop. `token`: required on every request and
    WebSocket (query `token=` or `Authorization: Bearer`), None on a loopback bind."""

    def __init__(self, out: Path, token: str | None) -> None:
        self.out = out
        self.token = token
        self.state = ViewerState()
        self.collector = RunCollector()
        self.registry = CollectorRegistry(auto_describe=True)
        self.registry.register(self.collector)
        self.pages: set[_Page] = set()
        self.context = zmq.asyncio.Context()
        self.control: str | None = None
        self.keys: ClientKeys | None = None  # Curve client keys for the events and control sockets
        self.previews_sent = 0
        self._tasks: list[asyncio.Task] = []
        self.app = web.Application(middlewares=[self._check_token])
        self.app.add_routes([web.get("/", self._index), web.get("/static/{name}", self._static),
                             web.get("/best/{name}", self._picture), web.get("/ws", self._websocket),
                             web.get("/metrics", self._metrics), web.post("/api/command", self._command)])

    # -- following the pipeline ------------------------------------------------------------------------
    def follow(self, events: str, preview: str | None, control: str | None,
               keys: ClientKeys | None = None) -> None:
        """Subscribe to the pipeline's events (and previews); called on the loop once they are bound, and
        again when a restarted postprocess has bound them anew (a `*` port moves)."""
        for task in self._tasks:
            task.cancel()
        self._tasks = []
        self.control, self.keys = control, keys
        self._tasks.append(asyncio.ensure_future(self._follow_events(events)))
        if preview is not None:
            self._tasks.append(asyncio.ensure_future(self._follow_previews(preview)))

    async def _follow_events(self, endpoint: str) -> None:
        socket = self.context.socket(zmq.SUB)
        socket.setsockopt(zmq.LINGER, 0)
        if self.keys is not None:
            self.keys.apply(socket)
        socket.setsockopt(zmq.SUBSCRIBE, b"")
        socket.connect(local_endpoint(endpoint))
        try:
            while True:
                _, body = await socket.recv_multipart()
                event = json.loads(body)
                self.collector.events.observe(event)
                change = self.state.apply(event)
                if change is not None:
                    self._broadcast(json.dumps(change))
        finally:
            socket.close()

    async def _follow_previews(self, endpoint: str) -> None:
        socket = self.context.socket(zmq.SUB)
        socket.setsockopt(zmq.LINGER, 0)
        socket.setsockopt(zmq.RCVHWM, 1)
        socket.setsockopt(zmq.SUBSCRIBE, PREVIEW_TOPIC)
        socket.connect(local_endpoint(endpoint))
        try:
            while True:
                _, header, pixels = await socket.recv_multipart()
                if self.pages:
                    payload = _preview_payload(json.loads(header), pixels)
                    if payload is None:
                        log.warning("viewer: a preview's pixels do not match its size; skipped")
                        continue
                    for page in self.pages:
                        page.push_preview(payload)
                    self.previews_sent += 1
        finally:
            socket.close()

    def _broadcast(self, message: str) -> None:
        for page in list(self.pages):
            if not page.push(message):
                log.warning("viewer: a page fell %d messages behind; closing it (it reconnects)",
                            MAX_PENDING_MESSAGES)
                self.pages.discard(page)
                asyncio.ensure_future(page.socket.close())

    async def stop(self) -> None:
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        for page in list(self.pages):
            await page.socket.close()
        self.context.term()

    # -- HTTP --------------------------------------------------------------------------------------------
    @web.middleware
    async def _check_token(self, request: web.Request, handler: Any) -> web.StreamResponse:
        if self.token is not None:
            given = request.query.get("token") or request.headers.get("Authorization", "").removeprefix(
                "Bearer ")
            if not hmac.compare_digest(given.encode(), self.token.encode()):
                raise web.HTTPUnauthorized(text="sweepstream viewer: a token is required (the URL printed "
                                           "when the pipeline started)")
        return await handler(request)

    async def _index(self, _request: web.Request) -> web.FileResponse:
        return web.FileResponse(STATIC / "index.html", headers={"Cache-Control": "no-store"})

    async def _static(self, request: web.Request) -> web.FileResponse:
        name = request.match_info["name"]
        if name not in {p.name for p in STATIC.iterdir()}:
            raise web.HTTPNotFound()
        return web.FileResponse(STATIC / name)

    async def _picture(self, request: web.Request) -> web.FileResponse:
        name = request.match_info["name"]
        path = self.out / "best" / name
        if not PICTURE_NAME.match(name) or not path.is_file():
            raise web.HTTPNotFound()
        return web.FileResponse(path)

    async def _metrics(self, _request: web.Request) -> web.Response:
        return web.Response(body=generate_latest(self.registry),
                            headers={"Content-Type": CONTENT_TYPE_LATEST})

    async def _command(self, request: web.Request) -> web.Response:
        """An operator button: forwarded to postprocess's control socket, its reply returned."""
        try:
            command = (await request.json()).get("command")
        except (json.JSONDecodeError, AttributeError):
            command = None
        if command not in COMMANDS:
            return web.json_response(
                {"ok": False, "error": f"expected {{\"command\": one of {list(COMMANDS)}}}"}, status=400)
        if self.control is None:
            return web.json_response({"ok": False, "error": "the pipeline has no control socket"}, status=503)
        socket = self.context.socket(zmq.REQ)
        socket.setsockopt(zmq.LINGER, 0)
        if self.keys is not None:
            self.keys.apply(socket)
        socket.connect(local_endpoint(self.control))
        try:
            await socket.send_json({"command": command})
            if not await socket.poll(COMMAND_TIMEOUT_MS):
                return web.json_response({"ok": False, "error": "the pipeline did not answer"}, status=504)
            return web.json_response(await socket.recv_json())
        finally:
            socket.close()

    async def _websocket(self, request: web.Request) -> web.WebSocketResponse:
        socket = web.WebSocketResponse(heartbeat=10)
        await socket.prepare(request)
        page = _Page(socket)
        page.push(json.dumps(self.state.snapshot()))
        self.pages.add(page)
        pump = asyncio.ensure_future(page.pump())
        try:
            async for message in socket:  # the page sends only its acknowledgements
                if message.type == WSMsgType.ERROR:
                    break
                if message.type == WSMsgType.TEXT and message.data == "ack":
                    page.drawn()
        finally:
            self.pages.discard(page)
            pump.cancel()
        return socket


def _preview_payload(header: dict[str, Any], pixels: bytes) -> bytes | None:
    """The page's binary preview message; None when the pixels are not the size the header says."""
    if len(pixels) != header["height"] * header["width"]:
        return None
    image = np.frombuffer(pixels, dtype=np.uint8).reshape(header["height"], header["width"])
    ok, jpeg = cv2.imencode(".jpg", image, [cv2.IMWRITE_JPEG_QUALITY, JPEG_QUALITY])
    if not ok:
        raise RuntimeError("viewer: could not encode a preview")
    header["t_sent"] = round(time.time(), 6)
    head = json.dumps(header).encode()
    return struct.pack(">I", len(head)) + head + jpeg.tobytes()
