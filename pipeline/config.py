"""Typed run configuration: defaults < TOML file (--config) < command-line overrides.

Every option lives in one dataclass field whose metadata carries its help text and bounds, so validation,
`--help` and the written `config.toml` of a run all come from the same place. Unknown keys and out-of-range
values are errors raised before any process starts.

Each inference backend declares its own options (`Engine.options_type`, e.g. `engines.tensorrt.TrtOptions`);
they are the sub-tables of `[infer]` named by engine key (`[infer.trt]`, `--set infer.trt.cache_dir=...`, or
spelled flat, `--set infer.kserve_url=...` for `infer.kserve.url`), so a backend's settings reach it without
this file naming them. Reading them imports each backend module,
never its library (no tensorrt, torch or onnxruntime).
"""

from __future__ import annotations

import dataclasses
import sys
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import psutil
import tomli_w
import zmq

from engines.registry import ENGINE_MODULES, backend_options

from .options import option
from .security import KeyFolderError, check_server_keys, is_loopback
from .sweep import SweepConfig

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - exercised on 3.10 only
    import tomli as tomllib

REPO_ROOT = Path(__file__).resolve().parents[1]
# The embedded default is the demo: one phantom case (seed 7, never trained on) streamed live through the
# demo model trained on phantom sweeps (tools/train_demo.py). The reference bundle is a plumbing fixture.
DEFAULT_BUNDLE = REPO_ROOT / "bundles" / "demo"
REFERENCE_BUNDLE = REPO_ROOT / "bundles" / "reference"
DEFAULT_SOURCE = "phantom://6?cases=1"  # a case whose sweeps 2 and 3 cross the standard plane


MAX_BATCH = 32
ENGINE_CHOICES = ("auto", *ENGINE_MODULES)


class ConfigError(ValueError):
    """A configuration problem, worded for the person who wrote the config."""


def _default_backend_options() -> dict[str, Any]:
    return {kind: options_type() for kind, options_type in backend_options().items()}


@dataclass
class SourceConfig:
    uri: str = option(DEFAULT_SOURCE, "video file, stream URL (rtsp://, udp://, rtp://, srt://, http(s)://), "
                      "capture card (/dev/videoN, v4l2:///dev/videoN?size=WxH&fps=F&format=yuyv|nv12|mjpg), "
                      "DICOM (.dcm or a folder of one series), a folder of images, image stack "
                      "(.mha/.mhd/.nrrd/.nii, 6 sweeps per case) or a folder of them (ACOUSLIC-AI layout), "
                      "phantom or phantom://SEED[?cases=N&frames=F&fps=R] (synthetic blind sweeps) or "
                      "synthetic://WxH[?fps=F&frames=N&channels=C] (in-memory test pattern)")
    flood: bool = option(False, "read as fast as the pipeline takes frames instead of at the source's "
                         "native rate (capture waits for preprocess; later boundaries follow the policy)")
    loop: bool = option(False, "restart the source at its end")
    max_frames: int | None = option(None, "stop after this many frames", min=1)
    duration: float | None = option(None, "stop after this many seconds", min=0.001)
    pixel_format: Literal["gray", "bgr24"] = option(
        "gray", "pixel format decoded into the frame ring (gray moves 3x fewer bytes)")


@dataclass
class RingConfig:
    slots: int = option(32, "full-resolution frame slots in shared memory (memory: slots x frame size, "
                        "13 MB for 562 x 744 grey frames, 190 MB for 1080p colour; 32 hold about 1 s of 30 "
                        "fps video, while lookback refinement copies out the frames it may yet score)",
                        min=2, max=1024)
    slot_mb: float = option(8.0, "capacity of one slot in MiB (a 1080p BGR frame needs 5.9)",
                            min=0.01, max=512)


