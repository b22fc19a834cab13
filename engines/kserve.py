"""KServe v2 engine: the bundle runs on a remote inference server (Triton, or tools/serve_bundle.py) that
speaks KServe's Open Inference Protocol v2, so many carts can share one GPU server.

The cart sends the bundle's prepared uint8 input and receives the outputs by name; the server's model
metadata is checked against the bundle manifest before a frame is sent. A server that is slow, restarting
or gone costs the frames of the batches it does not answer in time (:class:`EngineTimeout`, counted by the
infer stage), never the stream: the engine backs off, reconnects and checks the model again.

tritonclient (gRPC by default, or HTTP) is imported on first use: the run config imports this module to
read :class:`KserveOptions`.
"""

from __future__ import annotations

import dataclasses
import importlib.metadata
import logging
import time
from pathlib import Path
from typing import Any, ClassVar
from urllib.parse import urlsplit

import numpy as np

from engines.base import Engine, EngineError, EngineOptions, EngineTimeout
from engines.bundle import Bundle, BundleError, TensorSig, check_model_io
from pipeline.options import option

log = logging.getLogger("sweepstream")

SCHEMES = {"grpc": ("grpc", False), "grpcs": ("grpc", True), "http": ("http", False), "https": ("http", True)}
"""URL scheme -> (protocol, TLS)."""
LOAD_TIMEOUT_S = 30.0
"""Answer timeout while loading (metadata check, warm-up): a server's first calls pay its own warm-up."""
RETRY_S = (0.25, 0.5, 1.0, 2.0)
"""Waits before each reconnect attempt after a failed batch (the last one repeats): a dead server costs a
connection attempt every 2 s at most, not one per frame."""
# gRPC status codes (and the HTTP client's errors) that mean "no answer now", not "a wrong request".
_TRANSIENT_GRPC = ("UNAVAILABLE", "DEADLINE_EXCEEDED", "CANCELLED", "RESOURCE_EXHAUSTED")
_V2_DTYPES = {"BOOL": "bool", "UINT8": "uint8", "INT8": "int8", "UINT16": "uint16", "INT16": "int16",
              "INT32": "int32", "INT64": "int64", "FP16": "float16", "FP32": "float32", "FP64": "float64"}
"""KServe v2 tensor datatypes -> numpy dtype names."""


@dataclasses.dataclass(frozen=True)
class KserveOptions:
    """The kserve backend's own settings: ``[infer.kserve]`` (``--set infer.kserve.url=...``, or the flat
    ``--set infer.kserve_url=...``).

    The server decides precision and device (``tools/serve_bundle.py --precision``), so an explicit
    ``infer.precision`` is refused rather than silently ignored.
    """

    url: str | None = option(
        None, "the KServe v2 / Triton server: grpc://HOST:PORT (gRPC, the default protocol), "
        "http://HOST:PORT, or grpcs:// / https:// for TLS; required with --engine kserve")
    model: str | None = option(None, "model name on the server (default: the bundle's manifest name, which "
                                     "tools/serve_bundle.py serves it under)")
    timeout_s: float = option(
        1.0, "longest a batch may wait for its answer: a slower or unreachable server drops the batch's "
        "frames (counted: infer.drop_engine_timeout) and the engine reconnects", min=0.01, max=600)
    ca_file: str | None = option(None, "PEM root certificates for grpcs:// or https:// (default: the "
                                       "system's)")
    token_file: str | None = option(
        None, "file holding a bearer token sent with every call (kept in a file so the token never "
        "enters the run's config.toml)")


def parse_url(url: str | None) -> tuple[str, bool, str]:
    """(protocol, TLS, host:port) of a server URL, or EngineError saying what is wrong with it."""
    if not url:
        raise EngineError("engine 'kserve' needs the server's address: --set infer.kserve_url=grpc://HOST:PORT")
    parts = urlsplit(url)
    if parts.scheme not in SCHEMES or not parts.hostname or parts.port is None or parts.path.strip("/"):
        raise EngineError(f"infer.kserve.url {url!r} is not SCHEME://HOST:PORT with SCHEME one of "
                          f"{', '.join(SCHEMES)}")
    protocol, tls = SCHEMES[parts.scheme]
    return protocol, tls, parts.netloc


def v2_signature(tensor: dict[str, Any], where: str) -> TensorSig:
    """(numpy dtype, dims) of one tensor of a v2 model-metadata answer; -1 dims are unknown."""
    dtype = _V2_DTYPES.get(tensor["datatype"])
    if dtype is None:
        raise EngineError(f"{where}: tensor '{tensor['name']}' has unsupported datatype {tensor['datatype']}")
    return dtype, tuple(None if int(d) < 0 else int(d) for d in tensor["shape"])


