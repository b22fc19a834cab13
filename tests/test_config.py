from __future__ import annotations

from pathlib import Path

import pytest

from pipeline.config import ConfigError, describe_options, load_config, to_toml


def test_defaults_validate() -> None:
    config = load_config()
    assert config.transport.policy == "latest" and config.ring.slots == 8


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