@dataclass
class TransportConfig:
    hwm: int = option(2, "ZeroMQ high-water mark on every data socket (messages)", min=1, max=1000)
    policy: Literal["latest", "lossless"] = option(
        "latest", "latest: a stage that is behind drops older frames (counted); "
        "lossless: stages block instead (evaluation, no drops)")
    remote: str | None = option(
        None, "tcp://ADDR:PORT where preprocess also serves its work queue to infer workers on other "
        "machines (tools/infer_worker.py --connect tcp://HOST:PORT); they ask for work and send their "
        "results back over that one connection. An address beyond loopback needs transport.curve_keys")
    curve_keys: str | None = option(
        None, "key folder made by tools/keys.py --out DIR: CurveZMQ on the remote endpoint, the events "
        "PUB and the operator REP (even on loopback), letting in only the client keys in DIR/clients "
        "(ZAP); required for any endpoint bound beyond loopback")
    remote_timeout_s: float = option(
        5.0, "a remote worker silent this long (no result, no request) is gone: the frames it held are "
        "counted as dropped (drop_worker_lost); it is used again when it asks again", min=0.5, max=600)


@dataclass
class PreprocessConfig:
    roi: tuple[int, int, int, int] | Literal["auto"] | None = option(
        "auto", "the part of each frame that goes on (cropped before the ring, so saved best frames hold "
        "only it): auto finds the imaging sector on sources that show a machine's screen (capture cards, "
        "streams, video files, image folders, DICOM without ultrasound regions; the rest of the screen, "
        "patient name included, is dropped), crops DICOM to its ultrasound region and keeps stacks and "
        "phantoms whole; x,y,width,height: a fixed box; none: whole frames")
    interpolation: Literal["bicubic", "area", "cubic", "linear", "nearest"] | None = option(
        None, "final resize filter to the model input size (default: the bundle's input.resize)")


@dataclass
class InferConfig:
    bundle: str = option(str(DEFAULT_BUNDLE), "model bundle directory (bundle.json + model files)")
    engine: Literal[ENGINE_CHOICES] = option(  # type: ignore[valid-type]
        "auto", "inference backend; auto tries TensorRT, then torch-CUDA, then ONNX Runtime; kserve (a "
        "remote KServe v2 / Triton server, infer.kserve_url) and null only when asked")
    max_batch: int | Literal["auto"] = option(
        "auto", "largest batch taken from what is waiting (never waits to fill one); auto: 1 on a CPU (a "
        "batch of N costs N inferences there, so it only makes frames wait behind each other), up to 8 on "
        "a GPU", min=1, max=MAX_BATCH)
    workers: int = option(
        1, "local infer processes sharing the work; 0: none, all inference by remote workers "
        "(transport.remote)", min=0, max=16)
    threads: int = option(0, "intra-op threads for the engine (0 = one fewer than the usable CPU cores, at "
                          "least 1: the other stages need a core)", min=0, max=256)
    refine: Literal["auto", "on", "off"] = option(
        "auto", "lookback refinement: when the engine cannot score every frame, spare engine time scores the "
        "skipped frames around each sweep's best ones (the newest frame keeps priority: at most one "
        "refinement between two newest frames), and a sweep's final best_frame waits for it; auto is on "
        "(it does nothing while every frame is scored); off: newest frames only")
    refine_window_s: float = option(
        6.0, "how far back prepared model inputs are kept for refinement (about 50 kB a frame at 224 x 224; "
        "a slow engine climbing to a sweep's peak one refinement every other inference needs seconds: "
        "at 4 frames a second, 3 s lost the peak's neighbours on the phantom)", min=0.5, max=60)
    refine_timeout_s: float = option(
        1.0, "longest a sweep's final best_frame waits for its refinement after the sweep ends",
        min=0, max=60)
    rate_limit_fps: float | None = option(
        None, "at most this many frames a second through the engine (leaves CPU to other software on a "
        "shared cart; emulates a slower cart in benchmarks); with a screen bundle, the main engine's rate "
        "(the screen runs free); none: as fast as it goes", min=0.01, max=10000)
    screen_bundle: str | None = option(
        None, "screening cascade: a fast bundle (e.g. a MobileCLIP2-S0 student) scores every newest frame "
        "and tracks the sweeps; the main bundle scores only each sweep's best screened frames and the "
        "frames around its own best (lookback refinement, so infer.refine may not be off), and picks the "
        "best frames and measures them. Same engine options as the main bundle; none: no cascade")
    device: Literal["auto", "cpu", "cuda"] = option("auto", "device for backends that have a choice")
    precision: Literal["auto", "fp32", "fp16", "int8"] = option(
        "auto", "model precision; ort: auto runs the bundle's gated int8 model on CPU when it has one "
        "(tools/quantize_bundle.py), else fp32; int8 fails without one; fp16 is refused (use trt or torch "
        "on CUDA). trt: auto builds an fp16 plan, fp32 an fp32 one. torch: auto and fp16 autocast to fp16 "
        "on CUDA; CPU runs fp32. int8 runs on ort only")
    # Each backend's own options by engine key: the sub-tables [infer.trt], ... (see the module docstring).
    backends: dict[str, Any] = field(default_factory=_default_backend_options, metadata={"tables": True})


