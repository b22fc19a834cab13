from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from pipeline.config import ConfigError, describe_options, load_config, to_toml


def test_defaults_validate() -> None:
    config = load_config()
    assert config.transport.policy == "latest" and config.ring.slots == 32


def test_file_then_overrides(tmp_path: Path) -> None:
    path = tmp_path / "run.toml"
    path.write_text('[source]\nflood = true\nmax_frames = 10\n[preprocess]\nroi = [1, 2, 300, 400]\n')
    config = load_config(path, {"source.max_frames": "20"})
    assert config.source.flood is True and config.source.max_frames == 20
    assert config.preprocess.roi == (1, 2, 300, 400)


def test_written_toml_reloads_to_the_same_config(tmp_path: Path) -> None:
    config = load_config(None, {"preprocess.roi": "0,0,10,10", "run.quiet": "true"})
    path = tmp_path / "again.toml"
    path.write_text(to_toml(config))
    assert load_config(path) == config


@pytest.mark.parametrize(("text", "message"), [
    ("[source]\nflod = true\n", "unknown option source.flod"),
    ("[sauce]\n", "unknown section [sauce]"),
    ("[ring]\nslots = 1\n", "ring.slots: 1 is below the minimum 2"),
    ("[ring]\nslots = 2.5\n", "ring.slots: expected int"),
    ("[transport]\npolicy = 'fast'\n", "transport.policy: 'fast' is not one of latest, lossless"),
    ("[preprocess]\nroi = [1, 2]\n", "preprocess.roi: expected 4 comma-separated values"),
    ("[source\n", "invalid TOML"),
])
def test_bad_files_name_the_file_and_key(tmp_path: Path, text: str, message: str) -> None:
    path = tmp_path / "bad.toml"
    path.write_text(text)
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert message in str(info.value) and str(path) in str(info.value)


def test_every_option_is_documented() -> None:
    text = describe_options()
    for key in ("source.uri", "ring.slots", "transport.policy", "infer.max_batch", "run.stop_timeout"):
        assert key in text


# --------------------------------------------------------------------------- a backend's own options


def test_backend_options_from_toml_and_command_line(tmp_path: Path) -> None:
    path = tmp_path / "run.toml"
    path.write_text('[infer]\nengine = "trt"\n[infer.trt]\ncache_dir = "/plans"\nprofile = [1, 4, 16]\n')
    config = load_config(path, {"infer.trt.profile": "2,4,8", "infer.trt.progress": "yes"})
    trt = config.infer.backends["trt"]
    assert (trt.cache_dir, trt.profile, trt.progress) == ("/plans", (2, 4, 8), True)
    assert load_config().infer.backends["trt"].cache_dir is None


def test_backend_options_are_written_back_as_their_table(tmp_path: Path) -> None:
    config = load_config(None, {"infer.trt.cache_dir": "/plans", "infer.trt.profile": "1,2,4"})
    text = to_toml(config)
    assert '[infer.trt]\ncache_dir = "/plans"\n' in text and "backends" not in text
    path = tmp_path / "again.toml"
    path.write_text(text)
    assert load_config(path) == config
    assert config.as_dict()["infer"]["trt"]["profile"] == (1, 2, 4)


@pytest.mark.parametrize(("text", "message"), [
    ("[infer.trt]\ncachedir = '/x'\n", "infer.trt.cachedir (known: cache_dir, profile, progress)"),
    ("[infer.ort]\nthreads = 2\n", "unknown option infer.ort"),
    ("[infer.trt]\nprofile = [0, 8, 32]\n", "infer.trt.profile[0]: 0 is below the minimum 1"),
    ("[infer.trt]\nprofile = [4, 2, 8]\n", "infer.trt: batch profile must satisfy 1 <= min <= opt <= max"),
    ("[infer.trt]\nprogress = 'maybe'\n", "infer.trt.progress: expected true or false"),
    ("[infer]\ntrt = 'fast'\n", "infer.trt is a table of options; set them as infer.trt.KEY"),
])
def test_bad_backend_options_name_the_key(tmp_path: Path, text: str, message: str) -> None:
    path = tmp_path / "bad.toml"
    path.write_text(text)
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert message in str(info.value) and str(path) in str(info.value)


def test_bad_backend_option_on_the_command_line() -> None:
    with pytest.raises(ConfigError, match=r"^command line: unknown option infer\.trt\.cachedir \(known: "):
        load_config(None, {"infer.trt.cachedir": "/x"})
    with pytest.raises(ConfigError, match="unknown option infer.tflite"):
        load_config(None, {"infer.tflite.device": "0"})


def test_backend_options_are_documented() -> None:
    text = describe_options()
    for key in ("infer.trt.cache_dir", "infer.trt.profile = (1, 8, 32) [1..1024]", "infer.trt.progress"):
        assert key in text


def test_config_load_imports_no_backend_library() -> None:
    """Validating a run config (--help, --validate-config, the supervisor) must not pay for importing torch,
    TensorRT or ONNX Runtime, though it reads every backend's options."""
    code = ("import sys; from pipeline.config import describe_options, load_config, to_toml; "
            "to_toml(load_config(None, {'infer.trt.cache_dir': '/x'})); describe_options(); "
            "print(sorted({m.split('.')[0] for m in sys.modules} & "
            "{'torch', 'tensorrt', 'cuda', 'onnxruntime', 'onnx', 'open_clip'}))")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                            cwd=Path(__file__).resolve().parents[1])
    assert result.stdout.strip() == "[]"
