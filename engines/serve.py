"""Serve a bundle over KServe v2 (gRPC and HTTP): the `kserve` package's ModelServer around the project's
ONNX Runtime engine, for sites without Triton and for tests. A cart then scores through it with
``--engine kserve --set infer.kserve_url=grpc://HOST:PORT --set infer.kserve_model=NAME``.

The model is served under the bundle's manifest name, with the manifest's input and outputs as its v2
metadata (batch dim -1), which is what the kserve engine checks before a cart starts. Precision is
``infer.precision``'s (auto: the gated int8 model on a CPU when the bundle has one).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from engines.base import EngineError, EngineOptions
from engines.bundle import Bundle, BundleError, load_bundle
from engines.onnxruntime import OrtEngine
from pipeline.stage import set_process_title

V2_DATATYPES = {"bool": "BOOL", "uint8": "UINT8", "int8": "INT8", "uint16": "UINT16", "int16": "INT16",
                "int32": "INT32", "int64": "INT64", "float16": "FP16", "float32": "FP32", "float64": "FP64"}
"""numpy dtype names -> KServe v2 tensor datatypes."""
STOP_GRACE_S = 2
"""Seconds a stopping server gives calls in flight (kserve's default, 30, outlasts a cart's timeout)."""
PER_REQUEST_LOGGERS = ("kserve", "kserve.trace", "uvicorn.access")
"""kserve's loggers that write a line or two per request at INFO (a cart sends 30 a second)."""
SERVE_SCRIPT = Path(__file__).resolve().parents[1] / "tools" / "serve_bundle.py"


def tensor_metadata(bundle: Bundle) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """The bundle's input and outputs as v2 metadata tensors (name, datatype, shape with a -1 batch)."""
    spec = bundle.input
    inputs = [{"name": spec.name, "datatype": V2_DATATYPES[spec.dtype], "shape": [-1, *spec.frame_shape]}]
    outputs = [{"name": out.name, "datatype": V2_DATATYPES[out.dtype], "shape": [-1, *out.shape]}
               for out in bundle.outputs.values()]
    return inputs, outputs


def bundle_model(engine: OrtEngine) -> Any:
    """A kserve Model that runs v2 requests through ``engine`` (loaded by the model server)."""
    import kserve
    from kserve.errors import InvalidInput

    inputs, outputs = tensor_metadata(engine.bundle)

    class BundleModel(kserve.Model):
        """One bundle, one ORT session; a request's batch goes through whole (within the bundle's limits),
        on a worker thread so the server's event loop keeps answering health and metadata calls."""

        def load(self) -> bool:
            engine.load()
            self.ready = True
            return self.ready

        def get_input_types(self) -> list[dict[str, Any]]:
            return inputs

        def get_output_types(self) -> list[dict[str, Any]]:
            return outputs

        async def predict(self, payload: Any, headers: dict[str, str] | None = None) -> Any:
            if not isinstance(payload, kserve.InferRequest):
                payload = kserve.InferRequest.from_grpc(payload)
            named = {tensor.name: tensor for tensor in payload.inputs}
            if set(named) != {engine.bundle.input.name}:
                raise InvalidInput(f"model {self.name} takes one input '{engine.bundle.input.name}', "
                                   f"got {', '.join(named) or 'none'}")
            batch = named[engine.bundle.input.name].as_numpy()
            try:
                results = await asyncio.get_running_loop().run_in_executor(None, engine.infer, batch)
            except EngineError as exc:
                raise InvalidInput(str(exc)) from None
            wanted = {out.name for out in payload.request_outputs} or set(results)
            answers = []
            for spec in outputs:
                if spec["name"] in wanted:
                    value = results[spec["name"]]
                    answer = kserve.InferOutput(spec["name"], list(value.shape), spec["datatype"])
                    answer.set_data_from_numpy(value)
                    answers.append(answer)
            return kserve.InferResponse(payload.id or "", self.name, answers, use_binary_outputs=True)

    return BundleModel(engine.bundle.name)