@dataclass
class PostprocessConfig:
    events: str = option("tcp://127.0.0.1:5556", "ZeroMQ PUB endpoint for events (topic = event type)")
    control: str | None = option(
        "tcp://127.0.0.1:5557", "ZeroMQ REP endpoint for operator commands (sweep start/stop, "
        "tools/sweep_control.py); none: no control socket")
    frame_events: bool = option(True, "publish and journal one `frame` event per scored frame")
    pixel_spacing_mm: tuple[float, float] | None = option(
        None, "row,column pixel spacing in mm for frames whose source does not give one; without either, "
        "biometry is reported in pixels and flagged uncalibrated", min=1e-6, max=100)
    best_frames: bool = option(True, "save each sweep's final best frame and its mask as full-resolution "
                               "PNGs in the run folder (best/)")
    fsync: Literal["event", "interval", "off"] = option(
        "event", "when the journal reaches the disk: every event is written through to the kernel at once "
        "(a crash loses nothing); event: fsync'd per event (a power cut loses nothing either); interval: "
        "at most 1 s of events at risk; off: whenever the kernel writes it")


@dataclass
class RunConfig:
    out: str | None = option(None, "run folder for events.jsonl and summary.json (default runs/<time>-<id>)")
    status_interval: float = option(1.0, "seconds between live status lines", min=0.1, max=3600)
    quiet: bool = option(False, "no live status line")
    health_interval: float = option(
        5.0, "seconds between `health` events (throughput, e2e latency, drops, stage states) on the events "
        "socket and in the journal; 0: none", min=0, max=3600)
    stop_timeout: float = option(2.0, "seconds the stages get to drain and exit on shutdown", min=0.1, max=60)
    start_timeout: float = option(120.0, "seconds a stage may take to start (engine load, warm-up)",
                                  min=1, max=3600)
    stall_timeout: float = option(
        10.0, "a started stage silent this long is declared stuck and restarted (engine load and warm-up "
        "count against start_timeout instead)", min=1, max=3600)
    max_restarts: int = option(
        5, "restarts a stage may have within restart_window_s, or in a row without counting anything in "
        "between; one more failure stops the run, naming the stage (0: any failure stops the run)",
        min=0, max=1000)
    restart_window_s: float = option(60.0, "the window max_restarts counts over", min=1, max=86400)
    restart_backoff_s: float = option(
        0.25, "wait before the first restart of a stage; doubled for each further restart in the window, "
        "at most 8 s", min=0, max=60)
    summary_skip: int = option(10, "frames skipped at each end of the run in the latency summary",
                               min=0, max=100000)
    viewer: str | None = option(
        "auto", "HOST:PORT of the live web viewer (the page at /, Prometheus metrics at /metrics; port 0 "
        "picks a free one; the URL is printed); any address but a loopback one needs the token printed "
        "with it; auto: 127.0.0.1:8080 for the demo (the default source) on a terminal, else off; none: off")
    viewer_preview_fps: float = option(
        5.0, "pictures a second the live view shows (each a resize of a scored frame in postprocess); "
        "lower it on a cart whose browser shares the pipeline's cores", min=0.2, max=30)
    viewer_linger: float = option(
        0.0, "seconds the viewer keeps serving a finished run's page and metrics after its summary "
        "(Ctrl-C ends it sooner)", min=0, max=86400)


@dataclass
class Config:
    source: SourceConfig = field(default_factory=SourceConfig)
    ring: RingConfig = field(default_factory=RingConfig)
    transport: TransportConfig = field(default_factory=TransportConfig)
    preprocess: PreprocessConfig = field(default_factory=PreprocessConfig)
    infer: InferConfig = field(default_factory=InferConfig)
    postprocess: PostprocessConfig = field(default_factory=PostprocessConfig)
    sweep: SweepConfig = field(default_factory=SweepConfig)
    run: RunConfig = field(default_factory=RunConfig)

    def as_dict(self) -> dict[str, dict[str, Any]]:
        """Section -> option -> value; a backend's options nest under its engine key, as in the TOML."""
        out = {}
        for f in dataclasses.fields(self):
            section = getattr(self, f.name)
            values = dataclasses.asdict(section)
            for table_field in (g.name for g in dataclasses.fields(section) if g.metadata.get("tables")):
                values.update(values.pop(table_field))
            out[f.name] = values
        return out