class KserveEngine(Engine):
    """Scores batches on a KServe v2 server through tritonclient (gRPC, or HTTP for an http:// URL).

    Never chosen by ``--engine auto``: it needs a server named in the config. ``max_batch`` auto is 1:
    the server (Triton's dynamic batcher) batches requests across carts, and a cart that sends its newest
    frame alone keeps its own latency lowest; ``infer.max_batch`` sends a backlog in one call.
    """

    type_key: ClassVar[str] = "kserve"
    options_type: ClassVar[type] = KserveOptions

    def __init__(self, bundle: Bundle, options: EngineOptions,
                 backend_options: KserveOptions | None = None) -> None:
        super().__init__(bundle, options)
        self.backend_options = backend_options or KserveOptions()
        if options.precision != "auto":
            raise EngineError(f"precision {options.precision}: with --engine kserve the server decides "
                              "(tools/serve_bundle.py --precision); leave infer.precision at auto")
        self.url = self.backend_options.url
        self.protocol, self.tls, self.address = parse_url(self.url)
        self.model = self.backend_options.model or bundle.name
        self.timeout_s = self.backend_options.timeout_s  # per call; LOAD_TIMEOUT_S while loading
        self.timeouts = 0
        self.reconnects = 0
        self._client: Any = None
        self._module: Any = None
        self._headers: dict[str, str] = {}
        self._failures = 0  # consecutive failed reconnects: how long to wait before the next one
        self._lost_while_down = 0
        self._retry_at = 0.0

    @property
    def reachable(self) -> bool:
        return self._failures == 0 and self._lost_while_down == 0

    @classmethod
    def available(cls) -> tuple[bool, str]:
        try:
            import tritonclient.grpc  # noqa: F401 - both protocols must import
            import tritonclient.http  # noqa: F401
        except ModuleNotFoundError as exc:
            return False, f"{(exc.name or 'tritonclient').split('.')[0]} is not installed"
        except ImportError as exc:
            return False, f"tritonclient cannot be imported ({exc})"
        return True, f"tritonclient {importlib.metadata.version('tritonclient')}"

    def on_cpu(self) -> bool:
        """The cart computes nothing: engine threads are no concern of it."""
        return False

    def auto_batch(self) -> int:
        return 1

    # -- connecting and checking -----------------------------------------------------------------------
    def _connect(self) -> None:
        """A fresh client (a new channel or connection pool), so a server that came back is found."""
        if self._client is not None:
            self._client.close()
        if self.protocol == "grpc":
            import tritonclient.grpc as module

            ca = self.backend_options.ca_file
            self._client = module.InferenceServerClient(self.address, ssl=self.tls, root_certificates=ca)
        else:
            import tritonclient.http as module

            timeout = self.timeout_s
            ssl_options = {"ca_certs": self.backend_options.ca_file} if self.backend_options.ca_file else None
            self._client = module.InferenceServerClient(
                self.address, ssl=self.tls, ssl_options=ssl_options, connection_timeout=timeout,
                network_timeout=timeout)
        self._module = module

    def _metadata(self) -> dict[str, Any]:
        """The model's v2 metadata as a dict (name, inputs, outputs with datatype and shape)."""
        timeout = self.timeout_s
        if self.protocol == "grpc":
            answer = self._client.get_model_metadata(self.model, headers=self._headers,
                                                     client_timeout=timeout)
            return {"inputs": [{"name": t.name, "datatype": t.datatype, "shape": list(t.shape)}
                               for t in answer.inputs],
                    "outputs": [{"name": t.name, "datatype": t.datatype, "shape": list(t.shape)}
                                for t in answer.outputs]}
        return self._client.get_model_metadata(self.model, headers=self._headers)

    def check_server(self) -> None:
        """Connect and check the served model against the manifest (names, dtypes, shapes); the
        supervisor's preflight calls this so a mismatch is one error before any stage starts. A server
        that does not answer is an EngineTimeout, a model that does not fit an EngineError."""
        where = f"kserve model '{self.model}' at {self.url}"
        self._headers = self._auth_headers()
        self._connect()
        try:
            metadata = self._metadata()
        except Exception as exc:
            if self._transient(exc):
                raise EngineTimeout(f"{where}: the server does not answer ({_first_line(exc)})") from None
            raise EngineError(f"{where}: {_first_line(exc)}") from None
        try:
            check_model_io(self.bundle,
                           {t["name"]: v2_signature(t, where) for t in metadata["inputs"]},
                           {t["name"]: v2_signature(t, where) for t in metadata["outputs"]}, where)
        except BundleError as exc:
            raise EngineError(str(exc)) from None

    def _auth_headers(self) -> dict[str, str]:
        path = self.backend_options.token_file
        if path is None:
            return {}
        try:
            token = Path(path).read_text(encoding="utf-8").strip()
        except OSError as exc:
            raise EngineError(f"infer.kserve.token_file {path}: cannot read: {exc.strerror or exc}") from None
        if not token:
            raise EngineError(f"infer.kserve.token_file {path}: the file is empty")
        return {"authorization": f"Bearer {token}"}

    def preflight(self) -> None:
        self.check_server()

    def load(self) -> None:
        self.timeout_s = max(LOAD_TIMEOUT_S, self.backend_options.timeout_s)
        try:
            self.check_server()
            self.warm_up()
        finally:
            self.timeout_s = self.backend_options.timeout_s
        self._connect()  # the HTTP client takes its timeouts at construction

    # -- inference -------------------------------------------------------------------------------------
    def _transient(self, exc: Exception) -> bool:
        """Whether a failed call means "no answer now" (slow, restarting, gone), not a bad request."""
        from tritonclient.utils import InferenceServerException

        if not isinstance(exc, InferenceServerException):
            return isinstance(exc, (OSError, TimeoutError)) or type(exc).__module__.startswith("gevent")
        status = str(exc.status() or "")
        return self.protocol == "grpc" and status.rpartition(".")[2] in _TRANSIENT_GRPC

    def _request(self, batch: np.ndarray) -> Any:
        module = self._module
        data = module.InferInput(self.bundle.input.name, list(batch.shape), "UINT8")
        data.set_data_from_numpy(batch)
        if self.protocol == "grpc":
            wanted = [module.InferRequestedOutput(name) for name in self.bundle.outputs]
            return self._client.infer(self.model, [data], outputs=wanted, headers=self._headers,
                                      client_timeout=self.timeout_s)
        wanted = [module.InferRequestedOutput(name, binary_data=True) for name in self.bundle.outputs]
        return self._client.infer(self.model, [data], outputs=wanted, headers=self._headers)

    def infer(self, batch: np.ndarray) -> dict[str, np.ndarray]:
        """One batch on the server. Raises EngineTimeout (the batch lost, the engine still usable) when the
        server does not answer in time or is down; while it stays down, calls fail at once until the next
        reconnect attempt (RETRY_S)."""
        if self._module is None:
            raise EngineError("kserve engine is not loaded: call load() first")
        self.check_batch(batch)
        if self._client is None:
            self._reconnect()
        try:
            result = self._request(batch)
        except Exception as exc:
            if not self._transient(exc):
                raise EngineError(f"kserve model '{self.model}' at {self.url}: {_first_line(exc)}") from None
            self._lost(f"no answer within {self.timeout_s:g} s ({_first_line(exc)})")
        if self._failures:
            log.info("kserve: %s answers again after %d lost batch(es)", self.url, self._lost_while_down)
            self._failures = self._lost_while_down = 0
        return self._outputs(result, len(batch))

    def _reconnect(self) -> None:
        """After a failure: wait out the back-off (failing fast meanwhile), then a new client and the
        model checked again, since a server that comes back may serve something else."""
        wait = self._retry_at - time.monotonic()
        if wait > 0:
            self._lost(f"server down, next try in {wait:.2f} s", retry=False)
        self.reconnects += 1
        try:
            self.check_server()
        except EngineTimeout as exc:
            self._lost(str(exc))

    def _lost(self, why: str, retry: bool = True) -> None:
        """Count a lost batch, drop the client so the next call reconnects, and raise EngineTimeout."""
        self.timeouts += 1
        self._lost_while_down += 1
        if retry and self._client is not None:
            self._client.close()
            self._client = None
            self._retry_at = time.monotonic() + RETRY_S[min(self._failures, len(RETRY_S) - 1)]
            self._failures += 1
        raise EngineTimeout(f"kserve {self.url}: {why}")

    def _outputs(self, result: Any, n: int) -> dict[str, np.ndarray]:
        outputs = {}
        for spec in self.bundle.outputs.values():
            value = result.as_numpy(spec.name)
            if value is None or value.shape != (n, *spec.shape):
                got = None if value is None else value.shape
                raise EngineError(f"kserve model '{self.model}' at {self.url}: output '{spec.name}' came "
                                  f"back with shape {got}, manifest says {(n, *spec.shape)}")
            outputs[spec.name] = value if value.dtype == spec.dtype else value.astype(spec.dtype)
        return outputs

    def describe(self) -> dict[str, Any]:
        return {
            "backend": "kserve",
            "protocol": self.protocol,
            "url": self.url,
            "model": self.model,
            "device": "remote",
            "precision": "server",
            "max_batch": self.max_batch,
            "bundle": self.bundle.name,
            "bundle_version": self.bundle.version,
            "timeout_s": self.backend_options.timeout_s,
            "timeouts": self.timeouts,
            "reconnects": self.reconnects,
        }

    def close(self) -> None:
        if self._client is not None:
            self._client.close()
        self._client = self._module = None


def _first_line(exc: Exception) -> str:
    text = str(exc).strip() or type(exc).__name__
    return text.splitlines()[0]


ENGINE_CLASS = KserveEngine