def serve(bundle: Bundle, grpc_port: int, http_port: int, precision: str, threads: int) -> None:
    """Run the model server until a signal (SIGINT, SIGTERM) stops it."""
    import kserve

    engine = OrtEngine(bundle, EngineOptions(threads=threads, device="auto", max_batch=bundle.max_batch,
                                             precision=precision))
    model = bundle_model(engine)
    model.load()
    server = kserve.ModelServer(http_port=http_port, grpc_port=grpc_port, workers=1,
                                enable_latency_logging=False, grace_period=STOP_GRACE_S)
    for name in PER_REQUEST_LOGGERS:  # after the server has configured logging, which resets levels
        logging.getLogger(name).setLevel(logging.WARNING)
    print(f"serving bundle {bundle.name} ({engine.describe()['precision']}) on gRPC port {grpc_port}, "
          f"HTTP port {http_port}", flush=True)
    server.start([model])


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--bundle", type=Path, required=True, help="bundle directory to serve")
    parser.add_argument("--grpc-port", type=int, required=True, help="KServe v2 gRPC port")
    parser.add_argument("--http-port", type=int, default=0,
                        help="KServe v2 HTTP port (default: any free port, printed at start)")
    parser.add_argument("--precision", choices=("auto", "fp32", "int8"), default="auto",
                        help="as infer.precision for the ort engine (default auto: the gated int8 model on "
                             "a CPU when the bundle has one, else fp32)")
    parser.add_argument("--threads", type=int, default=0,
                        help="ONNX Runtime intra-op threads (0: its default)")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    set_process_title("kserve-server")
    # kserve reads sys.argv when imported (its own server flags): it must not see ours.
    sys.argv = sys.argv[:1]
    try:
        bundle = load_bundle(args.bundle)
        http_port = args.http_port or free_port()
        serve(bundle, args.grpc_port, http_port, args.precision, args.threads)
    except (BundleError, EngineError) as exc:
        print(f"serve_bundle: error: {exc}", file=sys.stderr)
        return 2
    return 0


# --------------------------------------------------------------------------- a server for tests, benchmarks


def free_port() -> int:
    """A TCP port on loopback that is free now (the kernel's choice)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def wait_ready(url: str, model: str, timeout_s: float, process: subprocess.Popen | None = None) -> None:
    """Wait until ``model`` is ready on the server at ``url`` (grpc:// or http://); RuntimeError on timeout
    or when ``process`` (the server) exits first."""
    from engines.kserve import parse_url

    protocol, tls, address = parse_url(url)
    if protocol == "grpc":
        import tritonclient.grpc as module
    else:
        import tritonclient.http as module
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if process is not None and process.poll() is not None:
            raise RuntimeError(f"the model server exited with code {process.returncode} before it was ready")
        client = module.InferenceServerClient(address, ssl=tls)
        try:
            if client.is_model_ready(model):
                return
        except Exception:  # not up yet: connection refused, or a half-started server
            pass
        finally:
            client.close()
        time.sleep(0.2)
    raise RuntimeError(f"model {model} was not ready at {url} within {timeout_s:g} s")


@contextlib.contextmanager
def serving(bundle_dir: str | Path, grpc_port: int | None = None, http_port: int | None = None,
            precision: str = "auto", threads: int = 1, ready_timeout_s: float = 120.0
            ) -> Iterator[tuple[subprocess.Popen, int, int]]:
    """tools/serve_bundle.py in a child process, ready to answer; yields (process, gRPC port, HTTP port)
    and stops it at the end."""
    grpc_port, http_port = grpc_port or free_port(), http_port or free_port()
    process = start_server(bundle_dir, grpc_port, http_port, precision, threads)
    try:
        wait_ready(f"grpc://127.0.0.1:{grpc_port}", load_bundle(bundle_dir).name, ready_timeout_s, process)
        yield process, grpc_port, http_port
    finally:
        stop_server(process)


def start_server(bundle_dir: str | Path, grpc_port: int, http_port: int, precision: str = "auto",
                 threads: int = 1) -> subprocess.Popen:
    """Start tools/serve_bundle.py (not waiting for it: see wait_ready)."""
    command = [sys.executable, str(SERVE_SCRIPT), "--bundle", str(bundle_dir), "--grpc-port", str(grpc_port),
               "--http-port", str(http_port), "--precision", precision, "--threads", str(threads)]
    return subprocess.Popen(command, env={**os.environ, "PYTHONUNBUFFERED": "1"})


def stop_server(process: subprocess.Popen, timeout_s: float = 10.0) -> None:
    """SIGTERM (the server's own clean stop), then SIGKILL if it does not end in time."""
    if process.poll() is None:
        process.terminate()
        try:
            process.wait(timeout_s)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