SECTIONS: dict[str, type] = {f.name: f.default_factory for f in dataclasses.fields(Config)}  # type: ignore[misc]


def _coerce(where: str, value: Any, hint: Any, meta: dataclasses.Field) -> Any:
    """Check one value against its annotation and bounds; return it in the field's type."""
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        if type(None) in args and (value is None or (isinstance(value, str) and value.strip().lower()
                                                     in ("", "none"))):
            return None
        inner = [a for a in args if a is not type(None)]
        words = [a for a in inner if typing.get_origin(a) is Literal]
        if words and isinstance(value, str) and value in typing.get_args(words[0]):
            return value  # a word such as "auto" beside a number
        return _coerce(where, value, next(a for a in inner if a not in words), meta)
    if origin is Literal:
        if value not in args:
            raise ConfigError(f"{where}: {value!r} is not one of {', '.join(map(str, args))}")
        return value
    if origin is tuple:
        if isinstance(value, str):
            value = [v.strip() for v in value.split(",")]
        if not isinstance(value, (list, tuple)) or len(value) != len(args):
            raise ConfigError(f"{where}: expected {len(args)} comma-separated values, got {value!r}")
        pairs = enumerate(zip(value, args, strict=True))
        return tuple(_coerce(f"{where}[{i}]", v, a, meta) for i, (v, a) in pairs)
    if hint is bool:
        if isinstance(value, str) and value.lower() in ("true", "1", "yes", "on", "false", "0", "no", "off"):
            return value.lower() in ("true", "1", "yes", "on")
        if not isinstance(value, bool):
            raise ConfigError(f"{where}: expected true or false, got {value!r}")
        return value
    if hint in (int, float):
        try:
            number = hint(value) if isinstance(value, str) else value
        except ValueError:
            raise ConfigError(f"{where}: expected a number, got {value!r}") from None
        if isinstance(number, bool) or not isinstance(number, (int, float)) or (
                hint is int and isinstance(number, float) and not number.is_integer()):
            raise ConfigError(f"{where}: expected {hint.__name__}, got {value!r}")
        number = hint(number)
        low, high = meta.metadata.get("min"), meta.metadata.get("max")
        if low is not None and number < low:
            raise ConfigError(f"{where}: {number} is below the minimum {low}")
        if high is not None and number > high:
            raise ConfigError(f"{where}: {number} is above the maximum {high}")
        return number
    if hint is str:
        if not isinstance(value, str) or not value:
            raise ConfigError(f"{where}: expected a non-empty string, got {value!r}")
        return value
    # Reaching here is a bug in this file (a field type without a rule), not bad user input.
    raise TypeError(f"unsupported config annotation {hint!r} at {where}")


def _tables(section: Any) -> dict[str, Any]:
    """The section's sub-tables by name (the backends' options in [infer]), or none."""
    found = [getattr(section, f.name) for f in dataclasses.fields(section) if f.metadata.get("tables")]
    return found[0] if found else {}


def _coerced(cls: type, name: str, values: dict[str, Any], origin: str, tables: Any = ()) -> dict[str, Any]:
    """`values` checked against the option fields of `cls` (a section or a backend's options)."""
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if not f.metadata.get("tables")}
    for key in values:
        if key not in fields:
            raise ConfigError(f"{origin}: unknown option {name}.{key} "
                              f"(known: {', '.join(sorted([*fields, *tables]))})")
    return {key: _coerce(f"{origin}: {name}.{key}", value, hints[key], fields[key])
            for key, value in values.items()}


def _flat_table_key(key: str, tables: dict[str, Any], fields: set[str]) -> tuple[str, str] | None:
    """(table, option) when `key` spells a sub-table's option flat, as TABLE_OPTION (`kserve_url` for
    `kserve.url`), and is no option of the section itself; else None."""
    if key in fields or key in tables:
        return None
    for table, options in tables.items():
        option_name = key.removeprefix(f"{table}_")
        if option_name != key and option_name in {f.name for f in dataclasses.fields(options)}:
            return table, option_name
    return None


def _apply(section: Any, section_name: str, values: dict[str, Any], origin: str) -> None:
    tables = _tables(section)
    fields = {f.name for f in dataclasses.fields(section)}
    for key in list(values):
        if (flat := _flat_table_key(key, tables, fields)) is not None:
            table, option_name = flat
            nested = values.setdefault(table, {})
            if isinstance(nested, dict):
                nested[option_name] = values.pop(key)
    plain = {key: value for key, value in values.items() if key not in tables}
    for key, value in _coerced(type(section), section_name, plain, origin, tables).items():
        setattr(section, key, value)
    for key, value in values.items():
        if key in tables:
            tables[key] = _apply_table(tables[key], f"{section_name}.{key}", value, origin)


def _apply_table(options: Any, name: str, values: Any, origin: str) -> Any:
    """A backend's (frozen) options with `values` applied; its own cross-field checks become ConfigErrors."""
    if not isinstance(values, dict):
        raise ConfigError(f"{origin}: {name} is a table of options; set them as {name}.KEY")
    changes = _coerced(type(options), name, values, origin)
    try:
        return dataclasses.replace(options, **changes)
    except ValueError as exc:  # e.g. an unordered batch profile
        raise ConfigError(f"{origin}: {name}: {exc}") from None


def load_config(path: str | Path | None = None, overrides: dict[str, Any] | None = None) -> Config:
    """Build a validated Config from defaults, an optional TOML file and `section.key` overrides."""
    config = Config()
    if path is not None:
        try:
            data = tomllib.loads(Path(path).read_text(encoding="utf-8"))
        except OSError as exc:
            raise ConfigError(f"config {path}: cannot read: {exc.strerror or exc}") from None
        except UnicodeDecodeError:
            raise ConfigError(f"config {path}: not a UTF-8 text file") from None
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"config {path}: invalid TOML: {exc}") from None
        for name, values in data.items():
            if name not in SECTIONS or not isinstance(values, dict):
                raise ConfigError(f"config {path}: unknown section [{name}] (known: {', '.join(SECTIONS)})")
            _apply(getattr(config, name), name, values, f"config {path}")
    for dotted, value in (overrides or {}).items():
        name, _, key = dotted.partition(".")
        if name not in SECTIONS or not key:
            known = ", ".join(SECTIONS)
            raise ConfigError(f"override {dotted}: expected section.key, section one of {known}")
        table, dot, table_key = key.partition(".")  # section.table.key: one option of a sub-table
        _apply(getattr(config, name), name, {table: {table_key: value}} if dot else {key: value},
               "command line")
    _check_consistency(config)
    return config


def _check_consistency(config: Config) -> None:
    from .sources import LIVE_SCHEMES, SourceError, check_uri

    try:
        check_uri(config.source.uri)
    except SourceError as exc:
        raise ConfigError(f"source.uri: {exc}") from None
    if config.source.loop and config.source.uri.startswith(LIVE_SCHEMES):
        raise ConfigError(f"source.loop: {config.source.uri} is a live source and cannot loop")
    roi = config.preprocess.roi
    if isinstance(roi, tuple) and (min(roi[:2]) < 0 or min(roi[2:]) < 1):
        raise ConfigError(f"preprocess.roi: {list(roi)} needs x, y >= 0 and width, height >= 1")
    bundle = Path(config.infer.bundle)
    if not (bundle / "bundle.json").is_file():
        raise ConfigError(f"infer.bundle: {bundle} has no bundle.json")
    screen = config.infer.screen_bundle
    if screen is not None:
        if not (Path(screen) / "bundle.json").is_file():
            raise ConfigError(f"infer.screen_bundle: {screen} has no bundle.json")
        if config.infer.refine == "off":
            raise ConfigError("infer.screen_bundle: a screening cascade needs infer.refine on or auto (the "
                              "main bundle scores only the frames refinement asks for)")
    if config.run.viewer not in (None, "auto"):
        try:
            parse_address(config.run.viewer)
        except ValueError as exc:
            raise ConfigError(f"run.viewer: {exc}") from None
    _check_endpoints(config)
    history = refine_history_bytes(config.infer.refine_window_s)
    spare = psutil.virtual_memory().available * REFINE_MEMORY_SHARE
    if config.infer.refine != "off" and history > spare:
        raise ConfigError(
            f"infer.refine_window_s: {config.infer.refine_window_s:g} s of model inputs can take "
            f"{history / 2**20:.0f} MiB, more than a quarter of this machine's available memory "
            f"({spare / 2**20:.0f} MiB); shorten the window or set infer.refine=off")


def parse_address(text: str) -> tuple[str, int]:
    """HOST:PORT (an IPv6 host in brackets) -> (host, port); ValueError saying what is wrong."""
    host, sep, port = text.rpartition(":")
    host = host.strip("[]")
    if not sep or not host or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise ValueError(f"{text!r} is not HOST:PORT (port 0-65535; 0 picks a free one)")
    return host, int(port)


def _check_endpoints(config: Config) -> None:
    """Remote inference and the security rule: whatever binds beyond loopback needs Curve keys."""
    transport = config.transport
    remote = transport.remote
    if remote is not None:
        if not remote.startswith("tcp://") or not remote.rsplit(":", 1)[-1].isdigit():
            raise ConfigError(f"transport.remote: {remote!r} is not tcp://ADDR:PORT (a fixed port, which "
                              "remote workers connect to)")
    elif config.infer.workers == 0:
        raise ConfigError("infer.workers: 0 local workers needs transport.remote (else nothing scores)")
    if transport.curve_keys is not None:
        if not zmq.has("curve"):
            raise ConfigError("transport.curve_keys: this pyzmq's libzmq was built without CurveZMQ")
        try:
            check_server_keys(transport.curve_keys)
        except KeyFolderError as exc:
            raise ConfigError(f"transport.curve_keys: {exc}") from None
        return
    for key, endpoint in (("transport.remote", remote), ("postprocess.events", config.postprocess.events),
                          ("postprocess.control", config.postprocess.control)):
        if endpoint is not None and not is_loopback(endpoint):
            raise ConfigError(f"{key}: {endpoint} binds beyond this host, which needs CurveZMQ keys: make "
                              "them with tools/keys.py --out DIR and add --set transport.curve_keys=DIR")


REFINE_MEMORY_SHARE = 0.25  # of the available memory the refinement history may take at most
REFINE_MAX_FPS = 60  # the fastest video a cart meets, for the history's bound


def refine_history_bytes(window_s: float, input_bytes: int = 224 * 224 * 3) -> int:
    """The most memory preprocess's refinement history can take: the window at REFINE_MAX_FPS, of 3-channel
    224 x 224 model inputs (a grey bundle takes a third)."""
    return int(window_s * REFINE_MAX_FPS * input_bytes)


def _describe(name: str, cls: type) -> list[str]:
    lines = []
    for f in dataclasses.fields(cls):
        if f.metadata.get("tables"):
            for table, options in f.default_factory().items():  # type: ignore[misc]
                lines.extend(_describe(f"{name}.{table}", type(options)))
            continue
        default = f.default if f.default is not dataclasses.MISSING else None
        bounds = ""
        if f.metadata.get("min") is not None or f.metadata.get("max") is not None:
            bounds = f" [{f.metadata.get('min')}..{f.metadata.get('max')}]"
        lines.append(f"  {name}.{f.name} = {default!r}{bounds}\n      {f.metadata['help']}")
    return lines


def describe_options() -> str:
    """All options with defaults and help, for the end of `--help`."""
    lines = ["configuration options (TOML section.key, a backend's as [infer.ENGINE] key; override any "
             "with --set section.key=value or --set infer.ENGINE.key=value, also spelled infer.ENGINE_key):"]
    for name, cls in SECTIONS.items():
        lines.extend(_describe(name, cls))
    return "\n".join(lines)


def to_toml(config: Config) -> str:
    """The resolved config, written into the run folder so a run can be repeated exactly."""
    def plain(value: Any) -> Any:
        # TOML has no null: "none" reads back as None for every optional option.
        if isinstance(value, dict):
            return {k: plain(v) for k, v in value.items()}
        return "none" if value is None else list(value) if isinstance(value, tuple) else value

    return tomli_w.dumps(plain(config.as_dict()))
